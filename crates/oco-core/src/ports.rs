//! The ports: what the domain needs from an exchange, a user-data stream, a
//! store and a clock. Adapters implement them; layers hold them as
//! `Arc<dyn …>`.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use rust_decimal::Decimal;
use secrecy::SecretString;

use crate::ids::{AccountId, ClientOrderId, EntryId, IdempotencyKey, LegKey, OcoClientIds};
use crate::model::{
    Account, Entry, EntryEventRecord, Evidence, Fill, Leg, LegClaim, LegUpdate, Millis, NewEntry,
    OrderSize, ProtectionConfig, Source,
};
use crate::money::{Price, Qty};
use crate::state::{EntryStatus, LegSold};
use crate::symbol::SymbolRules;

/// API credentials of one exchange account. `Debug` never shows the secret.
#[derive(Clone)]
pub struct ApiCredentials {
    /// Public key, sent as `X-MBX-APIKEY`.
    pub api_key: String,
    /// Signing secret.
    pub secret: SecretString,
}

impl fmt::Debug for ApiCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiCredentials")
            .field("api_key", &self.api_key)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// An exchange failure, classified by what the caller must do next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// Final refusal: record why; never retried as is.
    #[error("rejected by the exchange: {code} {msg}")]
    Rejected {
        /// Exchange error code.
        code: i32,
        /// Exchange message, word for word.
        msg: String,
    },
    /// The request may or may not have been applied: look the client id up,
    /// never resend blindly.
    #[error("outcome unknown: {0}")]
    UnknownOutcome(String),
    /// Too many requests: wait, then retry.
    #[error("rate limited, retry after {retry_after:?}")]
    RateLimited {
        /// How long to wait.
        retry_after: Duration,
    },
    /// Failed before reaching the exchange, or a read failed: back off and retry.
    #[error("transient: {0}")]
    Transient(String),
    /// Keys refused or revoked: stop using this account and report it.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The order or list does not exist.
    #[error("not found")]
    NotFound,
}

impl ExchangeError {
    /// True for a refusal because the account lacks the coins.
    pub fn is_insufficient_balance(&self) -> bool {
        matches!(self, Self::Rejected { msg, .. } if msg.contains("insufficient balance"))
    }

    /// True for a refusal by the minimum notional (`-1013 Filter failure:
    /// NOTIONAL` or `MIN_NOTIONAL`): the order's quantity is worth too little
    /// at the price the exchange measured it at.
    pub fn is_notional_filter(&self) -> bool {
        matches!(self, Self::Rejected { code: -1013, msg } if msg.contains("NOTIONAL"))
    }

    /// True for the SELL OCO price rule (the market already passed a level).
    pub fn is_bad_prices(&self) -> bool {
        matches!(self, Self::Rejected { msg, .. } if msg.contains("relationship of the prices")
            || msg.contains("would trigger immediately") || msg.contains("immediately match and take"))
    }

    /// True for the stop-order cap of the symbol.
    pub fn is_stop_budget(&self) -> bool {
        matches!(self, Self::Rejected { msg, .. } if msg.contains("MAX_NUM_ALGO_ORDERS")
            || msg.contains("MAX_NUM_ORDER_LISTS") || msg.contains("MAX_NUM_ORDERS"))
    }

    /// True for a duplicate client id: the order may already exist.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Self::Rejected { msg, .. } if msg.contains("Duplicate order"))
    }

    /// True for a refusal of the stop's order type on the symbol (`STOP_LOSS`
    /// or `STOP_LOSS_LIMIT` not in its `orderTypes`), whatever the code: the
    /// rules that allowed it were read before the symbol dropped it.
    pub fn is_stop_type_unsupported(&self) -> bool {
        matches!(self, Self::Rejected { msg, .. }
            if msg.contains(MARKET_STOP_UNSUPPORTED) || msg.contains(STOP_LIMIT_UNSUPPORTED))
    }
}

/// Binance's words when a symbol does not take `STOP_LOSS` ("Stop loss orders
/// are not supported for this symbol.").
pub(crate) const MARKET_STOP_UNSUPPORTED: &str = "Stop loss orders are not supported";
/// Binance's words when a symbol does not take `STOP_LOSS_LIMIT`.
pub(crate) const STOP_LIMIT_UNSUPPORTED: &str = "Stop loss limit orders are not supported";

/// Order side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Buy.
    Buy,
    /// Sell.
    Sell,
}

/// A plain order: an entry, or a market exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRequest {
    /// Symbol name.
    pub symbol: String,
    /// Side.
    pub side: Side,
    /// `None`: MARKET; `Some(p)`: LIMIT GTC at `p`.
    pub limit: Option<Price>,
    /// Size.
    pub size: OrderSize,
    /// Our client id.
    pub client_id: ClientOrderId,
}

/// An order as the exchange reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderSnapshot {
    /// Exchange order id.
    pub order_id: i64,
    /// Client id.
    pub client_id: String,
    /// Symbol.
    pub symbol: String,
    /// Status.
    pub status: EntryStatus,
    /// Cumulative filled base quantity.
    pub executed_qty: Qty,
    /// Cumulative quote.
    pub cumulative_quote: Decimal,
    /// Trades included in the answer (FULL responses); may be empty.
    pub fills: Vec<Fill>,
    /// Last update time.
    pub updated_at: Millis,
}

/// A protective SELL OCO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcoRequest {
    /// Symbol name.
    pub symbol: String,
    /// Quantity (both orders).
    pub qty: Qty,
    /// `LIMIT_MAKER` price above.
    pub take_profit: Price,
    /// Stop trigger below.
    pub stop: Price,
    /// Stop limit; `None` for a market stop.
    pub stop_limit: Option<Price>,
    /// Deterministic client ids.
    pub ids: OcoClientIds,
}

/// The exchange's acknowledgement of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcoAck {
    /// `orderListId`.
    pub list_id: i64,
    /// Take-profit order id.
    pub take_profit_order_id: i64,
    /// Stop order id.
    pub stop_order_id: i64,
}

/// How an order of a list stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOrderSnapshot {
    /// Client id.
    pub client_id: String,
    /// Status (the entry status enum covers every order status).
    pub status: EntryStatus,
    /// Filled so far.
    pub executed_qty: Qty,
    /// Quote transacted.
    pub cumulative_quote: Decimal,
    /// `expiryReason`, when expired.
    pub expiry_reason: Option<String>,
}

/// An order list as the exchange reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderListSnapshot {
    /// `orderListId`.
    pub list_id: i64,
    /// `listClientOrderId`.
    pub list_client_id: String,
    /// Symbol.
    pub symbol: String,
    /// False once `ALL_DONE`.
    pub executing: bool,
    /// The take-profit order, when the answer includes it.
    pub take_profit: Option<ListOrderSnapshot>,
    /// The stop order, when the answer includes it.
    pub stop_loss: Option<ListOrderSnapshot>,
}

/// Result of a cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Canceled now.
    Canceled,
    /// Not open (already filled, expired or canceled): look it up.
    NotOpen,
}

/// Result of canceling a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListCancelOutcome {
    /// Canceled now. Carries what its orders had executed until then, as
    /// the cancel's answer reports them (Binance: `orderReports[]`): final,
    /// as no order of a canceled list trades again. A take-profit that
    /// filled in part keeps its list executing, so a cancel can end a list
    /// that sold. `None` when the answer did not report both orders in a
    /// final state: look the list up.
    Canceled(Option<LegSold>),
    /// Not open (already filled, expired or canceled): look it up.
    NotOpen,
}

/// One asset's balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    /// Asset.
    pub asset: String,
    /// Free.
    pub free: Qty,
    /// Locked in open orders.
    pub locked: Qty,
}

/// The exchange, as the domain needs it. Every method that places or cancels
/// returns [`ExchangeError::UnknownOutcome`] when it cannot know the result.
#[async_trait]
pub trait Exchange: Send + Sync {
    /// The symbol's filters (cached by the adapter).
    async fn symbol_rules(&self, symbol: &str) -> Result<SymbolRules, ExchangeError>;
    /// Drops cached rules after a filter failure, so the next read is fresh.
    fn invalidate_rules(&self, symbol: &str);
    /// The symbol's filters when the adapter holds them fresh, without a
    /// request: for a path that must not wait for the exchange (a fill's
    /// first write). `None` sends the caller the long way.
    fn cached_symbol_rules(&self, _symbol: &str) -> Option<SymbolRules> {
        None
    }
    /// Last traded price.
    async fn last_price(&self, symbol: &str) -> Result<Price, ExchangeError>;
    /// Balances of the account.
    async fn balances(&self, creds: &ApiCredentials) -> Result<Vec<Balance>, ExchangeError>;
    /// Places an order, asking for the FULL response.
    async fn place_order(
        &self,
        creds: &ApiCredentials,
        order: &OrderRequest,
    ) -> Result<OrderSnapshot, ExchangeError>;
    /// Looks an order up by client id ([`ExchangeError::NotFound`] if absent).
    async fn query_order(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        client_id: &str,
    ) -> Result<OrderSnapshot, ExchangeError>;
    /// The trades of one order.
    async fn order_trades(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        order_id: i64,
    ) -> Result<Vec<Fill>, ExchangeError>;
    /// Cancels an order by client id.
    async fn cancel_order(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        client_id: &str,
    ) -> Result<CancelOutcome, ExchangeError>;
    /// Places a SELL OCO.
    async fn place_oco(
        &self,
        creds: &ApiCredentials,
        oco: &OcoRequest,
    ) -> Result<OcoAck, ExchangeError>;
    /// Looks a list up by `listClientOrderId`, with its orders' states
    /// (`Ok(None)` when the exchange has no such list).
    async fn order_list(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        list_client_id: &str,
    ) -> Result<Option<OrderListSnapshot>, ExchangeError>;
    /// Every open list of the account (one cheap call per account).
    async fn open_order_lists(
        &self,
        creds: &ApiCredentials,
    ) -> Result<Vec<OrderListSnapshot>, ExchangeError>;
    /// Cancels a list by `listClientOrderId`, answering what its orders had
    /// sold until then (see [`ListCancelOutcome`]).
    async fn cancel_order_list(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        list_client_id: &str,
    ) -> Result<ListCancelOutcome, ExchangeError>;
    /// The client ids of the account's open orders on `symbol`, the orders
    /// of lists included (Binance: one `openOrders` call, weight 6). A list
    /// keeps executing after its take-profit filled in part, with its stop
    /// canceled: the open lists alone cannot show that, the open orders can.
    /// `Ok(None)`: this exchange cannot say, and callers trust the lists.
    /// A wrapper must forward it, or the check it serves is silently off.
    async fn open_order_ids(
        &self,
        _creds: &ApiCredentials,
        _symbol: &str,
    ) -> Result<Option<Vec<String>>, ExchangeError> {
        Ok(None)
    }
    /// How long the account's new orders are held back, when `lists` more
    /// lists placed now would be refused as rate-limited rather than sent
    /// after a short wait (Binance counts new orders per account: a `-1015`
    /// hold in force for the key, or its daily count spent, last until the
    /// next UTC midnight at worst). Answered from what the adapter already
    /// knows, without a request. Cancels are not held: a replacement asks
    /// before it cancels, since lists canceled whose successors cannot go
    /// out leave the position without a stop until the hold ends. `None`
    /// (the default): placements go, or this exchange cannot say. A
    /// wrapper must forward it, or the check it serves is silently off.
    fn placements_held(&self, _creds: &ApiCredentials, _lists: u32) -> Option<Duration> {
        None
    }
}

/// An order update from the user-data stream (`executionReport`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionUpdate {
    /// Symbol.
    pub symbol: String,
    /// The order's own client id (for a cancel, the original id).
    pub client_id: String,
    /// Exchange order id.
    pub order_id: i64,
    /// `orderListId`, −1 when not in a list.
    pub list_id: i64,
    /// Side.
    pub side: Side,
    /// Order type as the exchange spells it.
    pub order_type: String,
    /// Execution type (`NEW`, `TRADE`, `CANCELED`, `EXPIRED`, …).
    pub execution: String,
    /// Order status after this event.
    pub status: EntryStatus,
    /// Cumulative filled.
    pub executed_qty: Qty,
    /// Cumulative quote.
    pub cumulative_quote: Decimal,
    /// The trade, when `execution` is `TRADE`.
    pub fill: Option<Fill>,
    /// `eR`, when present.
    pub expiry_reason: Option<String>,
    /// Event time.
    pub event_time: Millis,
}

/// A list update from the user-data stream (`listStatus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListUpdate {
    /// Symbol.
    pub symbol: String,
    /// `orderListId`.
    pub list_id: i64,
    /// `listClientOrderId`.
    pub list_client_id: String,
    /// False once `ALL_DONE`.
    pub executing: bool,
    /// Event time.
    pub event_time: Millis,
}

/// What a user-data stream delivers.
///
/// Contract for adapters: `Connected` comes first after every (re)subscription;
/// after a reconnect it is followed at once by `Gap` covering the time nothing
/// could be delivered. Consumers flag the account for reconciliation on both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Subscribed (first time or after a reconnect).
    Connected,
    /// Nothing was delivered between `from` and `to`: events may be lost, so
    /// the account needs reconciliation. Nothing is replayed.
    Gap {
        /// Last moment the stream was known healthy.
        from: Millis,
        /// Moment it was healthy again.
        to: Millis,
    },
    /// An order update.
    Execution(ExecutionUpdate),
    /// A list update.
    List(ListUpdate),
    /// Balances that changed.
    Balances(Vec<Balance>),
}

/// One account's user-data stream. Reconnects happen inside and surface as
/// [`StreamEvent::Gap`].
#[async_trait]
pub trait UserStreamSession: Send {
    /// The next event; `Err` when the stream cannot go on (keys revoked).
    async fn next_event(&mut self) -> Result<StreamEvent, ExchangeError>;

    /// The next event if one has already arrived, without waiting: lets a
    /// consumer see that a later update supersedes the one in hand. `None`
    /// when nothing is buffered (always, by default). An `Err` returned here
    /// is returned again by `next_event`.
    fn ready_event(&mut self) -> Option<Result<StreamEvent, ExchangeError>> {
        None
    }
}

/// Opens user-data streams.
#[async_trait]
pub trait UserStream: Send + Sync {
    /// Subscribes to the account's events.
    async fn open(
        &self,
        creds: &ApiCredentials,
    ) -> Result<Box<dyn UserStreamSession>, ExchangeError>;
}

/// A store failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No such record.
    #[error("{what} {id} not found")]
    NotFound {
        /// Kind of record.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The input breaks a rule of the store (duplicate, bad reference).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The account is disabled, so no entry is stored on it (an entry there
    /// would be neither streamed nor reconciled): enable it first. Nothing
    /// was written.
    #[error("account {account} is disabled; enable it first")]
    AccountInactive {
        /// The disabled account.
        account: AccountId,
    },
    /// The entry's idempotency key is already its account's, on the entry
    /// it carries, as stored now: nothing was written. Not a failure for the
    /// caller to retry: the request was made before, and this is its entry
    /// (as `HashMap::try_insert` answers with the occupant).
    #[error("idempotency key already used by entry {}", .0.id)]
    IdempotencyKeyUsed(Box<Entry>),
    /// The database could not be reached or failed: retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be read back (corruption, wrong key).
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// A new account and its secret.
#[derive(Debug, Clone)]
pub struct NewAccount {
    /// Owning user.
    pub owner: String,
    /// Exchange name.
    pub exchange: String,
    /// Credentials (the store keeps the secret encrypted).
    pub credentials: ApiCredentials,
    /// Protection settings.
    pub protection: ProtectionConfig,
}

/// Persistence, as the domain needs it. Claims are atomic and evidence is
/// monotonic, whichever process writes.
#[async_trait]
pub trait Store: Send + Sync {
    /// Registers an account.
    async fn create_account(&self, account: NewAccount) -> Result<Account, StoreError>;
    /// One account.
    async fn account(&self, id: AccountId) -> Result<Account, StoreError>;
    /// The account's credentials, decrypted.
    async fn credentials(&self, id: AccountId) -> Result<ApiCredentials, StoreError>;
    /// Changes an account's protection settings, its active flag, or both;
    /// `None` leaves that one as it is in the store, whatever the caller
    /// read before: a settings change never writes back an active flag
    /// that another request changed meanwhile. Both `None`: the account as
    /// it is.
    async fn update_account(
        &self,
        id: AccountId,
        protection: Option<ProtectionConfig>,
        active: Option<bool>,
    ) -> Result<Account, StoreError>;
    /// Active accounts.
    async fn active_accounts(&self) -> Result<Vec<Account>, StoreError>;

    /// Persists an entry before it is sent; assigns its id and client id
    /// from `client_id_of`. Only while its account is active, checked in the
    /// same atomic step as the insert, which holds the account's row until it
    /// commits: a disable written before it makes it fail, storing nothing,
    /// and one written after it sees the entry in
    /// [`Store::open_entries`] read once its write has returned.
    ///
    /// An entry with an idempotency key is stored only if its account has
    /// no entry under that key, in the same atomic step: of two calls with
    /// the same key, however close, one stores the entry and the other
    /// answers with it, storing nothing.
    ///
    /// # Errors
    /// [`StoreError::IdempotencyKeyUsed`] with the entry already stored
    /// under the key (whether or not the account is still active),
    /// [`StoreError::AccountInactive`] when the account is disabled,
    /// `NotFound` when there is no such account.
    async fn create_entry(
        &self,
        entry: NewEntry,
        client_id_of: &(dyn Fn(EntryId) -> ClientOrderId + Send + Sync),
        at: Millis,
    ) -> Result<Entry, StoreError>;
    /// Frees the idempotency key entry `id` was stored under, if it has one;
    /// the entry itself stays as it is. For an entry whose order was never
    /// sent (refused before it reached the exchange): a resend of its
    /// request under the same key is then a new entry, not this one. A key
    /// another entry took since is left alone.
    ///
    /// # Errors
    /// `NotFound` when there is no entry `id`.
    async fn release_idempotency_key(&self, id: EntryId) -> Result<(), StoreError>;
    /// One entry.
    async fn entry(&self, id: EntryId) -> Result<Entry, StoreError>;
    /// The entries of an account whose position is not settled: the order can
    /// still fill, or filled coins are not yet known sold.
    async fn open_entries(&self, account: AccountId) -> Result<Vec<Entry>, StoreError>;
    /// Merges evidence without ever lowering what is known: fills by trade id,
    /// executed quantity and quote by maximum, status only forward.
    async fn record_evidence(&self, id: EntryId, evidence: &Evidence) -> Result<Entry, StoreError>;
    /// [`Store::record_evidence`] for an update seen on `account`'s stream:
    /// `None`, with nothing written, when there is no entry `id` of that
    /// account (a client id of ours seen on another account must not touch
    /// the entry). Stores override it to check and write in one go; the
    /// default reads the entry first.
    async fn record_evidence_of(
        &self,
        account: AccountId,
        id: EntryId,
        evidence: &Evidence,
    ) -> Result<Option<Entry>, StoreError> {
        match self.entry(id).await {
            Ok(entry) if entry.account == account => {
                self.record_evidence(id, evidence).await.map(Some)
            }
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
    /// The caller follows `account`'s stream from now on (it took the
    /// account's lease): a store may keep what speeds its fills up (the
    /// account's keys, its entries as accepted or read ahead of their
    /// fills), until [`Store::unfollowed`]. A store keeps none of that for
    /// an account not followed, whatever [`Store::record_evidence_of`] is
    /// told. Nothing stored changes; stores that keep nothing ignore it.
    fn following(&self, account: AccountId) {
        let _ = account;
    }
    /// The caller no longer follows `account`'s stream (its lease was lost
    /// or released): whatever the store kept to speed that stream up is
    /// dropped, its decrypted keys first. Nothing stored changes; stores
    /// that keep nothing ignore it.
    fn unfollowed(&self, account: AccountId) {
        let _ = account;
    }
    /// Sets the entry's protection state, unless it is `Closed`: a closed
    /// entry stays closed ([`crate::mem::is_settled`]), as the write may come
    /// from a copy of the entry read before it closed. Any state but
    /// `Exited` drops a result an exit recorded ([`Store::exit_entry`]):
    /// the entry holds coins again, and its close will say the result.
    async fn set_protection(
        &self,
        id: EntryId,
        protection: &crate::model::Protection,
    ) -> Result<(), StoreError>;
    /// Closes the entry with its realised result. Closing a closed entry
    /// again (a sale recorded after it closed) replaces the result; a store
    /// that keeps the close time keeps the first.
    async fn close_entry(
        &self,
        id: EntryId,
        realized: crate::model::Realized,
        at: Millis,
    ) -> Result<(), StoreError>;
    /// Records that the entry's coins were sold at market (protection came
    /// too late): protection `Exited` with `reason` and the realised result,
    /// computed as a close computes it, in one write; unless the entry is
    /// `Closed` (as [`Store::set_protection`]). Recording it again (a sale of
    /// the exit recorded later) replaces both. Coins filled after the exit
    /// reopen the entry ([`Store::record_evidence`]) and drop the result.
    ///
    /// A compare-and-set on `read`, the entry as the caller read it: written
    /// only if its executed quantity and protection are still those, so a
    /// stale exit never writes `Exited` over an entry a fill reopened.
    /// `Ok(false)`: the entry changed (or is closed); nothing written.
    async fn exit_entry(
        &self,
        id: EntryId,
        reason: &str,
        realized: crate::model::Realized,
        read: &Entry,
    ) -> Result<bool, StoreError>;

    /// The entry's legs, every generation.
    async fn legs(&self, entry: EntryId) -> Result<Vec<Leg>, StoreError>;
    /// Claims a leg. `Ok(false)`: another caller holds it.
    async fn claim_leg(&self, claim: &LegClaim) -> Result<bool, StoreError>;
    /// Applies `update` if the leg is still in `update.from`; `Ok(false)` if not.
    async fn update_leg(&self, update: &LegUpdate) -> Result<bool, StoreError>;
    /// Takes a leg over from a claimant that went quiet: [`Store::update_leg`],
    /// applied only if the leg is still in `update.from` and was last written
    /// (claimed, fenced, or moved to `from`) more than `stale_after` before
    /// `update.at`. The staleness is checked in the same atomic step as the
    /// state, so a claimant that fenced its claim in between (see
    /// [`Store::fence_legs`]) keeps it, and one that did not finds its fence
    /// refused and sends nothing.
    async fn take_over_leg(
        &self,
        update: &LegUpdate,
        stale_after: Duration,
    ) -> Result<bool, StoreError>;
    /// Fences claimed legs right before they are sent: each leg still
    /// `claimed` (nobody took it over) is stamped as written at `at`, so that
    /// a takeover must wait out the claim timeout from now, not from the
    /// claim. Element `i` tells whether `keys[i]` was fenced; a leg that was
    /// not must not be sent. One durable write for all of them (by default
    /// one [`Store::record_outcomes`] call, which is one statement in
    /// PostgreSQL).
    async fn fence_legs(
        &self,
        entry: EntryId,
        keys: &[LegKey],
        at: Millis,
    ) -> Result<Vec<bool>, StoreError> {
        let updates: Vec<LegUpdate> = keys
            .iter()
            .map(|key| LegUpdate {
                key: *key,
                from: "claimed",
                to: crate::state::LegState::Claimed,
                error: None,
                at,
            })
            .collect();
        Ok(self
            .record_outcomes(entry, &updates, &[], None)
            .await?
            .applied)
    }
    /// Raises what a leg has sold (never lowers it).
    async fn record_leg_sold(
        &self,
        key: LegKey,
        sold: LegSold,
        at: Millis,
    ) -> Result<(), StoreError>;
    /// Records trades of leg `key`'s `side` order, each once by trade id
    /// (unique per account and symbol), and adds them to the leg's
    /// [`crate::model::LegTrades`]: a trade reported twice (by the stream and
    /// by a lookup) counts once, its commission with it.
    async fn record_leg_trades(
        &self,
        key: LegKey,
        side: crate::model::SaleSide,
        trades: &[Fill],
    ) -> Result<(), StoreError>;

    /// Appends to the entry's history.
    async fn append_event(&self, event: &EntryEventRecord) -> Result<(), StoreError>;
    /// The entry's history, oldest first.
    async fn events(&self, entry: EntryId) -> Result<Vec<EntryEventRecord>, StoreError>;

    /// Flags an account for immediate reconciliation.
    async fn flag_reconcile(
        &self,
        account: AccountId,
        reason: &str,
        at: Millis,
    ) -> Result<(), StoreError>;
    /// Flags several accounts, each with its reason, as
    /// [`Store::flag_reconcile`] does one: a gateway opening many streams at
    /// once flags them in a few writes instead of one each. An unknown account
    /// fails the call; the default flags one by one (those before it stay
    /// flagged), a store may write them all in one statement (then none is).
    async fn flag_reconcile_many(
        &self,
        flags: &[(AccountId, String)],
        at: Millis,
    ) -> Result<(), StoreError> {
        for (account, reason) in flags {
            self.flag_reconcile(*account, reason, at).await?;
        }
        Ok(())
    }
    /// Takes up to `limit` flagged accounts, clearing their flags; concurrent
    /// takers never get the same account.
    async fn take_flagged(&self, limit: usize) -> Result<Vec<AccountId>, StoreError>;

    /// Takes up to `limit` active accounts due for their periodic
    /// reconciliation (never reconciled, or last reconciled `interval` or
    /// longer ago) that no live pass has taken, and marks them taken by
    /// `holder` for `lease`. Concurrent takers never get the same account; an
    /// account taken but not [marked reconciled](Store::mark_reconciled)
    /// within `lease` (its taker died or failed) is due again. An account
    /// with a [deferred](Store::defer_reconcile) reconciliation is due when
    /// its retry is, whatever its last reconciliation. Oldest first.
    async fn take_due_accounts(
        &self,
        holder: &str,
        interval: Duration,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<AccountId>, StoreError>;
    /// Records that `account` was reconciled just now by a pass that began
    /// at `since` (on this process's monotonic clock), ending any take of it
    /// and any [deferred](Store::defer_reconcile) retry written before
    /// `since`: it is next due `interval` from now. A retry written since
    /// (another process's pass of the account failed meanwhile) stays: this
    /// pass may have read the account before what that one found.
    async fn mark_reconciled(
        &self,
        account: AccountId,
        since: std::time::Instant,
    ) -> Result<(), StoreError>;
    /// Records that a pass of `account` left work undone (a protection
    /// refused or unanswered, an entry unread): it is not marked reconciled,
    /// and it is due again `after` from now, not before, whatever its last
    /// reconciliation, for whichever process takes it then
    /// ([`Store::take_due_retries`], [`Store::take_due_accounts`]), this one
    /// or another, after a restart too. Ends any take of the account and
    /// replaces an earlier retry; [`Store::mark_reconciled`] of a pass
    /// begun after it clears it.
    async fn defer_reconcile(&self, account: AccountId, after: Duration) -> Result<(), StoreError>;
    /// Takes up to `limit` active accounts whose [deferred](Store::defer_reconcile)
    /// retry is due and that no live pass has taken, and marks them taken by
    /// `holder` for `lease`, as [`Store::take_due_accounts`] does: concurrent
    /// takers never get the same account, and one taken but neither marked
    /// nor deferred again within `lease` is due again. Accounts only due for
    /// their periodic reconciliation are not taken. Longest due first.
    async fn take_due_retries(
        &self,
        holder: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<AccountId>, StoreError>;

    /// Claims several legs in one durable write (one commit instead of one per
    /// leg); element `i` tells whether `claims[i]` was won. Each leg is won by
    /// exactly one caller, and the legs of one generation of an entry are won
    /// together or not at all: the lowest leg of them in `claims` (a plan's
    /// first leg), whatever their order, decides, and the others are claimed
    /// only if it was. Racing claimers whose plans differ in shape (one leg
    /// from a smaller fill, two from a larger) thus never split a generation
    /// between them.
    async fn claim_legs(&self, claims: &[LegClaim]) -> Result<Vec<bool>, StoreError>;
    /// Records what a placement ended in, all or nothing in one durable write:
    /// each of `updates` as [`Store::update_leg`] (`applied[i]` of the answer
    /// tells whether `updates[i]` applied), then `events` appended to the
    /// entry's history, then the entry's protection set to `protection` if
    /// given and the entry is not `Closed` (as [`Store::set_protection`]:
    /// a placer's copy of the entry may predate its close). The answer also
    /// holds the entry as read after the write, so that the placer sees
    /// fills recorded while it placed without another call.
    async fn record_outcomes(
        &self,
        entry: EntryId,
        updates: &[LegUpdate],
        events: &[EntryEventRecord],
        protection: Option<&crate::model::Protection>,
    ) -> Result<RecordedOutcomes, StoreError>;

    /// `account`'s keys and settings and entry `id`'s legs, read in
    /// parallel: one round trip of latency, not three.
    async fn fill_context(
        &self,
        account: AccountId,
        id: EntryId,
    ) -> Result<FillContext, StoreError> {
        let (credentials, settings, legs) = futures_util::future::join3(
            self.credentials(account),
            self.account(account),
            self.legs(id),
        )
        .await;
        Ok(FillContext {
            credentials: credentials?,
            account: settings?,
            legs: legs?,
        })
    }

    /// A fill seen on `account`'s stream, on its way to protection:
    /// [`Store::record_evidence_of`], the [`FillContext`] read alongside, and
    /// the claims `plan` makes from the merged entry. `None`, with nothing
    /// written, when the entry is not that account's. The default records
    /// and then claims; a store may write the evidence and the claims in one
    /// durable write (the claims only if the evidence went in), so that a
    /// first fill waits for one commit before its legs go out.
    async fn record_fill_and_claim(
        &self,
        account: AccountId,
        id: EntryId,
        evidence: &Evidence,
        plan: &ClaimPlanner<'_>,
    ) -> Result<Option<RecordedFill>, StoreError> {
        let (recorded, context) = futures_util::future::join(
            self.record_evidence_of(account, id, evidence),
            self.fill_context(account, id),
        )
        .await;
        let Some(entry) = recorded? else {
            return Ok(None);
        };
        let context = context?;
        let claims = plan(&entry, &context);
        let won = if claims.is_empty() {
            Vec::new()
        } else {
            self.claim_legs(&claims).await?
        };
        Ok(Some(RecordedFill {
            entry,
            context,
            claims,
            won,
        }))
    }
}

/// What protecting a fill reads besides the entry: the account's keys and
/// settings and the entry's legs.
#[derive(Debug, Clone)]
pub struct FillContext {
    /// The account's credentials.
    pub credentials: ApiCredentials,
    /// The account and its protection settings.
    pub account: Account,
    /// The entry's legs, every generation.
    pub legs: Vec<Leg>,
}

/// Plans, from an entry as merged with new evidence and its context, the
/// legs to claim in the same write: empty when nothing can be claimed
/// without more checks (legs exist, levels or plan fail), and the caller
/// decides the long way. Pure, and may be called more than once.
pub type ClaimPlanner<'a> = dyn Fn(&Entry, &FillContext) -> Vec<LegClaim> + Send + Sync + 'a;

/// What [`Store::record_outcomes`] wrote, and the entry after it.
#[derive(Debug, Clone)]
pub struct RecordedOutcomes {
    /// Element `i`: whether `updates[i]` applied (the leg was in its `from` state).
    pub applied: Vec<bool>,
    /// The entry as read after the write.
    pub entry: Entry,
}

/// What [`Store::record_fill_and_claim`] wrote.
#[derive(Debug, Clone)]
pub struct RecordedFill {
    /// The entry with the evidence merged.
    pub entry: Entry,
    /// Keys, settings and legs as read before the write (`legs` does not
    /// hold the claims below).
    pub context: FillContext,
    /// What the planner asked to claim, from `entry` and `context`.
    pub claims: Vec<LegClaim>,
    /// Element `i`: whether `claims[i]` was won, as [`Store::claim_legs`].
    pub won: Vec<bool>,
}

/// Which gateway process holds which account's stream. Leases expire, so the
/// accounts of a process that died move to a live one; the store's own clock
/// decides expiry, so that processes with skewed clocks agree.
#[async_trait]
pub trait Leases: Send + Sync {
    /// Takes up to `max` more active accounts whose lease is free or expired,
    /// for `ttl`. Returns the accounts newly taken and, for each, whether it
    /// was taken over from another holder (its events may have been missed).
    async fn acquire_leases(
        &self,
        holder: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<(AccountId, bool)>, StoreError>;
    /// Extends every lease `holder` still has; returns those accounts.
    async fn renew_leases(&self, holder: &str, ttl: Duration)
    -> Result<Vec<AccountId>, StoreError>;
    /// Gives up every lease of `holder`.
    async fn release_leases(&self, holder: &str) -> Result<(), StoreError>;
}

/// Users of the entry API and what they own. Tokens are stored only as hashes.
#[async_trait]
pub trait Users: Send + Sync {
    /// Registers a user with the hash of their API token
    /// ([`StoreError::Conflict`] when the name is taken).
    async fn create_user(&self, name: &str, token_hash: &str) -> Result<(), StoreError>;
    /// The name of the user whose token hashes to `token_hash`.
    async fn user_by_token(&self, token_hash: &str) -> Result<Option<String>, StoreError>;
    /// The accounts a user owns.
    async fn accounts_of(&self, owner: &str) -> Result<Vec<Account>, StoreError>;
    /// An account's entries, newest first, optionally only those in `status`.
    async fn entries_of(
        &self,
        account: AccountId,
        status: Option<EntryStatus>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError>;
    /// The account's entry stored under `key`, if any
    /// ([`crate::model::NewEntry::idempotency_key`]).
    async fn entry_by_idempotency_key(
        &self,
        account: AccountId,
        key: &IdempotencyKey,
    ) -> Result<Option<Entry>, StoreError>;
}

/// Time, injected so that tests control it.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Millis;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Millis(i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
    }
}

/// Shorthand used by [`Store::events`] callers.
pub fn event(
    entry: EntryId,
    kind: &str,
    detail: impl Into<String>,
    source: Option<Source>,
    at: Millis,
) -> EntryEventRecord {
    EntryEventRecord {
        entry,
        kind: kind.to_owned(),
        detail: detail.into(),
        source,
        at,
    }
}

/// An entry with filled coins and no protection in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnprotectedEntry {
    /// The entry.
    pub entry: EntryId,
    /// Its account.
    pub account: AccountId,
    /// Its client order id.
    pub client_id: String,
    /// Symbol.
    pub symbol: String,
    /// First fill seen: the age of the exposure counts from here.
    pub filled_at: Millis,
    /// `unprotected`, or `unprotectable` when no placement can cover it.
    pub state: &'static str,
}

/// How protection stands over a set of accounts, as the store records it
/// (the truth shared by every process).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CoverageReport {
    /// Entries with filled coins still held: protected, unprotected or
    /// unprotectable (closed and exited entries hold nothing).
    pub filled: u64,
    /// Of those, entries covered by placed legs.
    pub protected: u64,
    /// Of those, entries not covered (`filled − protected`).
    pub unprotected_count: u64,
    /// The oldest unprotected entries, oldest first, at most the limit asked.
    pub unprotected: Vec<UnprotectedEntry>,
    /// Protective lists the exchange acknowledged, by the layer that placed
    /// them (every layer is listed, zero included).
    pub placements: Vec<(Source, u64)>,
}

impl CoverageReport {
    /// Protected share of the filled entries in parts per million
    /// (1,000,000 when nothing is filled: nothing is exposed).
    pub fn ratio_ppm(&self) -> u64 {
        if self.filled == 0 {
            return 1_000_000;
        }
        self.protected.saturating_mul(1_000_000) / self.filled
    }
}

/// Coverage queries over the store, for metrics and the coverage page.
#[async_trait]
pub trait Coverage: Send + Sync {
    /// Coverage of `owner`'s accounts, or of every account when `None`;
    /// lists at most `limit` unprotected entries.
    async fn coverage(
        &self,
        owner: Option<&str>,
        limit: usize,
    ) -> Result<CoverageReport, StoreError>;
    /// The latest history lines of `owner`'s entries, newest first.
    async fn recent_events(
        &self,
        owner: &str,
        limit: usize,
    ) -> Result<Vec<EntryEventRecord>, StoreError>;
}
