//! What this process last learnt of entries with nothing filled yet and of
//! their accounts, so that an entry's first fill is written and claimed
//! without reading first: one database round trip between the fill event
//! and its OCOs instead of two.
//!
//! Hints, never facts. The write that uses one compares the entry's evidence
//! columns with the hint's and the account's version with the one read with
//! its keys and settings; a stale hint makes it match nothing, and the fill
//! is then read and planned as it is without a hint.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use oco_core::ids::{AccountId, EntryId};
use oco_core::model::{Account, Entry};
use oco_core::ports::ApiCredentials;

use crate::cached::SeenEntry;

/// At most this many entries are remembered; the oldest go first. An entry
/// forgotten costs its first fill one read, nothing else.
const MAX_ENTRIES: usize = 20_000;

/// Stale pairs `order` may hold beyond twice the live ones before it is swept.
const ORDER_SLACK: usize = 1024;

/// Entries whose fill or other evidence this process handled lately, kept so
/// that a read ahead that finishes after does not leave a hint of them. A
/// hint left despite it (more handled meanwhile than this) is stale and
/// harmless: the write from it matches nothing.
const HANDLED_CAP: usize = 4096;

/// An entry as a write of this process left it, nothing filled.
#[derive(Clone)]
pub(crate) struct EntryHint {
    pub entry: Entry,
    pub seen: SeenEntry,
}

/// An account's keys and settings as one read found them, at `version`.
#[derive(Clone)]
pub(crate) struct AccountHint {
    pub version: i64,
    pub credentials: ApiCredentials,
    pub account: Account,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<EntryId, (u64, EntryHint)>,
    /// Insertion order, for eviction; stale pairs (taken, or replaced by a
    /// later insertion) are skipped.
    order: VecDeque<(EntryId, u64)>,
    next: u64,
    accounts: HashMap<AccountId, AccountHint>,
    /// Accounts whose streams this process follows: the only ones whose
    /// announced entries are read ahead of their fill.
    followed: HashSet<AccountId>,
    /// See [`HANDLED_CAP`]; `handled_order` is its insertion order.
    handled: HashSet<EntryId>,
    handled_order: VecDeque<EntryId>,
}

impl Inner {
    /// Notes that evidence of `id` was handled here: a read ahead of its fill
    /// that was in flight is out of date.
    fn handled(&mut self, id: EntryId) {
        if self.handled.insert(id) {
            self.handled_order.push_back(id);
            if self.handled_order.len() > HANDLED_CAP
                && let Some(oldest) = self.handled_order.pop_front()
            {
                self.handled.remove(&oldest);
            }
        }
    }
}

/// The hints of one `PgStore` (see the module's documentation).
pub(crate) struct Hints {
    /// How many entries are remembered at most.
    cap: usize,
    inner: Mutex<Inner>,
    used: AtomicU64,
    stale: AtomicU64,
}

impl Default for Hints {
    fn default() -> Self {
        Self::with_cap(MAX_ENTRIES)
    }
}

/// How often first fills were written from hints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintStats {
    /// First fills written and claimed without a read before.
    pub used: u64,
    /// Writes from hints that matched nothing (the entry or its account had
    /// changed since), after which the fill was read and written again.
    pub stale: u64,
}

impl Hints {
    fn with_cap(cap: usize) -> Self {
        Self {
            cap,
            inner: Mutex::default(),
            used: AtomicU64::new(0),
            stale: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `entry`, as a write or read of this process left it with
    /// nothing filled, and its account's keys and settings when given (read
    /// with it), while the account is followed: checked under the same lock
    /// as the insertion, so that once [`Hints::forget_account`] ran, nothing
    /// of the account is kept again until it is followed anew (a write of a
    /// task let go may finish after). Whether it was kept.
    pub(crate) fn entry_learnt(
        &self,
        entry: &Entry,
        seen: &SeenEntry,
        account: Option<AccountHint>,
    ) -> bool {
        self.keep(entry, seen, account, false)
    }

    /// [`Hints::entry_learnt`] and [`Hints::entry_read`]: the latter passes
    /// `ahead`.
    fn keep(
        &self,
        entry: &Entry,
        seen: &SeenEntry,
        account: Option<AccountHint>,
        ahead: bool,
    ) -> bool {
        let mut inner = self.lock();
        if !inner.followed.contains(&entry.account) {
            return false;
        }
        // Keys and settings read at an older version than kept would only
        // make the next write from them match nothing.
        if let Some(hint) = account
            && inner
                .accounts
                .get(&entry.account)
                .is_none_or(|kept| kept.version <= hint.version)
        {
            inner.accounts.insert(entry.account, hint);
        }
        if ahead && (inner.entries.contains_key(&entry.id) || inner.handled.contains(&entry.id)) {
            return false;
        }
        self.insert_entry(&mut inner, entry, seen);
        true
    }

    /// Remembers `entry` as written, if nothing of it is filled: a first fill
    /// is the only write planned from a hint.
    #[cfg(test)]
    pub(crate) fn entry_written(&self, entry: &Entry, seen: &SeenEntry) {
        self.insert_entry(&mut self.lock(), entry, seen);
    }

    /// Keeps `entry` as `seen` in `inner`, the oldest going past the cap.
    fn insert_entry(&self, inner: &mut Inner, entry: &Entry, seen: &SeenEntry) {
        if !entry.executed_qty.is_zero() {
            return;
        }
        let seq = inner.next;
        inner.next += 1;
        let hint = EntryHint {
            entry: entry.clone(),
            seen: seen.clone(),
        };
        inner.entries.insert(entry.id, (seq, hint));
        inner.order.push_back((entry.id, seq));
        while inner.entries.len() > self.cap {
            let Some((id, seq)) = inner.order.pop_front() else {
                break;
            };
            if inner.entries.get(&id).is_some_and(|(s, _)| *s == seq) {
                inner.entries.remove(&id);
            }
        }
        // Pairs of entries taken since pile up in `order`; drop them once
        // they outnumber the live ones.
        if inner.order.len() > 2 * inner.entries.len() + ORDER_SLACK {
            let Inner { entries, order, .. } = inner;
            order.retain(|(id, seq)| entries.get(id).is_some_and(|(s, _)| s == seq));
        }
    }

    /// Remembers that this process follows `account`'s stream.
    pub(crate) fn follow(&self, account: AccountId) {
        self.lock().followed.insert(account);
    }

    /// Whether this process follows `account`'s stream.
    pub(crate) fn follows(&self, account: AccountId) -> bool {
        self.lock().followed.contains(&account)
    }

    /// Keeps `entry`, read ahead of its fill with nothing filled, and its
    /// account's keys and settings when given, as [`Hints::entry_learnt`]
    /// does, only while the account is followed. The entry is not kept
    /// either when a hint of it is already kept (it came from a write here,
    /// at least as recent as this read) or when its evidence was handled here
    /// since (the read is out of date). Whether the entry was kept.
    pub(crate) fn entry_read(
        &self,
        entry: &Entry,
        seen: &SeenEntry,
        account: Option<AccountHint>,
    ) -> bool {
        self.keep(entry, seen, account, true)
    }

    /// Forgets entry `id`: other evidence of it was written, which a hint
    /// taken before would not match.
    pub(crate) fn forget(&self, id: EntryId) {
        let mut inner = self.lock();
        inner.entries.remove(&id);
        inner.handled(id);
    }

    /// Whether `account`'s keys and settings are known.
    pub(crate) fn knows_account(&self, account: AccountId) -> bool {
        self.lock().accounts.contains_key(&account)
    }

    /// Remembers `account`'s keys and settings as read at `version`.
    #[cfg(test)]
    pub(crate) fn account_read(&self, id: AccountId, hint: AccountHint) {
        self.lock().accounts.insert(id, hint);
    }

    /// Takes what is known of entry `id` of `account` and of that account,
    /// when both are: the entry is forgotten either way (its first fill is
    /// being written).
    pub(crate) fn take(&self, account: AccountId, id: EntryId) -> Option<(EntryHint, AccountHint)> {
        let mut inner = self.lock();
        // Known or not, the fill is being written: a read ahead of it in
        // flight must not leave a hint behind.
        inner.handled(id);
        // Another account's stream naming the id leaves the owner's hint.
        if inner.entries.get(&id)?.1.entry.account != account {
            return None;
        }
        let (_, entry) = inner.entries.remove(&id)?;
        let known = inner.accounts.get(&account)?.clone();
        Some((entry, known))
    }

    /// Forgets `account` and every entry of it: this process no longer
    /// follows its stream, and keeps neither its keys nor its entries.
    pub(crate) fn forget_account(&self, account: AccountId) {
        let mut inner = self.lock();
        inner.accounts.remove(&account);
        inner.followed.remove(&account);
        inner
            .entries
            .retain(|_, (_, hint)| hint.entry.account != account);
    }

    /// Entries remembered.
    pub(crate) fn entries_known(&self) -> usize {
        self.lock().entries.len()
    }

    /// Accounts whose keys and settings are remembered.
    pub(crate) fn accounts_known(&self) -> usize {
        self.lock().accounts.len()
    }

    /// A write from hints of `account` matched nothing: its account hint may
    /// be what is stale, so it is read again with the fill.
    pub(crate) fn stale(&self, account: AccountId) {
        self.stale.fetch_add(1, Ordering::Relaxed);
        self.lock().accounts.remove(&account);
    }

    /// A first fill was written from hints.
    pub(crate) fn used(&self) {
        self.used.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> HintStats {
        HintStats {
            used: self.used.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use oco_core::model::{EntryKind, EntryTags, OrderSize, Protection};
    use oco_core::{
        Asset, ClientOrderId, EntryLevels, EntryStatus, Millis, ProtectionConfig, Qty, Symbol,
    };
    use rust_decimal::Decimal;
    use secrecy::SecretString;

    use super::*;
    use crate::convert::numeric;

    fn entry(id: i64, account: i64, executed: Decimal) -> (Entry, SeenEntry) {
        let entry = Entry {
            id: EntryId(id),
            account: AccountId(account),
            symbol: Symbol {
                name: "BTCUSDT".into(),
                base: Asset("BTC".into()),
                quote: Asset("USDT".into()),
            },
            client_id: ClientOrderId::new(format!("t-E-{id}")).unwrap(),
            order_id: Some(id),
            kind: EntryKind::Market,
            size: OrderSize::Base(Qty::new(Decimal::ONE).unwrap()),
            status: EntryStatus::New,
            executed_qty: Qty::new(executed).unwrap(),
            cumulative_quote: Decimal::ZERO,
            base_commission: Qty::ZERO,
            fees: oco_core::model::Fees::default(),
            fills_qty: Qty::ZERO,
            levels: EntryLevels::default(),
            tags: EntryTags::default(),
            filled_at: None,
            protection: Protection::NotNeeded,
            realized_quote: None,
            fees_complete: false,
            created_at: Millis(0),
        };
        let seen = SeenEntry {
            stored_fills: 0,
            executed_qty: numeric(executed),
            cumulative_quote: numeric(Decimal::ZERO),
            status: "new".into(),
            base_commission: numeric(Decimal::ZERO),
            fills_qty: numeric(Decimal::ZERO),
            exchange_order_id: Some(id),
            filled_at: None,
            protection: "not_needed".into(),
        };
        (entry, seen)
    }

    fn account(id: i64, version: i64) -> AccountHint {
        AccountHint {
            version,
            credentials: ApiCredentials {
                api_key: format!("key-{id}"),
                secret: SecretString::from("s"),
            },
            account: Account {
                id: AccountId(id),
                owner: "o".into(),
                exchange: "binance".into(),
                api_key: format!("key-{id}"),
                protection: ProtectionConfig::DEFAULT,
                active: true,
            },
        }
    }

    #[test]
    fn an_account_no_longer_followed_is_forgotten_with_its_entries() {
        let hints = Hints::default();
        for a in [1, 2] {
            hints.account_read(AccountId(a), account(a, 1));
            let (e, s) = entry(10 * a, a, Decimal::ZERO);
            hints.entry_written(&e, &s);
        }
        hints.forget_account(AccountId(1));
        assert_eq!(hints.accounts_known(), 1);
        assert!(!hints.knows_account(AccountId(1)));
        assert!(hints.take(AccountId(1), EntryId(10)).is_none());
        // Learnt again, the entry forgotten with it does not come back.
        hints.account_read(AccountId(1), account(1, 2));
        assert!(hints.take(AccountId(1), EntryId(10)).is_none());
        // The other account keeps both.
        assert!(hints.take(AccountId(2), EntryId(20)).is_some());
    }

    #[test]
    fn only_the_newest_entries_are_kept_and_a_take_forgets() {
        let hints = Hints::with_cap(3);
        hints.account_read(AccountId(1), account(1, 7));
        for id in 1..=5 {
            let (e, s) = entry(id, 1, Decimal::ZERO);
            hints.entry_written(&e, &s);
        }
        for id in 1..=2 {
            assert!(
                hints.take(AccountId(1), EntryId(id)).is_none(),
                "{id} evicted"
            );
        }
        let (e, a) = hints.take(AccountId(1), EntryId(4)).unwrap();
        assert_eq!((e.entry.id, a.version), (EntryId(4), 7));
        assert!(hints.take(AccountId(1), EntryId(4)).is_none(), "taken once");
        // Written again, an entry is the newest: the next two do not push it out.
        let (e, s) = entry(3, 1, Decimal::ZERO);
        hints.entry_written(&e, &s);
        for id in 6..=7 {
            let (e, s) = entry(id, 1, Decimal::ZERO);
            hints.entry_written(&e, &s);
        }
        assert!(hints.take(AccountId(1), EntryId(5)).is_none(), "5 evicted");
        assert!(hints.take(AccountId(1), EntryId(3)).is_some());
        hints.forget(EntryId(6));
        assert!(hints.take(AccountId(1), EntryId(6)).is_none(), "forgotten");
        assert!(hints.take(AccountId(1), EntryId(7)).is_some());
    }

    #[test]
    fn a_read_ahead_keeps_an_entry_only_of_an_account_followed_and_not_handled_since() {
        let hints = Hints::default();
        let (e, s) = entry(1, 1, Decimal::ZERO);
        assert!(
            !hints.entry_read(&e, &s, Some(account(1, 1))),
            "not followed"
        );
        assert!(!hints.knows_account(AccountId(1)), "no keys kept either");
        hints.follow(AccountId(1));
        assert!(hints.entry_read(&e, &s, Some(account(1, 1))));
        assert!(hints.knows_account(AccountId(1)));
        assert_eq!(hints.entries_known(), 1);
        // Written here meanwhile: the write's hint stays.
        let (mut newer, newer_seen) = entry(1, 1, Decimal::ZERO);
        newer.order_id = Some(99);
        hints.entry_written(&newer, &newer_seen);
        assert!(!hints.entry_read(&e, &s, None), "a hint is kept already");
        let (taken, _) = hints.take(AccountId(1), EntryId(1)).unwrap();
        assert_eq!(taken.entry.order_id, Some(99));
        // Its fill taken (with or without a hint) or its evidence written
        // since: a read ahead that was in flight is out of date.
        assert!(!hints.entry_read(&e, &s, None), "taken");
        let (two, two_seen) = entry(2, 1, Decimal::ZERO);
        assert!(hints.take(AccountId(1), EntryId(2)).is_none());
        assert!(
            !hints.entry_read(&two, &two_seen, None),
            "its fill came first"
        );
        let (three, three_seen) = entry(3, 1, Decimal::ZERO);
        hints.forget(EntryId(3));
        assert!(!hints.entry_read(&three, &three_seen, None), "forgotten");
        // Keys of an older account version never replace newer ones.
        let (five, five_seen) = entry(5, 1, Decimal::ZERO);
        assert!(hints.entry_learnt(&five, &five_seen, Some(account(1, 7))));
        let (six, six_seen) = entry(6, 1, Decimal::ZERO);
        assert!(hints.entry_read(&six, &six_seen, Some(account(1, 6))));
        let (_, keys) = hints.take(AccountId(1), EntryId(6)).unwrap();
        assert_eq!(keys.version, 7, "the newer keys stay");
        // Let go: nothing more is kept.
        hints.forget_account(AccountId(1));
        let (four, four_seen) = entry(4, 1, Decimal::ZERO);
        assert!(!hints.entry_read(&four, &four_seen, Some(account(1, 2))));
        assert_eq!((hints.entries_known(), hints.accounts_known()), (0, 0));
    }

    #[test]
    fn filled_entries_and_unknown_accounts_give_nothing() {
        let hints = Hints::with_cap(10);
        let (e, s) = entry(1, 1, Decimal::ONE);
        hints.entry_written(&e, &s);
        hints.account_read(AccountId(1), account(1, 0));
        assert!(
            hints.take(AccountId(1), EntryId(1)).is_none(),
            "filled: no hint"
        );
        let (e, s) = entry(2, 2, Decimal::ZERO);
        hints.entry_written(&e, &s);
        assert!(
            hints.take(AccountId(2), EntryId(2)).is_none(),
            "account unknown"
        );
        let (e, s) = entry(3, 1, Decimal::ZERO);
        hints.entry_written(&e, &s);
        hints.stale(AccountId(1));
        assert!(
            !hints.knows_account(AccountId(1)),
            "a stale write forgets the account"
        );
        assert!(hints.take(AccountId(1), EntryId(3)).is_none());
        assert_eq!(hints.stats(), HintStats { used: 0, stale: 1 });
    }

    #[test]
    fn the_eviction_order_stays_bounded_under_churn() {
        let hints = Hints::with_cap(100);
        hints.account_read(AccountId(1), account(1, 0));
        for id in 0..50_000 {
            let (e, s) = entry(id, 1, Decimal::ZERO);
            hints.entry_written(&e, &s);
            assert!(hints.take(AccountId(1), EntryId(id)).is_some());
        }
        let inner = hints.lock();
        assert!(inner.entries.is_empty());
        assert!(
            inner.order.len() <= ORDER_SLACK + 1,
            "{}",
            inner.order.len()
        );
    }
}
