//! `/v1/entries`: place, read, list and cancel entries. Placing stores the
//! entry with its levels first, sends it under its deterministic client id
//! with the FULL response, and protects whatever filled at once (source
//! `direct`). A request that carries an `Idempotency-Key` its account
//! already used is answered with that entry, and nothing is sent again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Json as JsonOut;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use oco_core::mem::merge_evidence;
use oco_core::model::{Entry, EntryKind, Evidence, NewEntry, OrderSize, Protection, Source};
use oco_core::ports::{
    ApiCredentials, CancelOutcome, ExchangeError, OrderRequest, OrderSnapshot, Side, event,
};
use oco_core::protect::{Idle, ProtectOutcome, claims_settled};
use oco_core::{ClientOrderId, EntryId, EntryLevels, EntryStatus, IdempotencyKey, Qty, StoreError};
use rust_decimal::Decimal;
use tracing::instrument::WithSubscriber;
use tracing::{Instrument, error, info, info_span, warn};

use crate::AppState;
use crate::accounts::{owned_account, path_id};
use crate::auth::AuthUser;
use crate::dto::{CreateEntryRequest, EntryList, EntryView, EventView, Problem};
use crate::error::ApiError;
use crate::json::Json;
use crate::validate::{check_market, parse_entry};

/// Most entries one list answer holds.
const MAX_LIST: usize = 500;
/// Entries one list answer holds unless told.
const DEFAULT_LIST: usize = 100;

/// Unknown symbol codes: Binance's "Invalid symbol." (-1121).
const INVALID_SYMBOL: i32 = -1121;

/// The request header carrying the client's idempotency key.
const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// Set (`true`) on an answer that is an earlier request's entry.
static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Places a BUY entry and protects what fills in its own response.
#[utoipa::path(
    post, path = "/v1/entries", tag = "entries",
    request_body = CreateEntryRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Optional; 1 to 64 printable ASCII characters, no space first or last, unique per account. A request whose key the account already used places nothing: it is answered `200` with that entry (header `Idempotent-Replayed: true`), or `409 idempotency_key_reused` if it asks for another symbol, type, size, price or levels. Send one with every entry and resend with the same key after a lost answer, a timeout, a 5xx or a 202."),
    ),
    responses(
        (status = 200, description = "The entry of an earlier request with the same `Idempotency-Key`, as it stands now; nothing was sent again (see `note`)", body = EntryView),
        (status = 201, description = "Placed; any fill is already protected (see `protection` and `legs`)", body = EntryView),
        (status = 202, description = "Stored and sent, outcome unknown (or the placement ended without an answer): the entry stays `pending_new` and reconciliation resolves it by client id (never resend without the same `Idempotency-Key`)", body = EntryView),
        (status = 400, description = "Bad input, or a malformed `Idempotency-Key` (nothing stored)", body = Problem),
        (status = 401, description = "No or unknown token", body = Problem),
        (status = 404, description = "No such account of yours", body = Problem),
        (status = 409, description = "`idempotency_key_reused`: the key was used for an entry that differs from this request (`entryId`); nothing stored or sent", body = Problem),
        (status = 415, description = "Not JSON", body = Problem),
        (status = 422, description = "Refused: by the exchange (`exchange_rejected`, with `binanceCode`), or not protectable (`unprotectable`)", body = Problem),
        (status = 429, description = "Exchange rate limit; see Retry-After. Nothing was sent, and the `Idempotency-Key` is free: resend with it", body = Problem),
        (status = 503, description = "Exchange or store unavailable. Nothing was sent, and the `Idempotency-Key` is free: resend with it", body = Problem),
        (status = 500, description = "The placement ended before the entry was stored: nothing was sent", body = Problem),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create_entry(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    Json(req): Json<CreateEntryRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let parsed = parse_entry(req)?;
    let account = owned_account(&state, &user, parsed.account).await?;
    if let Some(key) = &key {
        // A retry is answered before anything else is checked: since its
        // first try the market may have moved past its levels or the
        // account been disabled, and its entry stands all the same.
        if let Some(earlier) = state
            .users
            .entry_by_idempotency_key(account.id, key)
            .await?
        {
            let asked = Asked {
                symbol: parsed.symbol.clone(),
                kind: parsed.kind,
                size: parsed.size,
                levels: parsed.levels,
            };
            return replay(&state, key, &asked, &earlier).await;
        }
    }
    if !account.active {
        // Refused before any exchange call; the store refuses it too, for a
        // disable that lands after this read.
        return Err(StoreError::AccountInactive {
            account: account.id,
        }
        .into());
    }
    let rules = match state.exchange.symbol_rules(&parsed.symbol).await {
        Ok(rules) => rules,
        Err(ExchangeError::Rejected { code, .. }) if code == INVALID_SYMBOL => {
            return Err(ApiError::UnknownSymbol(parsed.symbol));
        }
        Err(ExchangeError::NotFound) => return Err(ApiError::UnknownSymbol(parsed.symbol)),
        Err(e) => return Err(e.into()),
    };
    let last = state.exchange.last_price(&parsed.symbol).await?;
    check_market(&parsed, &rules, last, &account.protection)?;
    // Credentials come from the entry's account in the store, every time.
    let creds = state.store.credentials(account.id).await?;
    let new = NewEntry {
        account: account.id,
        symbol: rules.symbol.clone(),
        kind: parsed.kind,
        size: parsed.size,
        levels: parsed.levels,
        tags: parsed.tags,
        idempotency_key: key,
    };

    // From the store onwards the work runs as its own task: hyper drops this
    // handler's future when the client hangs up, and an order on the
    // exchange whose answer is never recorded, and whose fill nobody
    // protects or flags, must not depend on the client's patience.
    let stored = Arc::new(OnceLock::new());
    let task = tokio::spawn(
        place(state.clone(), new, creds, stored.clone())
            .in_current_span()
            .with_current_subscriber(),
    );
    match task.await {
        Ok(answer) => answer,
        Err(err) => aborted(&state, stored.get(), &err).await,
    }
}

/// The request's `Idempotency-Key`, if it carries one.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::field(IDEMPOTENCY_KEY, "must be sent once"));
    }
    value
        .to_str()
        .ok()
        .and_then(|text| IdempotencyKey::new(text).ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::field(
                IDEMPOTENCY_KEY,
                oco_core::ids::IdError::IllegalIdempotencyKey.to_string(),
            )
        })
}

/// What an entry request asks for, as far as a request repeated under the
/// same idempotency key must ask the same: tags may differ.
struct Asked {
    symbol: String,
    kind: EntryKind,
    size: OrderSize,
    levels: EntryLevels,
}

impl Asked {
    fn of(new: &NewEntry) -> Asked {
        Asked {
            symbol: new.symbol.name.clone(),
            kind: new.kind,
            size: new.size,
            levels: new.levels,
        }
    }

    /// How `entry` differs from this request, in the request's words.
    fn differences(&self, entry: &Entry) -> Vec<String> {
        let id = entry.id;
        let mut differ = Vec::new();
        if self.symbol != entry.symbol.name {
            differ.push(format!(
                "symbol is {}, entry {id}'s is {}",
                self.symbol, entry.symbol.name
            ));
        }
        match (self.kind, entry.kind) {
            (EntryKind::Limit { price: asked }, EntryKind::Limit { price: stored })
                if asked != stored =>
            {
                differ.push(format!("price is {asked}, entry {id}'s is {stored}"));
            }
            (EntryKind::Limit { .. }, EntryKind::Limit { .. }) => {}
            (asked, stored) if asked != stored => differ.push(format!(
                "type is {}, entry {id}'s is {}",
                kind_name(asked),
                kind_name(stored)
            )),
            _ => {}
        }
        if self.size != entry.size {
            differ.push(format!(
                "size is {}, entry {id}'s is {}",
                size_text(self.size),
                size_text(entry.size)
            ));
        }
        let (asked, stored) = (self.levels, entry.levels);
        if (asked.tp1, asked.tp2) != (stored.tp1, stored.tp2) {
            differ.push(format!(
                "tp is {}, entry {id}'s is {}",
                targets_text(&asked),
                targets_text(&stored)
            ));
        }
        if asked.sl != stored.sl {
            let sl =
                |p: Option<oco_core::Price>| p.map_or_else(|| "absent".into(), |p| p.to_string());
            differ.push(format!(
                "sl is {}, entry {id}'s is {}",
                sl(asked.sl),
                sl(stored.sl)
            ));
        }
        differ
    }
}

fn kind_name(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::Market => "MARKET",
        EntryKind::Limit { .. } => "LIMIT",
    }
}

fn size_text(size: OrderSize) -> String {
    match size {
        OrderSize::Base(q) => format!("quantity {q}"),
        OrderSize::Quote(q) => format!("quoteOrderQty {}", q.normalize()),
    }
}

fn targets_text(levels: &EntryLevels) -> String {
    let tps: Vec<String> = [levels.tp1, levels.tp2]
        .into_iter()
        .flatten()
        .map(|p| p.to_string())
        .collect();
    format!("[{}]", tps.join(", "))
}

/// Answers a request whose idempotency key its account already used: with
/// that entry as it stands now (`200`), if the request asks for the same
/// order; else `409 idempotency_key_reused` naming each difference, rather
/// than another order's answer. Either way nothing is stored or sent.
async fn replay(
    state: &AppState,
    key: &IdempotencyKey,
    asked: &Asked,
    earlier: &Entry,
) -> Result<Response, ApiError> {
    let differ = asked.differences(earlier);
    if !differ.is_empty() {
        warn!(account = %earlier.account, entry = %earlier.id, differences = differ.len(), "idempotency key reused for another entry; refused");
        return Err(ApiError::IdempotencyKeyReused {
            message: format!(
                "Idempotency-Key '{key}' was used for entry {} and this request differs: {}; nothing was stored or sent. Send a new entry with a new key",
                earlier.id,
                differ.join("; ")
            ),
            entry: earlier.id.0,
        });
    }
    info!(account = %earlier.account, entry = %earlier.id, client_id = %earlier.client_id, "entry request repeated under its idempotency key; answering with its entry");
    let mut view = view_of(state, earlier.id).await?;
    view.note = Some(format!(
        "this is entry {}, placed by an earlier request with Idempotency-Key '{key}'; this request sent nothing. Its state is as of now: read GET /v1/entries/{} to follow it",
        earlier.id, earlier.id
    ));
    let location = HeaderValue::from_str(&format!("/v1/entries/{}", earlier.id))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::OK,
        [
            (header::LOCATION, location),
            (
                IDEMPOTENT_REPLAYED.clone(),
                HeaderValue::from_static("true"),
            ),
        ],
        JsonOut(view),
    )
        .into_response())
}

/// Stores the entry, sends it and protects what fills, to the end.
async fn place(
    state: AppState,
    new: NewEntry,
    creds: ApiCredentials,
    stored: Arc<OnceLock<Entry>>,
) -> Result<Response, ApiError> {
    // Stored before it is sent: a crash after this line loses nothing, and the
    // deterministic client id lets reconciliation find the order. The store
    // inserts it only while the account is active, holding the account
    // against a disable until the insert commits: an entry racing a disable
    // is either refused here (`account_inactive`, nothing stored) or seen by
    // the disable's check after its write, never sent unfollowed.
    let ids = state.ids.clone();
    let fallback = ids
        .entry(EntryId(0))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let client_id_of = move |id: EntryId| ids.entry(id).unwrap_or_else(|_| fallback.clone());
    let keyed = new
        .idempotency_key
        .clone()
        .map(|key| (key, Asked::of(&new)));
    let entry = match state
        .store
        .create_entry(new, &client_id_of, state.clock.now())
        .await
    {
        Ok(entry) => entry,
        // A request with the same key was stored in the meantime (a retry
        // racing its first try): this one sends nothing.
        Err(StoreError::IdempotencyKeyUsed(earlier)) => {
            return match &keyed {
                Some((key, asked)) => replay(&state, key, asked, &earlier).await,
                None => Err(StoreError::IdempotencyKeyUsed(earlier).into()),
            };
        }
        Err(e) => return Err(e.into()),
    };
    let _ = stored.set(entry.clone());
    if state.ids.entry(entry.id).ok().as_ref() != Some(&entry.client_id) {
        // Only an id beyond the layout can get here; never send such an order.
        refuse(&state, &entry, "client id does not fit the layout").await;
        return Err(ApiError::Internal(format!(
            "entry {} does not fit the client id layout",
            entry.id
        )));
    }
    info!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, symbol = %entry.symbol, "entry stored, sending");
    send(&state, &entry, &creds, keyed.is_some())
        .instrument(order_span(&entry))
        .await
}

/// The placement task ended without an answer: a panic, or a runtime
/// shutting down. Once the entry is stored its order may be on the
/// exchange: the account is flagged and the answer is a `202` with the
/// entry, as for an unknown outcome, never an error a client retries.
async fn aborted(
    state: &AppState,
    entry: Option<&Entry>,
    err: &tokio::task::JoinError,
) -> Result<Response, ApiError> {
    let Some(entry) = entry else {
        error!(error = %err, "entry placement ended before the entry was stored");
        return Err(ApiError::PlacementAborted(format!(
            "the placement ended before the entry was stored ({err}); nothing was sent"
        )));
    };
    error!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, error = %err, "entry placement ended without an answer");
    flag(state, entry, "entry placement ended without an answer").await;
    let note = format!(
        "the placement of entry {} ended without an answer ({err}); its order may be on the exchange: reconciliation resolves it by client id {}. Do not resend (a resend with the same Idempotency-Key is answered with this entry); read GET /v1/entries/{} later",
        entry.id, entry.client_id, entry.id
    );
    let view = sent_view(state, entry, entry.clone(), Some(note)).await;
    let location = HeaderValue::from_str(&format!("/v1/entries/{}", entry.id))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        JsonOut(view),
    )
        .into_response())
}

/// Lines logged by the exchange adapter and the HTTP client while an order
/// is handled know nothing of it: this span names it on them.
fn order_span(entry: &Entry) -> tracing::Span {
    info_span!(
        "order",
        account = %entry.account,
        entry = %entry.id,
        client_id = %entry.client_id,
    )
}

/// Sends the stored entry and protects whatever filled at once. `keyed`:
/// the entry was stored under its request's idempotency key.
async fn send(
    state: &AppState,
    entry: &Entry,
    creds: &ApiCredentials,
    keyed: bool,
) -> Result<Response, ApiError> {
    let order = OrderRequest {
        symbol: entry.symbol.name.clone(),
        side: Side::Buy,
        limit: match entry.kind {
            oco_core::model::EntryKind::Market => None,
            oco_core::model::EntryKind::Limit { price } => Some(price),
        },
        size: entry.size,
        client_id: entry.client_id.clone(),
    };
    let placed = match state.exchange.place_order(creds, &order).await {
        Ok(snap) => Ok(snap),
        // A duplicate id or a lost answer: the order may exist. Look it up once; never resend.
        Err(err) if is_maybe_placed(&err) => {
            warn!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, error = %err, "entry outcome unknown, looking it up");
            match state
                .exchange
                .query_order(creds, &entry.symbol.name, entry.client_id.as_str())
                .await
            {
                Ok(snap) => with_trades(state, creds, snap)
                    .await
                    .map_err(|lookup| (err, lookup)),
                Err(lookup) => Err((err, lookup)),
            }
        }
        Err(err) => {
            warn!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, error = %err, "entry not placed");
            if keyed && sent_nothing(&err) {
                // Released before the refusal is recorded: a resend racing
                // this answer stores a new entry rather than finding this
                // one rejected.
                release_key(state, entry).await;
            }
            refuse(state, entry, &err.to_string()).await;
            return Err(ApiError::from(err).with_entry(entry.id.0));
        }
    };
    let snap = match placed {
        Ok(snap) => snap,
        Err((err, lookup)) => {
            return pending(state, entry, &err, &lookup).await;
        }
    };
    let absorbed = absorb(state, entry, &snap).await;
    let view = sent_view(state, entry, absorbed.known, absorbed.note).await;
    let location = HeaderValue::from_str(&format!("/v1/entries/{}", entry.id))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        JsonOut(view),
    )
        .into_response())
}

fn is_maybe_placed(err: &ExchangeError) -> bool {
    matches!(
        err,
        ExchangeError::UnknownOutcome(_) | ExchangeError::NotFound
    ) || err.is_duplicate()
}

/// Whether a placement refused with `err` never reached the exchange: the
/// refusals answered "nothing sent" (`429 rate_limited`, `503
/// exchange_unavailable`), which the client is told to resend. A refusal
/// by the exchange itself (`Rejected`, `Auth`) would be given again to the
/// same request, so its entry keeps the key.
fn sent_nothing(err: &ExchangeError) -> bool {
    matches!(
        err,
        ExchangeError::RateLimited { .. } | ExchangeError::Transient(_)
    )
}

/// Frees the idempotency key of an entry whose order was never sent, so
/// that the resend its answer asks for places the order instead of being
/// answered with this entry, rejected.
async fn release_key(state: &AppState, entry: &Entry) {
    if let Err(e) = state.store.release_idempotency_key(entry.id).await {
        error!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, error = %e, "could not release the idempotency key of an entry never sent; a resend with it is answered with this entry");
    }
}

/// A looked-up order carries no trades, so its commission is unknown: legs
/// planned from it would ignore a base-asset fee and offer more coins than
/// the fill left. Fetch the trades first; without them, leave it to reconciliation.
async fn with_trades(
    state: &AppState,
    creds: &ApiCredentials,
    mut snap: OrderSnapshot,
) -> Result<OrderSnapshot, ExchangeError> {
    let seen: Qty = snap.fills.iter().map(|f| f.qty).sum();
    if !snap.executed_qty.is_zero() && seen < snap.executed_qty {
        snap.fills = state
            .exchange
            .order_trades(creds, &snap.symbol, snap.order_id)
            .await?;
    }
    Ok(snap)
}

/// Records that the entry was never placed, so that it is not left pending.
async fn refuse(state: &AppState, entry: &Entry, why: &str) {
    let now = state.clock.now();
    let evidence = Evidence {
        order_id: None,
        status: EntryStatus::Rejected,
        executed_qty: Qty::ZERO,
        cumulative_quote: Decimal::ZERO,
        fills: Vec::new(),
        holding: None,
        observed_at: now,
    };
    if let Err(e) = state.store.record_evidence(entry.id, &evidence).await {
        error!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, error = %e, "could not record the refusal; reconciliation will look the client id up");
        flag(state, entry, "entry refusal not recorded").await;
        return;
    }
    let _ = state
        .store
        .append_event(&event(entry.id, "rejected", why, Some(Source::Direct), now))
        .await;
}

/// Once the claim timeout has passed, flags `entry`'s account for
/// reconciliation unless the claims another caller held on the fill have
/// settled ([`claims_settled`]): a caller that died holding them leaves
/// the fill to sync's next periodic pass otherwise.
fn recheck_after_claim(state: &AppState, entry: &Entry) {
    let (state, entry) = (state.clone(), entry.clone());
    let wait = state.protector.claim_timeout() + Duration::from_secs(1);
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        if !claims_settled(state.store.as_ref(), entry.id).await {
            warn!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, "another caller's claim on the fill never completed, flagging for reconciliation");
            flag(&state, &entry, "claim never completed").await;
        }
    });
}

async fn flag(state: &AppState, entry: &Entry, reason: &str) {
    if let Err(e) = state
        .store
        .flag_reconcile(entry.account, reason, state.clock.now())
        .await
    {
        error!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, error = %e, "could not flag the account for reconciliation");
    }
}

/// The placement's outcome is unknown and the lookup did not settle it: the
/// entry stays `pending_new`; reconciliation resolves it by client id.
async fn pending(
    state: &AppState,
    entry: &Entry,
    err: &ExchangeError,
    lookup: &ExchangeError,
) -> Result<Response, ApiError> {
    let note = format!(
        "outcome unknown ({err}); lookup by client id {}: {lookup}. The entry stays pending_new until reconciliation finds it; do not resend",
        entry.client_id
    );
    warn!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, error = %err, lookup = %lookup, "entry outcome unknown after lookup");
    flag(state, entry, "entry outcome unknown").await;
    let _ = state
        .store
        .append_event(&event(
            entry.id,
            "outcome_unknown",
            note.clone(),
            Some(Source::Direct),
            state.clock.now(),
        ))
        .await;
    let view = sent_view(state, entry, entry.clone(), Some(note)).await;
    Ok((StatusCode::ACCEPTED, JsonOut(view)).into_response())
}

fn evidence_of(state: &AppState, snap: &OrderSnapshot) -> Evidence {
    Evidence {
        order_id: Some(snap.order_id),
        status: snap.status,
        executed_qty: snap.executed_qty,
        cumulative_quote: snap.cumulative_quote,
        fills: snap.fills.clone(),
        holding: None,
        observed_at: state.clock.now(),
    }
}

/// What [`absorb`] made of an answer: a note when protection is not (yet)
/// complete, and the entry as it stands by that answer, for a reply that
/// cannot read it back from the store.
struct Absorbed {
    note: Option<String>,
    known: Entry,
}

/// Records what the exchange said of the entry order and, when anything
/// filled, protects it at once. Failures here never hide the placement: the
/// account is flagged and the reply says so.
async fn absorb(state: &AppState, entry: &Entry, snap: &OrderSnapshot) -> Absorbed {
    let ev = evidence_of(state, snap);
    info!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, status = %snap.status, executed = %snap.executed_qty, "entry answered");
    let mut known = entry.clone();
    merge_evidence(&mut known, &mut BTreeMap::new(), &ev);
    if snap.executed_qty.is_zero() {
        let note = match state.store.record_evidence(entry.id, &ev).await {
            Ok(recorded) => {
                known = recorded;
                None
            }
            Err(e) => {
                error!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, error = %e, "could not record the entry's answer");
                flag(state, entry, "entry answer not recorded").await;
                Some(format!(
                    "the exchange answered {} but it could not be recorded ({e}); reconciliation will",
                    snap.status
                ))
            }
        };
        return Absorbed { note, known };
    }
    let note = match state
        .protector
        .protect(entry.id, Some(&ev), Source::Direct)
        .await
    {
        Ok(report) => {
            info!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, outcome = ?report.outcome, "direct protection");
            // Only what this call itself established; anything else stays
            // `unprotected` in the in-memory view.
            match &report.outcome {
                ProtectOutcome::Placed { .. } => {
                    known.protection = Protection::Protected {
                        at: report.finished_at,
                        by: Source::Direct,
                    };
                }
                ProtectOutcome::Unprotectable { reason } => {
                    known.protection = Protection::Unprotectable {
                        reason: reason.clone(),
                    };
                }
                ProtectOutcome::Exited { reason } => {
                    known.protection = Protection::Exited {
                        reason: reason.clone(),
                    };
                }
                _ => {}
            }
            match report.outcome {
                ProtectOutcome::Placed { .. }
                | ProtectOutcome::Nothing(Idle::NoFill | Idle::Covered | Idle::Settled) => None,
                ProtectOutcome::Nothing(Idle::InFlight) => {
                    // Another layer (the gateway on the stream, sync) holds
                    // the fill's claim and is placing now; its answer is its
                    // own to record. Should it die first, its claim outlives
                    // the claim timeout unsettled: checked then, and flagged.
                    recheck_after_claim(state, entry);
                    None
                }
                ProtectOutcome::Exited { reason } => Some(format!(
                    "protection came too late and the position was sold at market: {reason}"
                )),
                ProtectOutcome::Unprotectable { reason } => {
                    Some(format!("the fill cannot be protected: {reason}"))
                }
                other => {
                    flag(state, entry, "direct protection incomplete").await;
                    Some(format!(
                        "protection is not complete yet ({other:?}); reconciliation retries it"
                    ))
                }
            }
        }
        Err(e) => {
            error!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, error = %e, "direct protection failed");
            // Keep at least the evidence, so that every layer sees the fill.
            let _ = state.store.record_evidence(entry.id, &ev).await;
            flag(state, entry, "direct protection failed").await;
            Some(format!(
                "filled, but protection failed ({e}); reconciliation retries it"
            ))
        }
    };
    Absorbed { note, known }
}

/// The reply about an entry whose order was sent: the stored view, else
/// `known` (the entry as the exchange's answer left it, without legs).
/// Once an order is out, a failing read must not turn into an error a
/// client retries: the retry would place a second order.
async fn sent_view(
    state: &AppState,
    entry: &Entry,
    known: Entry,
    note: Option<String>,
) -> EntryView {
    match view_of(state, entry.id).await {
        Ok(mut view) => {
            view.note = note;
            view
        }
        Err(e) => {
            warn!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, error = %e, "stored entry unreadable after sending, answering from memory");
            let unread = format!(
                "the stored view could not be read ({e}); this reply is built from the exchange's answer and shows no legs: read GET /v1/entries/{} later; do not resend",
                entry.id
            );
            let mut view = EntryView::of(&known, &[]);
            view.note = Some(match note {
                Some(note) => format!("{note}; {unread}"),
                None => unread,
            });
            view
        }
    }
}

async fn view_of(state: &AppState, id: EntryId) -> Result<EntryView, ApiError> {
    let entry = state.store.entry(id).await?;
    let legs = state.store.legs(id).await?;
    Ok(EntryView::of(&entry, &legs))
}

/// The entry, if `user` owns its account; someone else's is reported as absent.
async fn owned_entry(state: &AppState, user: &AuthUser, id: EntryId) -> Result<Entry, ApiError> {
    let not_found = || ApiError::NotFound {
        what: "entry",
        id: id.to_string(),
    };
    let entry = match state.store.entry(id).await {
        Ok(e) => e,
        Err(StoreError::NotFound { .. }) => return Err(not_found()),
        Err(e) => return Err(e.into()),
    };
    match owned_account(state, user, entry.account).await {
        Ok(_) => Ok(entry),
        Err(ApiError::NotFound { .. }) => Err(not_found()),
        Err(e) => Err(e),
    }
}

/// One entry with its legs and history.
#[utoipa::path(
    get, path = "/v1/entries/{id}", tag = "entries",
    params(("id" = i64, Path, description = "Entry id")),
    responses(
        (status = 200, body = EntryView),
        (status = 401, body = Problem),
        (status = 404, description = "No such entry of yours", body = Problem),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_entry(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> Result<JsonOut<EntryView>, ApiError> {
    let id = EntryId(path_id("entry", &id)?);
    let entry = owned_entry(&state, &user, id).await?;
    let legs = state.store.legs(id).await?;
    let events = state.store.events(id).await?;
    let mut view = EntryView::of(&entry, &legs);
    view.events = Some(events.iter().map(EventView::of).collect());
    Ok(JsonOut(view))
}

/// The caller's entries, newest first.
#[utoipa::path(
    get, path = "/v1/entries", tag = "entries",
    params(
        ("account" = Option<i64>, Query, description = "Only this account (one of yours)"),
        ("status" = Option<String>, Query, description = "Only this status, e.g. `new`, `filled`"),
        ("limit" = Option<usize>, Query, description = "At most this many (default 100, max 500)"),
    ),
    responses(
        (status = 200, body = EntryList),
        (status = 400, body = Problem),
        (status = 401, body = Problem),
        (status = 404, description = "No such account of yours", body = Problem),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_entries(
    State(state): State<AppState>,
    user: AuthUser,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<JsonOut<EntryList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::field("query", e.body_text()))?;
    if let Some(unknown) = query
        .keys()
        .find(|k| !["account", "status", "limit"].contains(&k.as_str()))
    {
        return Err(ApiError::field(
            unknown.clone(),
            "is not a filter; use account, status or limit",
        ));
    }
    let status = match query.get("status") {
        Some(s) => Some(EntryStatus::from_name(s).ok_or_else(|| {
            let names: Vec<&str> = EntryStatus::ALL.iter().map(|s| s.name()).collect();
            ApiError::field(
                "status",
                format!("'{s}' is not one of {}", names.join(", ")),
            )
        })?),
        None => None,
    };
    let limit = match query.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIST).contains(n))
            .ok_or_else(|| {
                ApiError::field(
                    "limit",
                    format!("'{l}' is not a number from 1 to {MAX_LIST}"),
                )
            })?,
        None => DEFAULT_LIST,
    };
    let accounts = match query.get("account") {
        Some(a) => {
            let id =
                oco_core::AccountId(path_id("account", a).map_err(|_| {
                    ApiError::field("account", format!("'{a}' is not an account id"))
                })?);
            vec![owned_account(&state, &user, id).await?]
        }
        None => state.users.accounts_of(&user.0).await?,
    };
    let mut entries = Vec::new();
    for account in &accounts {
        entries.extend(state.users.entries_of(account.id, status, limit).await?);
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.id));
    entries.truncate(limit);
    let mut views = Vec::with_capacity(entries.len());
    for entry in &entries {
        let legs = state.store.legs(entry.id).await?;
        views.push(EntryView::of(entry, &legs));
    }
    Ok(JsonOut(EntryList { entries: views }))
}

/// Cancels the unfilled rest of an entry; a filled part stays protected.
#[utoipa::path(
    delete, path = "/v1/entries/{id}", tag = "entries",
    params(("id" = i64, Path, description = "Entry id")),
    responses(
        (status = 200, description = "Canceled (or already over); any filled part is protected", body = EntryView),
        (status = 202, description = "Cancel sent, final state not yet confirmed", body = EntryView),
        (status = 401, body = Problem),
        (status = 404, description = "No such entry of yours", body = Problem),
        (status = 409, description = "Nothing left to cancel", body = Problem),
        (status = 422, description = "Refused by the exchange", body = Problem),
        (status = 503, body = Problem),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn cancel_entry(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = EntryId(path_id("entry", &id)?);
    let entry = owned_entry(&state, &user, id).await?;
    // Its own task, as a placement is: a client hanging up after the cancel
    // went out must not drop the read of the order's final state, nor the
    // protection of what filled before the cancel.
    let span = order_span(&entry);
    let task = {
        let (state, entry) = (state.clone(), entry.clone());
        tokio::spawn(
            async move { cancel(&state, &user, &entry).await }
                .instrument(span)
                .with_current_subscriber(),
        )
    };
    match task.await {
        Ok(answer) => answer,
        Err(err) => {
            error!(account = %entry.account, entry = %entry.id, client_id = %entry.client_id, error = %err, "cancel task ended without an answer");
            flag(&state, &entry, "entry cancel task failed").await;
            Err(ApiError::Internal(format!(
                "the cancel of entry {} ended without an answer ({err}); the account is flagged for reconciliation, read GET /v1/entries/{} later",
                entry.id, entry.id
            )))
        }
    }
}

/// Cancels the rest of `entry` and records the order's own final state.
async fn cancel(state: &AppState, user: &AuthUser, entry: &Entry) -> Result<Response, ApiError> {
    let id = entry.id;
    if entry.status.is_final() {
        return Err(ApiError::Conflict {
            code: "not_cancelable",
            message: format!("entry {id} is {}: nothing left to cancel", entry.status),
        });
    }
    let creds = state.store.credentials(entry.account).await?;
    let symbol = entry.symbol.name.as_str();
    let client_id: &ClientOrderId = &entry.client_id;
    let canceled = match state
        .exchange
        .cancel_order(&creds, symbol, client_id.as_str())
        .await
    {
        Ok(outcome) => outcome,
        Err(ExchangeError::NotFound) => {
            flag(
                state,
                entry,
                "cancel of an order the exchange does not know",
            )
            .await;
            return Err(ApiError::Conflict {
                code: "not_cancelable",
                message: format!(
                    "the exchange does not know order {client_id} (yet); reconciliation resolves it"
                ),
            });
        }
        Err(e) => return Err(ApiError::from(e).with_entry(id.0)),
    };
    info!(account = %entry.account, entry = %id, client_id = %client_id, outcome = ?canceled, "entry cancel sent");
    // Whatever the cancel said, the order's own state is the fact to record:
    // it tells whether a part filled before the cancel.
    let snap = match state
        .exchange
        .query_order(&creds, symbol, client_id.as_str())
        .await
    {
        Ok(snap) => with_trades(state, &creds, snap).await,
        Err(e) => Err(e),
    };
    let snap = match snap {
        Ok(snap) => snap,
        Err(e) => {
            warn!(account = %entry.account, entry = %id, client_id = %client_id, error = %e, "cancel sent, order state unknown");
            flag(state, entry, "entry cancel not confirmed").await;
            let note = format!(
                "cancel {}; its final state or its trades could not be read ({e}); reconciliation records it",
                match canceled {
                    CancelOutcome::Canceled => "accepted",
                    CancelOutcome::NotOpen => "found the order no longer open",
                }
            );
            let view = sent_view(state, entry, entry.clone(), Some(note)).await;
            return Ok((StatusCode::ACCEPTED, JsonOut(view)).into_response());
        }
    };
    let Absorbed { note, known } = absorb(state, entry, &snap).await;
    let _ = state
        .store
        .append_event(&event(
            id,
            "cancel_requested",
            format!("by {}; order {}", user.0, snap.status),
            Some(Source::Direct),
            state.clock.now(),
        ))
        .await;
    // The cancel is out: a failing read answers from what is known, never
    // with an error a client would take for a cancel not made.
    let view = sent_view(state, entry, known, note).await;
    Ok((StatusCode::OK, JsonOut(view)).into_response())
}
