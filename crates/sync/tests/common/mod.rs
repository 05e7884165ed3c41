//! Shared test world: `MemStore`, the `FakeExchange` behind a scriptable
//! wrapper, a test clock, and helpers that play the other layers' parts.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use oco_core::ids::{EntryId, IdScheme};
use oco_core::levels::EntryLevels;
use oco_core::mem::MemStore;
use oco_core::model::{EntryKind, EntryTags, Millis, NewEntry, OrderSize, ProtectionConfig};
use oco_core::ports::{
    ApiCredentials, Balance, CancelOutcome, Clock, Exchange, ExchangeError, ListCancelOutcome,
    NewAccount, OcoAck, OcoRequest, OrderListSnapshot, OrderRequest, OrderSnapshot, Side, Store,
};
use oco_core::protect::{Protector, ProtectorConfig};
use oco_core::testing::{FakeExchange, btcusdt_rules};
use oco_core::{AccountId, Fill, Price, Qty, SymbolRules};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use secrecy::SecretString;
use sync::{Reconciler, SyncConfig};

pub struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now(&self) -> Millis {
        Millis(self.0.load(Ordering::SeqCst))
    }
}

impl TestClock {
    pub fn advance(&self, d: Duration) {
        self.0
            .fetch_add(i64::try_from(d.as_millis()).unwrap(), Ordering::SeqCst);
    }
}

/// The fake exchange with faults the double itself lacks: refused keys,
/// rate limits, Binance-like order lookups without trades, and call counts.
pub struct TestExchange {
    pub fake: Arc<FakeExchange>,
    revoked: Mutex<HashSet<String>>,
    fail_open_lists: Mutex<(u32, Option<ExchangeError>)>,
    hold_open_lists: Mutex<Option<Arc<tokio::sync::Notify>>>,
    fail_queries_of: Mutex<HashMap<String, ExchangeError>>,
    query_without_fills: AtomicBool,
    fail_trades: Mutex<Option<ExchangeError>>,
    fail_rules: Mutex<Option<ExchangeError>>,
    trades_fee_in_base: Mutex<Option<Decimal>>,
    calls: Mutex<HashMap<(String, &'static str), usize>>,
}

impl TestExchange {
    fn new(fake: Arc<FakeExchange>) -> Self {
        Self {
            fake,
            revoked: Mutex::new(HashSet::new()),
            fail_open_lists: Mutex::new((0, None)),
            hold_open_lists: Mutex::new(None),
            fail_queries_of: Mutex::new(HashMap::new()),
            query_without_fills: AtomicBool::new(false),
            fail_trades: Mutex::new(None),
            fail_rules: Mutex::new(None),
            trades_fee_in_base: Mutex::new(None),
            calls: Mutex::new(HashMap::new()),
        }
    }

    pub fn revoke(&self, api_key: &str) {
        self.revoked.lock().unwrap().insert(api_key.to_owned());
    }

    /// Undoes [`Self::revoke`].
    pub fn restore(&self, api_key: &str) {
        self.revoked.lock().unwrap().remove(api_key);
    }

    /// Every lookup of the order `client_id` fails with `error`.
    pub fn fail_queries_of(&self, client_id: &str, error: ExchangeError) {
        self.fail_queries_of
            .lock()
            .unwrap()
            .insert(client_id.to_owned(), error);
    }

    /// The next `times` open-list reads fail with `error`.
    pub fn fail_open_lists(&self, times: u32, error: ExchangeError) {
        *self.fail_open_lists.lock().unwrap() = (times, Some(error));
    }

    /// The next open-list read waits until the returned bell rings (once
    /// is enough, before or after the read began).
    pub fn hold_next_open_lists(&self) -> Arc<tokio::sync::Notify> {
        let bell = Arc::new(tokio::sync::Notify::new());
        *self.hold_open_lists.lock().unwrap() = Some(bell.clone());
        bell
    }

    /// Order lookups answer like Binance's `GET order`: no trades inside.
    pub fn query_without_fills(&self) {
        self.query_without_fills.store(true, Ordering::SeqCst);
    }

    /// Every trade-list read (`myTrades`) fails with `error` while it is set.
    pub fn fail_trades(&self, error: Option<ExchangeError>) {
        *self.fail_trades.lock().unwrap() = error;
    }

    /// Every read of a symbol's rules (`exchangeInfo`) fails with `error`
    /// while it is set.
    pub fn fail_rules(&self, error: Option<ExchangeError>) {
        *self.fail_rules.lock().unwrap() = error;
    }

    /// The trades read (`myTrades`) each carry a commission of `fee` paid in
    /// BTC, the base asset of the one symbol tests trade (the double charges
    /// its buys none).
    pub fn trades_fee_in_base(&self, fee: Decimal) {
        *self.trades_fee_in_base.lock().unwrap() = Some(fee);
    }

    /// Calls of `method` made with `api_key`.
    pub fn calls(&self, api_key: &str, method: &'static str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .get(&(api_key.to_owned(), method))
            .copied()
            .unwrap_or(0)
    }

    /// Every call made with `api_key`.
    pub fn all_calls(&self, api_key: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|((k, _), _)| k == api_key)
            .map(|(_, n)| n)
            .sum()
    }

    fn check(&self, creds: &ApiCredentials, method: &'static str) -> Result<(), ExchangeError> {
        *self
            .calls
            .lock()
            .unwrap()
            .entry((creds.api_key.clone(), method))
            .or_default() += 1;
        if self.revoked.lock().unwrap().contains(&creds.api_key) {
            return Err(ExchangeError::Auth(
                "-2015 Invalid API-key, IP, or permissions for action.".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Exchange for TestExchange {
    async fn symbol_rules(&self, symbol: &str) -> Result<SymbolRules, ExchangeError> {
        if let Some(err) = self.fail_rules.lock().unwrap().clone() {
            return Err(err);
        }
        self.fake.symbol_rules(symbol).await
    }
    fn invalidate_rules(&self, symbol: &str) {
        self.fake.invalidate_rules(symbol);
    }
    fn placements_held(&self, creds: &ApiCredentials, lists: u32) -> Option<Duration> {
        self.fake.placements_held(creds, lists)
    }
    async fn last_price(&self, symbol: &str) -> Result<Price, ExchangeError> {
        self.fake.last_price(symbol).await
    }
    async fn balances(&self, creds: &ApiCredentials) -> Result<Vec<Balance>, ExchangeError> {
        self.check(creds, "balances")?;
        self.fake.balances(creds).await
    }
    async fn place_order(
        &self,
        creds: &ApiCredentials,
        order: &OrderRequest,
    ) -> Result<OrderSnapshot, ExchangeError> {
        self.check(creds, "place_order")?;
        self.fake.place_order(creds, order).await
    }
    async fn query_order(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        client_id: &str,
    ) -> Result<OrderSnapshot, ExchangeError> {
        self.check(creds, "query_order")?;
        if let Some(err) = self.fail_queries_of.lock().unwrap().get(client_id) {
            return Err(err.clone());
        }
        let mut snap = self.fake.query_order(creds, symbol, client_id).await?;
        if self.query_without_fills.load(Ordering::SeqCst) {
            snap.fills.clear();
        }
        Ok(snap)
    }
    async fn order_trades(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        order_id: i64,
    ) -> Result<Vec<Fill>, ExchangeError> {
        self.check(creds, "order_trades")?;
        if let Some(err) = self.fail_trades.lock().unwrap().clone() {
            return Err(err);
        }
        let mut trades = self.fake.order_trades(creds, symbol, order_id).await?;
        if let Some(fee) = *self.trades_fee_in_base.lock().unwrap() {
            for trade in &mut trades {
                trade.commission = fee;
                trade.commission_asset = btcusdt_rules().symbol.base;
            }
        }
        Ok(trades)
    }
    async fn cancel_order(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        client_id: &str,
    ) -> Result<CancelOutcome, ExchangeError> {
        self.check(creds, "cancel_order")?;
        self.fake.cancel_order(creds, symbol, client_id).await
    }
    async fn place_oco(
        &self,
        creds: &ApiCredentials,
        oco: &OcoRequest,
    ) -> Result<OcoAck, ExchangeError> {
        self.check(creds, "place_oco")?;
        self.fake.place_oco(creds, oco).await
    }
    async fn order_list(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        list_client_id: &str,
    ) -> Result<Option<OrderListSnapshot>, ExchangeError> {
        self.check(creds, "order_list")?;
        self.fake.order_list(creds, symbol, list_client_id).await
    }
    async fn open_order_ids(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
    ) -> Result<Option<Vec<String>>, ExchangeError> {
        self.check(creds, "open_order_ids")?;
        self.fake.open_order_ids(creds, symbol).await
    }
    async fn open_order_lists(
        &self,
        creds: &ApiCredentials,
    ) -> Result<Vec<OrderListSnapshot>, ExchangeError> {
        self.check(creds, "open_order_lists")?;
        let hold = self.hold_open_lists.lock().unwrap().take();
        if let Some(bell) = hold {
            bell.notified().await;
        }
        let fault = {
            let mut f = self.fail_open_lists.lock().unwrap();
            if f.0 > 0 {
                f.0 -= 1;
                f.1.clone()
            } else {
                None
            }
        };
        if let Some(err) = fault {
            return Err(err);
        }
        self.fake.open_order_lists(creds).await
    }
    async fn cancel_order_list(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        list_client_id: &str,
    ) -> Result<ListCancelOutcome, ExchangeError> {
        self.check(creds, "cancel_order_list")?;
        self.fake
            .cancel_order_list(creds, symbol, list_client_id)
            .await
    }
}

pub struct Acct {
    pub id: AccountId,
    pub creds: ApiCredentials,
}

pub struct World {
    pub fake: Arc<FakeExchange>,
    pub exchange: Arc<TestExchange>,
    pub store: Arc<MemStore>,
    pub clock: Arc<TestClock>,
    pub protector: Arc<Protector>,
    pub ids: IdScheme,
}

pub fn q(d: Decimal) -> Qty {
    Qty::new(d).unwrap()
}

pub fn p(d: Decimal) -> Price {
    Price::new(d).unwrap()
}

/// Settings for tests: no startup delay, a short flag poll, a budget that
/// never binds unless a test says so.
pub fn config() -> SyncConfig {
    let mut c = SyncConfig::standard();
    c.startup_delay = Duration::ZERO;
    c.flag_poll = Duration::from_millis(50);
    c.weight_budget_per_minute = 1_000_000;
    c.order_budget_per_10s = 1_000;
    c
}

pub fn world() -> World {
    let fake = Arc::new(FakeExchange::new());
    fake.add_symbol(btcusdt_rules(), p(dec!(100)));
    let exchange = Arc::new(TestExchange::new(fake.clone()));
    let store = Arc::new(MemStore::new());
    let clock = Arc::new(TestClock(AtomicI64::new(1_000_000)));
    let ids = IdScheme::new("og").unwrap();
    let protector = Arc::new(Protector::new(
        exchange.clone(),
        store.clone(),
        clock.clone(),
        ProtectorConfig::new(ids.clone()),
    ));
    World {
        fake,
        exchange,
        store,
        clock,
        protector,
        ids,
    }
}

impl World {
    pub fn reconciler(&self, config: SyncConfig) -> Reconciler {
        Reconciler::new(
            self.exchange.clone(),
            self.store.clone(),
            self.clock.clone(),
            self.protector.clone(),
            config,
        )
    }

    /// A reconciler wired as the binaries wire it: the calls `protect` makes
    /// go through the same metered exchange as the reconciler's reads.
    pub fn wired_reconciler(&self, config: SyncConfig) -> Reconciler {
        Reconciler::wired(
            self.exchange.clone(),
            self.store.clone(),
            self.clock.clone(),
            ProtectorConfig::new(self.ids.clone()),
            config,
        )
    }

    pub async fn account(&self, api_key: &str) -> Acct {
        let creds = ApiCredentials {
            api_key: api_key.into(),
            secret: SecretString::from("s"),
        };
        let account = self
            .store
            .create_account(NewAccount {
                owner: format!("owner-{api_key}"),
                exchange: "binance".into(),
                credentials: creds.clone(),
                protection: ProtectionConfig::DEFAULT,
            })
            .await
            .unwrap();
        self.fake.set_free(api_key, "USDT", dec!(1000000));
        Acct {
            id: account.id,
            creds,
        }
    }

    /// Stores an entry the way the API does, without sending it.
    pub async fn stored_entry(&self, acct: &Acct, kind: EntryKind, qty: Decimal) -> EntryId {
        let ids = self.ids.clone();
        self.store
            .create_entry(
                NewEntry {
                    account: acct.id,
                    symbol: btcusdt_rules().symbol,
                    kind,
                    size: OrderSize::Base(q(qty)),
                    levels: EntryLevels::default(),
                    tags: EntryTags::default(),
                    idempotency_key: None,
                },
                &move |id| ids.entry(id).unwrap(),
                self.clock.now(),
            )
            .await
            .unwrap()
            .id
    }

    /// Stores and sends an entry; its answer is lost and no stream event
    /// arrives (the gateway is down, the API crashed after sending).
    pub async fn sent_entry(&self, acct: &Acct, kind: EntryKind, qty: Decimal) -> EntryId {
        let id = self.stored_entry(acct, kind, qty).await;
        let entry = self.store.entry(id).await.unwrap();
        let limit = match kind {
            EntryKind::Market => None,
            EntryKind::Limit { price } => Some(price),
        };
        self.fake
            .place_order(
                &acct.creds,
                &OrderRequest {
                    symbol: "BTCUSDT".into(),
                    side: Side::Buy,
                    limit,
                    size: OrderSize::Base(q(qty)),
                    client_id: entry.client_id.clone(),
                },
            )
            .await
            .unwrap();
        id
    }

    /// Sum of the quantities of the account's open lists.
    pub fn open_qty(&self, api_key: &str) -> Decimal {
        self.fake
            .open_lists()
            .iter()
            .filter(|l| l.api_key == api_key)
            .map(|l| l.request.qty.get())
            .sum()
    }
}

/// Polls `cond` until it holds or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
