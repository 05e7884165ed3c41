//! Hooks on `MemStore` that do nothing until a test arms one: entry reads
//! failing once an entry is stored or an answer recorded, or another
//! request's write landing
//! between a handler's check and its own write.

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use oco_core::ids::{AccountId, ClientOrderId, EntryId};
use oco_core::mem::MemStore;
use oco_core::model::{
    Account, Entry, EntryKind, EntryTags, Evidence, LegClaim, Millis, NewEntry, OrderSize,
    ProtectionConfig,
};
use oco_core::ports::{Store, StoreError};
use oco_core::testing::{StoreHooks, btcusdt_rules};
use oco_core::{EntryLevels, IdScheme, Price, Qty};
use rust_decimal_macros::dec;
use tokio::sync::Notify;

/// What a test arms on the router's store (`Hooked` over the world's
/// `MemStore`).
#[derive(Default)]
pub struct Hooks {
    /// Once armed and an entry has been stored, every `entry()` fails.
    pub fail_entry_reads_after_create: AtomicBool,
    created: AtomicBool,
    /// The next `create_entry` disables the account right before storing
    /// the entry, as a concurrent `PATCH {"active": false}` landing between
    /// the handler's check and the store would.
    pub disable_on_create: AtomicBool,
    /// The next `create_entry` first stores the same entry itself, as the
    /// first try of a request racing its retry under one idempotency key
    /// would, between the retry's look-up of the key and its store.
    pub twin_on_create: AtomicBool,
    /// The next disabling `update_account` first stores a resting entry on
    /// the account, as a concurrent `POST /v1/entries` would.
    pub entry_on_disable: AtomicBool,
    /// Once armed and an order's answer has been recorded
    /// (`record_evidence`), every `entry()` fails: the database went away
    /// between a cancel's record and its reply.
    pub fail_entry_reads_after_evidence: AtomicBool,
    /// The next `claim_legs` finds its legs claimed a moment before by
    /// another caller (the gateway, on the stream) that then never sends
    /// them, as a gateway dying with its claims would.
    pub steal_next_claims: AtomicBool,
    evidence: AtomicBool,
    /// The next `update_account` first enables the account and stores a
    /// resting entry on it, as a concurrent `PATCH {"active": true}` and
    /// `POST /v1/entries` landing after the handler read the account would.
    pub enable_on_update: AtomicBool,
    /// While armed, every enabling `update_account` fails.
    pub fail_enable: AtomicBool,
    /// While armed, a disabling `update_account` returns only once
    /// `disable_written` is notified, after its write.
    pub hold_disable: AtomicBool,
    /// Lets a held disable return.
    pub disable_written: Notify,
}

async fn sneak_in_entry(store: &MemStore, account: AccountId) -> Result<Entry, StoreError> {
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
        idempotency_key: None,
    };
    let client_id_of = move |id: EntryId| ids.entry(id).unwrap();
    store
        .create_entry(new, &client_id_of, Millis(1_700_000_000_000))
        .await
}

#[async_trait]
impl StoreHooks<MemStore> for Hooks {
    async fn update_account(
        &self,
        inner: &MemStore,
        id: AccountId,
        p: Option<ProtectionConfig>,
        a: Option<bool>,
    ) -> Result<Account, StoreError> {
        if self.enable_on_update.swap(false, Ordering::SeqCst) {
            inner.update_account(id, None, Some(true)).await?;
            sneak_in_entry(inner, id).await?;
        }
        if a == Some(false) && self.entry_on_disable.swap(false, Ordering::SeqCst) {
            sneak_in_entry(inner, id).await?;
        }
        if a == Some(true) && self.fail_enable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(format!(
                "updating account {id}: connection refused"
            )));
        }
        let updated = inner.update_account(id, p, a).await?;
        if a == Some(false) && self.hold_disable.load(Ordering::SeqCst) {
            self.disable_written.notified().await;
        }
        Ok(updated)
    }
    async fn create_entry(
        &self,
        inner: &MemStore,
        e: NewEntry,
        c: &(dyn Fn(EntryId) -> ClientOrderId + Send + Sync),
        at: Millis,
    ) -> Result<Entry, StoreError> {
        if self.disable_on_create.swap(false, Ordering::SeqCst) {
            inner.update_account(e.account, None, Some(false)).await?;
        }
        if self.twin_on_create.swap(false, Ordering::SeqCst) {
            inner.create_entry(e.clone(), c, at).await?;
        }
        let entry = inner.create_entry(e, c, at).await?;
        self.created.store(true, Ordering::SeqCst);
        Ok(entry)
    }
    async fn record_evidence(
        &self,
        inner: &MemStore,
        id: EntryId,
        e: &Evidence,
    ) -> Result<Entry, StoreError> {
        let entry = inner.record_evidence(id, e).await?;
        if self.fail_entry_reads_after_evidence.load(Ordering::SeqCst) {
            self.evidence.store(true, Ordering::SeqCst);
        }
        Ok(entry)
    }
    async fn claim_legs(
        &self,
        inner: &MemStore,
        claims: &[LegClaim],
    ) -> Result<Vec<bool>, StoreError> {
        if self.steal_next_claims.swap(false, Ordering::SeqCst) {
            let theirs: Vec<LegClaim> = claims
                .iter()
                .cloned()
                .map(|c| LegClaim {
                    source: oco_core::Source::Websocket,
                    ..c
                })
                .collect();
            inner.claim_legs(&theirs).await?;
        }
        inner.claim_legs(claims).await
    }
    async fn entry(&self, inner: &MemStore, id: EntryId) -> Result<Entry, StoreError> {
        if self.fail_entry_reads_after_create.load(Ordering::SeqCst)
            && self.created.load(Ordering::SeqCst)
            || self.evidence.load(Ordering::SeqCst)
        {
            return Err(StoreError::Unavailable(format!(
                "reading entry {id}: connection refused"
            )));
        }
        inner.entry(id).await
    }
}
