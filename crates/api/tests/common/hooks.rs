//! A store that behaves like `MemStore` until a test arms one of its hooks:
//! entry reads failing once an entry is stored, or another request's write
//! landing between a handler's check and its own write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use oco_core::ids::{AccountId, ClientOrderId, EntryId, LegKey};
use oco_core::mem::MemStore;
use oco_core::model::{
    Account, Entry, EntryEventRecord, EntryKind, EntryTags, Evidence, Leg, LegClaim, LegUpdate,
    Millis, NewEntry, OrderSize, Protection, ProtectionConfig,
};
use oco_core::ports::{ApiCredentials, NewAccount, RecordedOutcomes, Store, StoreError};
use oco_core::state::LegSold;
use oco_core::testing::btcusdt_rules;
use oco_core::{EntryLevels, IdScheme, Price, Qty};
use rust_decimal_macros::dec;

/// `MemStore` with hooks a test arms.
pub struct HookStore {
    pub inner: Arc<MemStore>,
    /// Once armed and an entry has been stored, every `entry()` fails.
    pub fail_entry_reads_after_create: AtomicBool,
    created: AtomicBool,
    /// The next `create_entry` disables the account right before storing
    /// the entry, as a concurrent `PATCH {"active": false}` landing between
    /// the handler's check and the store would.
    pub disable_on_create: AtomicBool,
    /// The next disabling `update_account` first stores a resting entry on
    /// the account, as a concurrent `POST /v1/entries` would.
    pub entry_on_disable: AtomicBool,
}

impl HookStore {
    pub fn new(inner: Arc<MemStore>) -> Self {
        Self {
            inner,
            fail_entry_reads_after_create: AtomicBool::new(false),
            created: AtomicBool::new(false),
            disable_on_create: AtomicBool::new(false),
            entry_on_disable: AtomicBool::new(false),
        }
    }

    async fn sneak_in_entry(&self, account: AccountId) -> Result<Entry, StoreError> {
        let ids = IdScheme::new("og").unwrap();
        let new = NewEntry {
            account,
            symbol: btcusdt_rules().symbol,
            kind: EntryKind::Limit {
                price: Price::new(dec!(95)).unwrap(),
            },
            size: OrderSize::Base(Qty::new(dec!(1)).unwrap()),
            levels: EntryLevels {
                tp1: Some(Price::new(dec!(98)).unwrap()),
                tp2: None,
                sl: Some(Price::new(dec!(93)).unwrap()),
            },
            tags: EntryTags::default(),
        };
        let client_id_of = move |id: EntryId| ids.entry(id).unwrap();
        self.inner
            .create_entry(new, &client_id_of, Millis(1_700_000_000_000))
            .await
    }
}

#[async_trait]
impl Store for HookStore {
    async fn create_account(&self, a: NewAccount) -> Result<Account, StoreError> {
        self.inner.create_account(a).await
    }
    async fn account(&self, id: AccountId) -> Result<Account, StoreError> {
        self.inner.account(id).await
    }
    async fn credentials(&self, id: AccountId) -> Result<ApiCredentials, StoreError> {
        self.inner.credentials(id).await
    }
    async fn update_account(
        &self,
        id: AccountId,
        p: ProtectionConfig,
        a: bool,
    ) -> Result<Account, StoreError> {
        if !a && self.entry_on_disable.swap(false, Ordering::SeqCst) {
            self.sneak_in_entry(id).await?;
        }
        self.inner.update_account(id, p, a).await
    }
    async fn active_accounts(&self) -> Result<Vec<Account>, StoreError> {
        self.inner.active_accounts().await
    }
    async fn create_entry(
        &self,
        e: NewEntry,
        c: &(dyn Fn(EntryId) -> ClientOrderId + Send + Sync),
        at: Millis,
    ) -> Result<Entry, StoreError> {
        if self.disable_on_create.swap(false, Ordering::SeqCst) {
            let settings = self.inner.account(e.account).await?;
            self.inner
                .update_account(e.account, settings.protection, false)
                .await?;
        }
        let entry = self.inner.create_entry(e, c, at).await?;
        self.created.store(true, Ordering::SeqCst);
        Ok(entry)
    }
    async fn entry(&self, id: EntryId) -> Result<Entry, StoreError> {
        if self.fail_entry_reads_after_create.load(Ordering::SeqCst)
            && self.created.load(Ordering::SeqCst)
        {
            return Err(StoreError::Unavailable(format!(
                "reading entry {id}: connection refused"
            )));
        }
        self.inner.entry(id).await
    }
    async fn open_entries(&self, a: AccountId) -> Result<Vec<Entry>, StoreError> {
        self.inner.open_entries(a).await
    }
    async fn record_evidence(&self, id: EntryId, e: &Evidence) -> Result<Entry, StoreError> {
        self.inner.record_evidence(id, e).await
    }
    async fn set_protection(&self, id: EntryId, p: &Protection) -> Result<(), StoreError> {
        self.inner.set_protection(id, p).await
    }
    async fn close_entry(
        &self,
        id: EntryId,
        r: oco_core::model::Realized,
        at: Millis,
    ) -> Result<(), StoreError> {
        self.inner.close_entry(id, r, at).await
    }
    async fn exit_entry(
        &self,
        id: EntryId,
        why: &str,
        r: oco_core::model::Realized,
        read: &Entry,
    ) -> Result<bool, StoreError> {
        self.inner.exit_entry(id, why, r, read).await
    }
    async fn legs(&self, e: EntryId) -> Result<Vec<Leg>, StoreError> {
        self.inner.legs(e).await
    }
    async fn claim_leg(&self, c: &LegClaim) -> Result<bool, StoreError> {
        self.inner.claim_leg(c).await
    }
    async fn take_over_leg(&self, u: &LegUpdate, stale: Duration) -> Result<bool, StoreError> {
        self.inner.take_over_leg(u, stale).await
    }
    async fn fence_legs(
        &self,
        e: EntryId,
        k: &[LegKey],
        at: Millis,
    ) -> Result<Vec<bool>, StoreError> {
        self.inner.fence_legs(e, k, at).await
    }
    async fn update_leg(&self, u: &LegUpdate) -> Result<bool, StoreError> {
        self.inner.update_leg(u).await
    }
    async fn record_leg_sold(&self, k: LegKey, s: LegSold, at: Millis) -> Result<(), StoreError> {
        self.inner.record_leg_sold(k, s, at).await
    }
    async fn record_leg_trades(
        &self,
        k: LegKey,
        side: oco_core::model::SaleSide,
        t: &[oco_core::model::Fill],
    ) -> Result<(), StoreError> {
        self.inner.record_leg_trades(k, side, t).await
    }
    async fn append_event(&self, e: &EntryEventRecord) -> Result<(), StoreError> {
        self.inner.append_event(e).await
    }
    async fn events(&self, e: EntryId) -> Result<Vec<EntryEventRecord>, StoreError> {
        self.inner.events(e).await
    }
    async fn flag_reconcile(&self, a: AccountId, r: &str, at: Millis) -> Result<(), StoreError> {
        self.inner.flag_reconcile(a, r, at).await
    }
    async fn take_flagged(&self, l: usize) -> Result<Vec<AccountId>, StoreError> {
        self.inner.take_flagged(l).await
    }
    async fn take_due_accounts(
        &self,
        h: &str,
        i: Duration,
        l: Duration,
        n: usize,
    ) -> Result<Vec<AccountId>, StoreError> {
        self.inner.take_due_accounts(h, i, l, n).await
    }
    async fn mark_reconciled(
        &self,
        a: AccountId,
        since: std::time::Instant,
    ) -> Result<(), StoreError> {
        self.inner.mark_reconciled(a, since).await
    }
    async fn defer_reconcile(&self, a: AccountId, after: Duration) -> Result<(), StoreError> {
        self.inner.defer_reconcile(a, after).await
    }
    async fn take_due_retries(
        &self,
        h: &str,
        l: Duration,
        n: usize,
    ) -> Result<Vec<AccountId>, StoreError> {
        self.inner.take_due_retries(h, l, n).await
    }
    async fn claim_legs(&self, c: &[LegClaim]) -> Result<Vec<bool>, StoreError> {
        self.inner.claim_legs(c).await
    }
    async fn record_outcomes(
        &self,
        e: EntryId,
        u: &[LegUpdate],
        ev: &[EntryEventRecord],
        p: Option<&Protection>,
    ) -> Result<RecordedOutcomes, StoreError> {
        self.inner.record_outcomes(e, u, ev, p).await
    }
}
