//! A store that records a fill the way `PgStore` does (the entry's context,
//! legs included, read before the evidence is written), with a gate between
//! the read and the write so that a test can interleave another caller there.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use oco_core::ids::{AccountId, ClientOrderId, EntryId, LegKey};
use oco_core::mem::MemStore;
use oco_core::model::{
    Account, Entry, EntryEventRecord, Evidence, Leg, LegClaim, LegUpdate, Millis, NewEntry,
    Protection, ProtectionConfig,
};
use oco_core::ports::{
    ApiCredentials, ClaimPlanner, NewAccount, RecordedFill, RecordedOutcomes, Store, StoreError,
};
use oco_core::state::LegSold;
use tokio::sync::{Notify, oneshot};

pub struct Gated {
    pub inner: MemStore,
    /// Held between the context read and the evidence write of the next fill.
    pub gate: Mutex<Option<oneshot::Receiver<()>>>,
    /// Told when a fill's context has been read.
    pub read: Notify,
}

pub fn gated() -> Arc<Gated> {
    Arc::new(Gated {
        inner: MemStore::new(),
        gate: Mutex::new(None),
        read: Notify::new(),
    })
}

#[async_trait]
impl Store for Gated {
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
        self.inner.create_entry(e, c, at).await
    }
    async fn entry(&self, id: EntryId) -> Result<Entry, StoreError> {
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

    async fn record_fill_and_claim(
        &self,
        account: AccountId,
        id: EntryId,
        evidence: &Evidence,
        plan: &ClaimPlanner<'_>,
    ) -> Result<Option<RecordedFill>, StoreError> {
        let context = self.inner.fill_context(account, id).await?;
        self.read.notify_one();
        let gate = self
            .gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(gate) = gate {
            // A dropped sender opens the gate as well.
            let _ = gate.await;
        }
        let Some(entry) = self.inner.record_evidence_of(account, id, evidence).await? else {
            return Ok(None);
        };
        let claims = plan(&entry, &context);
        let won = if claims.is_empty() {
            Vec::new()
        } else {
            self.inner.claim_legs(&claims).await?
        };
        Ok(Some(RecordedFill {
            entry,
            context,
            claims,
            won,
        }))
    }
}
