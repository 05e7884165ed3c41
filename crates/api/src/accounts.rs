//! `/v1/accounts`: register an exchange account, read and change its settings.
//! The secret is write-only; a user sees only the accounts they own.

use std::time::Duration;

use axum::Json as JsonOut;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use oco_core::AccountId;
use oco_core::model::{Account, ProtectionConfig};
use oco_core::ports::{ApiCredentials, NewAccount};
use secrecy::SecretString;
use tracing::instrument::WithSubscriber;
use tracing::{Instrument, error, info, warn};

use crate::AppState;
use crate::auth::AuthUser;
use crate::dto::{AccountList, AccountView, CreateAccountRequest, Problem, UpdateAccountRequest};
use crate::error::ApiError;
use crate::json::Json;
use crate::validate::apply_settings;

/// Exchanges an account may be registered on.
const EXCHANGES: [&str; 1] = ["binance"];

/// Parses a path id.
pub(crate) fn path_id(what: &'static str, text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::field("id", format!("'{text}' is not a {what} id")))
}

/// The account, if `user` owns it; someone else's is reported as absent.
pub(crate) async fn owned_account(
    state: &AppState,
    user: &AuthUser,
    id: AccountId,
) -> Result<Account, ApiError> {
    let not_found = || ApiError::NotFound {
        what: "account",
        id: id.to_string(),
    };
    match state.store.account(id).await {
        Ok(account) if account.owner == user.0 => Ok(account),
        Ok(_) => Err(not_found()),
        Err(oco_core::StoreError::NotFound { .. }) => Err(not_found()),
        Err(e) => Err(e.into()),
    }
}

fn non_blank(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() || value.len() > max || value.chars().any(char::is_control) {
        return Err(ApiError::field(
            field,
            format!("must be 1 to {max} printable characters"),
        ));
    }
    Ok(())
}

/// Registers an exchange account owned by the caller.
#[utoipa::path(
    post, path = "/v1/accounts", tag = "accounts",
    request_body = CreateAccountRequest,
    responses(
        (status = 201, description = "Registered (the secret is never returned)", body = AccountView),
        (status = 400, description = "Bad input", body = Problem),
        (status = 401, description = "No or unknown token", body = Problem),
        (status = 409, description = "API key already registered", body = Problem),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create_account(
    State(state): State<AppState>,
    user: AuthUser,
    Json(req): Json<CreateAccountRequest>,
) -> Result<Response, ApiError> {
    if !EXCHANGES.contains(&req.exchange.as_str()) {
        return Err(ApiError::field(
            "exchange",
            format!(
                "'{}' is not supported; expected one of {EXCHANGES:?}",
                req.exchange
            ),
        ));
    }
    non_blank("apiKey", &req.api_key, 256)?;
    non_blank("apiSecret", &req.api_secret, 256)?;
    let protection = match &req.protection {
        Some(s) => apply_settings(ProtectionConfig::DEFAULT, s)?,
        None => ProtectionConfig::DEFAULT,
    };
    let account = state
        .store
        .create_account(NewAccount {
            owner: user.0.clone(),
            exchange: req.exchange.clone(),
            credentials: ApiCredentials {
                api_key: req.api_key.clone(),
                secret: SecretString::from(req.api_secret),
            },
            protection,
        })
        .await?;
    info!(account = %account.id, owner = %user.0, "account registered");
    let location = HeaderValue::from_str(&format!("/v1/accounts/{}", account.id))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        JsonOut(AccountView::of(&account)),
    )
        .into_response())
}

/// The caller's accounts.
#[utoipa::path(
    get, path = "/v1/accounts", tag = "accounts",
    responses(
        (status = 200, body = AccountList),
        (status = 401, body = Problem),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_accounts(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<JsonOut<AccountList>, ApiError> {
    let accounts = state.users.accounts_of(&user.0).await?;
    Ok(JsonOut(AccountList {
        accounts: accounts.iter().map(AccountView::of).collect(),
    }))
}

/// One of the caller's accounts.
#[utoipa::path(
    get, path = "/v1/accounts/{id}", tag = "accounts",
    params(("id" = i64, Path, description = "Account id")),
    responses(
        (status = 200, body = AccountView),
        (status = 401, body = Problem),
        (status = 404, description = "No such account of yours", body = Problem),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_account(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> Result<JsonOut<AccountView>, ApiError> {
    let id = AccountId(path_id("account", &id)?);
    let account = owned_account(&state, &user, id).await?;
    Ok(JsonOut(AccountView::of(&account)))
}

/// Most entry ids a refusal to disable an account lists.
const LISTED_OPEN_ENTRIES: usize = 5;

/// Changes an account's protection settings or active flag.
///
/// Disabling (`"active": false`) is refused with `409
/// account_has_open_entries` while the account has open entries: an order
/// not final yet (resting, or sent with its outcome unknown), or a filled
/// entry whose protection has not closed. A disabled account is neither
/// streamed nor reconciled, so those entries would lose all protection.
/// Cancel resting entries with `DELETE /v1/entries/{id}` and wait for filled
/// entries to close (take-profit or stop-loss filled). Re-enabling and
/// changing the settings are always allowed. Only the fields the request
/// carries are written: a settings change never writes back an active flag
/// read before it.
#[utoipa::path(
    patch, path = "/v1/accounts/{id}", tag = "accounts",
    params(("id" = i64, Path, description = "Account id")),
    request_body = UpdateAccountRequest,
    responses(
        (status = 200, body = AccountView),
        (status = 400, body = Problem),
        (status = 401, body = Problem),
        (status = 404, body = Problem),
        (status = 409, description = "`account_has_open_entries`: disabling refused while entries are open; `openEntries` counts them and `entryIds` lists up to five", body = Problem),
        (status = 500, description = "`account_left_disabled`: the disable raced a new entry and enabling the account again failed; enable it with `{\"active\": true}`", body = Problem),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn update_account(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    Json(req): Json<UpdateAccountRequest>,
) -> Result<JsonOut<AccountView>, ApiError> {
    let id = AccountId(path_id("account", &id)?);
    let account = owned_account(&state, &user, id).await?;
    let protection = match &req.protection {
        Some(s) => Some(apply_settings(account.protection, s)?),
        None => None,
    };
    let disabling = req.active == Some(false);
    if disabling {
        refuse_if_open(&state, id).await?;
    }
    // From the write on, the work runs as its own task: hyper drops this
    // handler's future when the client hangs up, and a disable cut short
    // between its write and its re-check would leave an entry that raced it
    // on a disabled account, unfollowed.
    let task = tokio::spawn(
        write_account(state.clone(), id, protection, req.active)
            .in_current_span()
            .with_current_subscriber(),
    );
    let updated = task.await.map_err(|e| {
        error!(account = %id, error = %e, "account update ended without an answer");
        ApiError::Internal(format!(
            "the update of account {id} ended without an answer ({e}); read GET /v1/accounts/{id}"
        ))
    })??;
    info!(account = %id, active = updated.active, "account settings changed");
    Ok(JsonOut(AccountView::of(&updated)))
}

/// Writes what the request carries, and no more: the active flag the
/// handler read may be stale (an enable and a new entry since), and writing
/// it back would disable the account without the open-entries check.
async fn write_account(
    state: AppState,
    id: AccountId,
    protection: Option<ProtectionConfig>,
    active: Option<bool>,
) -> Result<Account, ApiError> {
    let updated = state.store.update_account(id, protection, active).await?;
    if active == Some(false) {
        // An entry stored between the handler's check and this write would
        // go unfollowed. The store inserts an entry only while its account
        // is active, holding the account's row until the insert commits;
        // checking again after writing means one of the two sides always
        // sees the other.
        if let Err(refusal) = refuse_if_open(&state, id).await {
            return Err(enable_again(&state, id, refusal).await);
        }
    }
    Ok(updated)
}

/// Attempts at enabling an account again after a disable that raced an entry.
const ENABLE_ATTEMPTS: u32 = 3;
/// Wait before the second attempt; doubled before each next one.
const ENABLE_BACKOFF: Duration = Duration::from_millis(100);

/// An entry appeared (or the re-check failed) while the account was being
/// disabled: enable it again and answer `refusal`. The entry was stored on
/// an enabled account (the store takes none on a disabled one), so the
/// account is enabled whatever this request read of it before. If that
/// fails, the account is disabled with an entry nobody follows: logged as
/// an error, and the answer says so and what to do.
async fn enable_again(state: &AppState, id: AccountId, refusal: ApiError) -> ApiError {
    let mut wait = ENABLE_BACKOFF;
    let mut attempt = 1;
    let failure = loop {
        match state.store.update_account(id, None, Some(true)).await {
            Ok(_) => {
                warn!(account = %id, "an entry arrived while the account was being disabled; it stays enabled");
                return refusal;
            }
            Err(e) if attempt < ENABLE_ATTEMPTS => {
                warn!(account = %id, attempt, error = %e, "enabling the account again failed, retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            Err(e) => break e,
        }
    };
    let (count, ids, why) = match &refusal {
        ApiError::OpenEntries { count, ids, .. } => (
            Some(*count),
            ids.clone(),
            format!(
                "open entries ({}{}) were stored while it was being disabled",
                ids.iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                if *count > ids.len() { ", …" } else { "" }
            ),
        ),
        other => (
            None,
            Vec::new(),
            format!("its open entries could not be checked after the disable ({other})"),
        ),
    };
    error!(account = %id, open_entries = ?count, entry_ids = ?ids, error = %failure, refusal = %refusal, "account left disabled with open entries: a disable raced an entry and enabling the account again failed; its entries are neither streamed nor reconciled until it is enabled");
    ApiError::AccountLeftDisabled {
        message: format!(
            "account {id} is left disabled: {why}, and enabling it again failed {ENABLE_ATTEMPTS} times ({failure}); disabled, it is neither streamed nor reconciled, so those entries' fills are not protected: enable it now with PATCH /v1/accounts/{id} {{\"active\": true}}"
        ),
        count,
        ids,
    }
}

/// `Err(account_has_open_entries)` while any entry of `id` still needs
/// following: its order can fill, or its filled coins are not known sold.
async fn refuse_if_open(state: &AppState, id: AccountId) -> Result<(), ApiError> {
    let open = state.store.open_entries(id).await?;
    if open.is_empty() {
        return Ok(());
    }
    let mut ids: Vec<i64> = open.iter().map(|e| e.id.0).collect();
    ids.sort_unstable();
    ids.truncate(LISTED_OPEN_ENTRIES);
    let resting = open.iter().filter(|e| !e.status.is_final()).count();
    let filled = open.len() - resting;
    let listed = ids
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let more = if open.len() > ids.len() { ", …" } else { "" };
    let entries = |n: usize| if n == 1 { "entry" } else { "entries" };
    let mut todo = Vec::new();
    if resting > 0 {
        todo.push(format!(
            "{resting} not final on the exchange yet: cancel them with DELETE /v1/entries/{{id}}"
        ));
    }
    if filled > 0 {
        todo.push(format!(
            "{filled} filled and still followed: wait until their protection closes them"
        ));
    }
    Err(ApiError::OpenEntries {
        message: format!(
            "account {id} has {} open {} ({listed}{more}); disabled, it would be neither streamed nor reconciled and they would lose their protection; {}",
            open.len(),
            entries(open.len()),
            todo.join("; ")
        ),
        count: open.len(),
        ids,
    })
}
