//! A store that forwards every call to another store, except the calls a
//! test hooks: a failure on demand, a read made stale, a write held until
//! the test lets it go, another caller's write landing in between. Tests
//! that race two callers need such a seam in one or two methods of
//! [`Store`]; without this each wrote its own wrapper forwarding all the
//! others, and every method added to the port meant editing each of them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::ids::{AccountId, ClientOrderId, EntryId, LegKey};
use crate::model::{
    Account, Entry, EntryEventRecord, Evidence, Fill, Leg, LegClaim, LegUpdate, Millis, NewEntry,
    Protection, ProtectionConfig, Realized, SaleSide,
};
use crate::ports::{
    ApiCredentials, ClaimPlanner, FillContext, NewAccount, RecordedFill, RecordedOutcomes, Store,
    StoreError,
};
use crate::state::LegSold;

/// `inner` with `hooks` on its calls: each [`Store`] method of this store is
/// the [`StoreHooks`] method of the same name, which forwards to `inner`
/// unless the hooks override it.
///
/// Both halves are shared (`Arc`): a test keeps its own handle on the inner
/// store to check what was written behind the hooks, and on the hooks to arm
/// or release them while the code under test holds the wrapper.
///
/// A hook sees the calls made to this store, not those the inner store makes
/// to itself: `MemStore`'s [`Store::fill_context`] reads its legs through its
/// own [`Store::legs`], so a hook that changes what `legs` answers hooks
/// `fill_context` as well when the code under test reads legs that way. That
/// is what forwarding means here: a store that overrides a default method
/// (`PgStore` writes a fill and its claims in one statement) keeps doing so
/// when wrapped.
pub struct Hooked<S: ?Sized, H> {
    inner: Arc<S>,
    hooks: Arc<H>,
}

impl<S: Store + ?Sized, H: StoreHooks<S>> Hooked<S, H> {
    /// Wraps `inner`, every call going through `hooks`.
    pub fn new(inner: Arc<S>, hooks: Arc<H>) -> Self {
        Self { inner, hooks }
    }
}

impl<S: ?Sized, H> Hooked<S, H> {
    /// The wrapped store, to read or write behind the hooks.
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    /// The hooks, to arm or release them.
    pub fn hooks(&self) -> &Arc<H> {
        &self.hooks
    }
}

/// Declares [`StoreHooks`] (one method per async [`Store`] method, taking
/// the inner store first and forwarding to it by default) and the [`Store`]
/// impl of [`Hooked`] that calls it, from one list: the hooks and the
/// forwarding cannot drift apart. A method added to [`Store`] without a
/// default does not compile until it is listed here; one added with a
/// default must be listed too, or [`Hooked`] runs the default over its own
/// hooked calls instead of forwarding to the inner store's override.
macro_rules! hooks_and_forwarding {
    ($( fn $name:ident ( $($arg:ident : $ty:ty),* $(,)? ) -> $ret:ty; )*) => {
        /// What a [`Hooked`] store does on each call. Every method forwards
        /// to `inner`, the wrapped store; a test overrides the few it hooks.
        /// The override is the call: it may act before calling `inner`,
        /// after it (changing the answer), or instead of it (failing, or
        /// doing the work its own way, `inner`'s other methods at hand).
        #[async_trait]
        pub trait StoreHooks<S: Store + ?Sized>: Send + Sync {
            $(
                #[doc = concat!("[`Store::", stringify!($name), "`] on `inner`, unless overridden.")]
                async fn $name(&self, inner: &S, $($arg: $ty),*) -> Result<$ret, StoreError> {
                    inner.$name($($arg),*).await
                }
            )*

            /// [`Store::following`] on `inner`, unless overridden.
            fn following(&self, inner: &S, account: AccountId) {
                inner.following(account);
            }

            /// [`Store::unfollowed`] on `inner`, unless overridden.
            fn unfollowed(&self, inner: &S, account: AccountId) {
                inner.unfollowed(account);
            }
        }

        #[async_trait]
        impl<S: Store + ?Sized, H: StoreHooks<S>> Store for Hooked<S, H> {
            $(
                async fn $name(&self, $($arg: $ty),*) -> Result<$ret, StoreError> {
                    self.hooks.$name(&*self.inner, $($arg),*).await
                }
            )*

            fn following(&self, account: AccountId) {
                self.hooks.following(&*self.inner, account);
            }

            fn unfollowed(&self, account: AccountId) {
                self.hooks.unfollowed(&*self.inner, account);
            }
        }
    };
}

// In the order of the port.
hooks_and_forwarding! {
    fn create_account(account: NewAccount) -> Account;
    fn account(id: AccountId) -> Account;
    fn credentials(id: AccountId) -> ApiCredentials;
    fn update_account(
        id: AccountId,
        protection: Option<ProtectionConfig>,
        active: Option<bool>,
    ) -> Account;
    fn active_accounts() -> Vec<Account>;
    fn create_entry(
        entry: NewEntry,
        client_id_of: &(dyn Fn(EntryId) -> ClientOrderId + Send + Sync),
        at: Millis,
    ) -> Entry;
    fn release_idempotency_key(id: EntryId) -> ();
    fn entry(id: EntryId) -> Entry;
    fn open_entries(account: AccountId) -> Vec<Entry>;
    fn record_evidence(id: EntryId, evidence: &Evidence) -> Entry;
    fn record_evidence_of(account: AccountId, id: EntryId, evidence: &Evidence) -> Option<Entry>;
    fn set_protection(id: EntryId, protection: &Protection) -> ();
    fn close_entry(id: EntryId, realized: Realized, at: Millis) -> ();
    fn exit_entry(id: EntryId, reason: &str, realized: Realized, read: &Entry) -> bool;
    fn legs(entry: EntryId) -> Vec<Leg>;
    fn claim_leg(claim: &LegClaim) -> bool;
    fn update_leg(update: &LegUpdate) -> bool;
    fn take_over_leg(update: &LegUpdate, stale_after: Duration) -> bool;
    fn fence_legs(entry: EntryId, keys: &[LegKey], at: Millis) -> Vec<bool>;
    fn record_leg_sold(key: LegKey, sold: LegSold, at: Millis) -> ();
    fn record_leg_trades(key: LegKey, side: SaleSide, trades: &[Fill]) -> ();
    fn append_event(event: &EntryEventRecord) -> ();
    fn events(entry: EntryId) -> Vec<EntryEventRecord>;
    fn flag_reconcile(account: AccountId, reason: &str, at: Millis) -> ();
    fn flag_reconcile_many(flags: &[(AccountId, String)], at: Millis) -> ();
    fn take_flagged(limit: usize) -> Vec<AccountId>;
    fn take_due_accounts(
        holder: &str,
        interval: Duration,
        lease: Duration,
        limit: usize,
    ) -> Vec<AccountId>;
    fn mark_reconciled(account: AccountId, since: std::time::Instant) -> ();
    fn defer_reconcile(account: AccountId, after: Duration) -> ();
    fn take_due_retries(holder: &str, lease: Duration, limit: usize) -> Vec<AccountId>;
    fn claim_legs(claims: &[LegClaim]) -> Vec<bool>;
    fn record_outcomes(
        entry: EntryId,
        updates: &[LegUpdate],
        events: &[EntryEventRecord],
        protection: Option<&Protection>,
    ) -> RecordedOutcomes;
    fn fill_context(account: AccountId, id: EntryId) -> FillContext;
    fn record_fill_and_claim(
        account: AccountId,
        id: EntryId,
        evidence: &Evidence,
        plan: &ClaimPlanner<'_>,
    ) -> Option<RecordedFill>;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::mem::MemStore;
    use crate::testing::store_behaviour;

    /// Forwarding everything, the wrapper is a store like the one it wraps.
    #[tokio::test]
    async fn with_no_hook_it_behaves_as_the_inner_store() {
        struct NoHooks;
        impl StoreHooks<MemStore> for NoHooks {}
        let store = Hooked::new(Arc::new(MemStore::new()), Arc::new(NoHooks));
        store_behaviour(&store).await.unwrap();
    }

    /// A hooked method runs the hook; the others still reach the inner
    /// store, here one behind `dyn Store`.
    #[tokio::test]
    async fn a_hook_replaces_its_method_only() {
        #[derive(Default)]
        struct FailingLegs(AtomicUsize);
        #[async_trait]
        impl StoreHooks<dyn Store> for FailingLegs {
            async fn legs(&self, _: &dyn Store, entry: EntryId) -> Result<Vec<Leg>, StoreError> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::Unavailable(format!("legs of {entry}: refused")))
            }
        }
        let inner: Arc<dyn Store> = Arc::new(MemStore::new());
        let store = Hooked::new(inner, Arc::new(FailingLegs::default()));
        let legs = store.legs(EntryId(7)).await;
        assert!(matches!(legs, Err(StoreError::Unavailable(_))), "{legs:?}");
        assert_eq!(store.hooks().0.load(Ordering::SeqCst), 1);
        let entry = store.entry(EntryId(7)).await;
        assert!(
            matches!(entry, Err(StoreError::NotFound { .. })),
            "forwarded: {entry:?}"
        );
    }
}
