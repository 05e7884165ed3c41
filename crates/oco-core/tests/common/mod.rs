//! Shared test world: the in-memory store, the exchange double and a test clock.
#![allow(dead_code, clippy::unwrap_used)]

pub mod gated;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use oco_core::ids::{EntryId, IdScheme};
use oco_core::levels::EntryLevels;
use oco_core::mem::MemStore;
use oco_core::model::{
    EntryKind, EntryTags, Evidence, Fill, Millis, NewEntry, OrderSize, ProtectionConfig,
};
use oco_core::ports::{ApiCredentials, Clock, NewAccount, Store};
use oco_core::protect::{Protector, ProtectorConfig};
use oco_core::state::EntryStatus;
use oco_core::symbol::Asset;
use oco_core::testing::{FakeExchange, btcusdt_rules};
use oco_core::{AccountId, Price, Qty};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use secrecy::SecretString;

pub struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now(&self) -> Millis {
        Millis(self.0.load(Ordering::SeqCst))
    }
}

impl TestClock {
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as i64, Ordering::SeqCst);
    }
}

pub struct World {
    pub exchange: Arc<FakeExchange>,
    pub store: Arc<MemStore>,
    pub clock: Arc<TestClock>,
    pub protector: Arc<Protector>,
    pub account: AccountId,
}

pub const KEY: &str = "k1";

pub fn q(d: Decimal) -> Qty {
    Qty::new(d).unwrap()
}

pub fn p(d: Decimal) -> Price {
    Price::new(d).unwrap()
}

pub async fn world(protection: ProtectionConfig) -> World {
    let exchange = Arc::new(FakeExchange::new());
    exchange.add_symbol(btcusdt_rules(), p(dec!(100)));
    let store = Arc::new(MemStore::new());
    let clock = Arc::new(TestClock(AtomicI64::new(1_000_000)));
    let account = store
        .create_account(NewAccount {
            owner: "alice".into(),
            exchange: "binance".into(),
            credentials: ApiCredentials {
                api_key: KEY.into(),
                secret: SecretString::from("s"),
            },
            protection,
        })
        .await
        .unwrap();
    let protector = Arc::new(Protector::new(
        exchange.clone(),
        store.clone(),
        clock.clone(),
        ProtectorConfig::new(IdScheme::new("og").unwrap()),
    ));
    World {
        exchange,
        store,
        clock,
        protector,
        account: account.id,
    }
}

impl World {
    pub async fn entry(&self, levels: EntryLevels) -> EntryId {
        let ids = IdScheme::new("og").unwrap();
        self.store
            .create_entry(
                NewEntry {
                    account: self.account,
                    symbol: btcusdt_rules().symbol,
                    kind: EntryKind::Market,
                    size: OrderSize::Base(q(dec!(1))),
                    levels,
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

    /// The account received `qty` BTC less `fee` (the exchange's view).
    pub fn credit(&self, qty: Decimal) {
        let (free, _) = self.exchange.balance(KEY, "BTC");
        self.exchange.set_free(KEY, "BTC", free + qty);
    }

    /// The entry's market-exit legs (claimed under their exit client id).
    pub async fn exits(&self, id: EntryId) -> Vec<oco_core::model::Leg> {
        self.store
            .legs(id)
            .await
            .unwrap()
            .into_iter()
            .filter(|l| l.ids.list.as_str().starts_with("og-X-"))
            .collect()
    }

    /// At the start of the next OCO placement, another layer records `rest`
    /// and the account receives the `more` BTC it adds: the rest of a fill
    /// seen while this call's lists go out.
    pub fn record_before_next_oco(&self, id: EntryId, rest: Evidence, more: Decimal) {
        let (store, exchange) = (self.store.clone(), self.exchange.clone());
        self.exchange.before_next_oco(move || {
            Box::pin(async move {
                store.record_evidence(id, &rest).await.unwrap();
                let (free, _) = exchange.balance(KEY, "BTC");
                exchange.set_free(KEY, "BTC", free + more);
            })
        });
    }

    pub fn open_qty(&self) -> Decimal {
        self.exchange
            .open_lists()
            .iter()
            .map(|l| l.request.qty.get())
            .sum()
    }
}

pub fn evidence(status: EntryStatus, fills: &[(i64, Decimal, Decimal, Decimal, &str)]) -> Evidence {
    let fills: Vec<Fill> = fills
        .iter()
        .map(|(id, qty, price, fee, asset)| Fill {
            trade_id: *id,
            price: p(*price),
            qty: q(*qty),
            commission: *fee,
            commission_asset: Asset((*asset).into()),
            time: Millis(999_000 + id),
        })
        .collect();
    Evidence {
        order_id: Some(1),
        status,
        executed_qty: fills.iter().map(|f| f.qty).sum(),
        cumulative_quote: fills.iter().map(|f| f.qty.notional(f.price)).sum(),
        fills,
        holding: None,
        observed_at: Millis(999_500),
    }
}

/// The first 0.4 of a 1.0 entry, at 100.
pub fn first_part() -> Evidence {
    evidence(
        EntryStatus::PartiallyFilled,
        &[(1, dec!(0.4), dec!(100), dec!(0), "BNB")],
    )
}

/// The whole 1.0 of that entry: its first 0.4 and 0.6 more, at 100.
pub fn whole_after_part() -> Evidence {
    evidence(
        EntryStatus::Filled,
        &[
            (1, dec!(0.4), dec!(100), dec!(0), "BNB"),
            (2, dec!(0.6), dec!(100), dec!(0), "BNB"),
        ],
    )
}

pub fn full_fill() -> Evidence {
    evidence(
        EntryStatus::Filled,
        &[(1, dec!(1), dec!(100), dec!(0.001), "BTC")],
    )
}
