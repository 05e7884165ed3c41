//! A store that records a fill the way `PgStore` does (the entry's context,
//! legs included, read before the evidence is written), with a gate between
//! the read and the write so that a test can interleave another caller there.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use oco_core::ids::{AccountId, EntryId};
use oco_core::mem::MemStore;
use oco_core::model::Evidence;
use oco_core::ports::{ClaimPlanner, RecordedFill, Store, StoreError};
use oco_core::testing::{Hooked, StoreHooks};
use tokio::sync::{Notify, oneshot};

pub type Gated = Hooked<MemStore, Gate>;

pub struct Gate {
    /// Held between the context read and the evidence write of the next fill.
    pub gate: Mutex<Option<oneshot::Receiver<()>>>,
    /// Told when a fill's context has been read.
    pub read: Notify,
}

pub fn gated() -> Arc<Gated> {
    Arc::new(Hooked::new(
        Arc::new(MemStore::new()),
        Arc::new(Gate {
            gate: Mutex::new(None),
            read: Notify::new(),
        }),
    ))
}

#[async_trait]
impl StoreHooks<MemStore> for Gate {
    async fn record_fill_and_claim(
        &self,
        inner: &MemStore,
        account: AccountId,
        id: EntryId,
        evidence: &Evidence,
        plan: &ClaimPlanner<'_>,
    ) -> Result<Option<RecordedFill>, StoreError> {
        let context = inner.fill_context(account, id).await?;
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
        let Some(entry) = inner.record_evidence_of(account, id, evidence).await? else {
            return Ok(None);
        };
        let claims = plan(&entry, &context);
        let won = if claims.is_empty() {
            Vec::new()
        } else {
            inner.claim_legs(&claims).await?
        };
        Ok(Some(RecordedFill {
            entry,
            context,
            claims,
            won,
        }))
    }
}
