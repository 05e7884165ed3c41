//! An in-memory [`Store`] with the same semantics as the PostgreSQL one
//! (atomic claims, monotonic evidence), for unit tests and the demo. It keeps
//! nothing across restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use rust_decimal::Decimal;

use crate::ids::{AccountId, ClientOrderId, EntryId, IdempotencyKey, LegKey};
use crate::model::{
    Account, Entry, EntryEventRecord, Evidence, Fees, Fill, Leg, LegClaim, LegTrades, LegUpdate,
    Millis, NewEntry, Protection, ProtectionConfig, Realized, SaleSide, Source,
};
use crate::money::Qty;
use crate::ports::{
    ApiCredentials, Coverage, CoverageReport, Leases, NewAccount, RecordedOutcomes, Store,
    StoreError, UnprotectedEntry, Users,
};
use crate::state::{EntryStatus, LegSold, LegState};

#[derive(Default)]
struct Inner {
    accounts: BTreeMap<AccountId, (Account, ApiCredentials)>,
    entries: BTreeMap<EntryId, Entry>,
    /// Entries by their account's idempotency key.
    keys: BTreeMap<(AccountId, IdempotencyKey), EntryId>,
    fills: BTreeMap<EntryId, BTreeMap<i64, Fill>>,
    legs: BTreeMap<LegKey, Leg>,
    /// Trades of leg orders by account, symbol and trade id: the leg each
    /// was recorded for.
    leg_trades: BTreeMap<(AccountId, String, i64), LegKey>,
    events: Vec<EntryEventRecord>,
    flagged: BTreeSet<AccountId>,
    leases: BTreeMap<AccountId, (String, std::time::Instant)>,
    reconciled: BTreeMap<AccountId, std::time::Instant>,
    due_taken: BTreeMap<AccountId, (String, std::time::Instant)>,
    retry_at: BTreeMap<AccountId, std::time::Instant>,
    /// When each pending retry was written.
    retry_written: BTreeMap<AccountId, std::time::Instant>,
    users: BTreeMap<String, String>,
    next_account: i64,
    next_entry: i64,
}

/// The in-memory store.
#[derive(Default)]
pub struct MemStore {
    inner: Mutex<Inner>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-written record:
        // every method builds its change before touching the maps.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn not_found(what: &'static str, id: impl ToString) -> StoreError {
    StoreError::NotFound {
        what,
        id: id.to_string(),
    }
}

/// Merges evidence into an entry the way every store must: fills by trade id,
/// executed quantity and quote by maximum, status only forward, base
/// commission and fees by asset recomputed from the fills. An exited entry
/// that fills further is unprotected again, and its exit's result dropped
/// until it closes.
pub fn merge_evidence(entry: &mut Entry, fills: &mut BTreeMap<i64, Fill>, evidence: &Evidence) {
    let executed_before = entry.executed_qty;
    for fill in &evidence.fills {
        fills.entry(fill.trade_id).or_insert_with(|| fill.clone());
    }
    let fills_qty: Qty = fills.values().map(|f| f.qty).sum();
    let fills_quote: Decimal = fills.values().map(|f| f.qty.notional(f.price)).sum();
    entry.executed_qty = entry.executed_qty.max(evidence.executed_qty).max(fills_qty);
    entry.cumulative_quote = entry
        .cumulative_quote
        .max(evidence.cumulative_quote)
        .max(fills_quote);
    entry.fills_qty = fills_qty;
    let base = &entry.symbol.base;
    entry.base_commission = fills
        .values()
        .filter(|f| &f.commission_asset == base)
        .map(|f| Qty::new(f.commission).unwrap_or(Qty::ZERO))
        .sum();
    entry.fees = fills
        .values()
        .map(|f| (f.commission_asset.clone(), f.commission))
        .collect();
    let observed = if evidence.status == EntryStatus::New && !entry.executed_qty.is_zero() {
        EntryStatus::PartiallyFilled
    } else {
        evidence.status
    };
    entry.status = entry.status.merge(observed);
    if entry.order_id.is_none() {
        entry.order_id = evidence.order_id;
    }
    if !entry.executed_qty.is_zero() {
        let first_fill = fills
            .values()
            .map(|f| f.time)
            .min()
            .unwrap_or(evidence.observed_at);
        entry.filled_at = Some(entry.filled_at.map_or(first_fill, |t| t.min(first_fill)));
        // An exit sold the coins it knew of; coins bought after it are bare
        // again, and the entry must be open for sync to see them.
        let exited_before_these = matches!(entry.protection, Protection::Exited { .. })
            && entry.executed_qty > executed_before;
        if entry.protection == Protection::NotNeeded || exited_before_these {
            entry.protection = Protection::Unprotected;
            // The exit's result was the entry's while it held nothing more.
            entry.realized_quote = None;
        }
    }
}

/// [`Store::claim_leg`] under the store's lock.
fn claim_locked(inner: &mut Inner, claim: &LegClaim) -> Result<bool, StoreError> {
    if !inner.entries.contains_key(&claim.key.entry) {
        return Err(not_found("entry", claim.key.entry));
    }
    let list_taken = inner.legs.values().any(|l| l.ids.list == claim.ids.list);
    if inner.legs.contains_key(&claim.key) || list_taken {
        return Ok(false);
    }
    inner.legs.insert(
        claim.key,
        Leg {
            key: claim.key,
            ids: claim.ids.clone(),
            symbol: claim.symbol.clone(),
            qty: claim.qty,
            take_profit: claim.take_profit,
            stop: claim.stop,
            stop_limit: claim.stop_limit,
            state: LegState::Claimed,
            sold: LegSold::default(),
            trades: LegTrades::default(),
            source: claim.source,
            attempts: 1,
            last_error: None,
            claimed_at: claim.at,
            updated_at: claim.at,
        },
    );
    Ok(true)
}

/// [`Store::update_leg`] under the store's lock; with `stale_after`, only
/// if the leg was last written more than that before `update.at`
/// ([`Store::take_over_leg`]).
fn update_locked(
    inner: &mut Inner,
    update: &LegUpdate,
    stale_after: Option<std::time::Duration>,
) -> Result<bool, StoreError> {
    let leg = inner
        .legs
        .get_mut(&update.key)
        .ok_or_else(|| not_found("leg", update.key))?;
    if leg.state.name() != update.from {
        return Ok(false);
    }
    if stale_after.is_some_and(|stale| update.at.since(leg.updated_at) <= stale) {
        return Ok(false);
    }
    leg.state = update.to.clone();
    if update.error.is_some() {
        leg.last_error = update.error.clone();
    }
    leg.updated_at = update.at;
    Ok(true)
}

#[async_trait]
impl Store for MemStore {
    async fn create_account(&self, account: NewAccount) -> Result<Account, StoreError> {
        let mut inner = self.lock();
        if inner
            .accounts
            .values()
            .any(|(a, _)| a.api_key == account.credentials.api_key)
        {
            return Err(StoreError::Conflict(format!(
                "api key {} is already registered",
                account.credentials.api_key
            )));
        }
        inner.next_account += 1;
        let created = Account {
            id: AccountId(inner.next_account),
            owner: account.owner,
            exchange: account.exchange,
            api_key: account.credentials.api_key.clone(),
            protection: account.protection,
            active: true,
        };
        inner
            .accounts
            .insert(created.id, (created.clone(), account.credentials));
        Ok(created)
    }

    async fn account(&self, id: AccountId) -> Result<Account, StoreError> {
        self.lock()
            .accounts
            .get(&id)
            .map(|(a, _)| a.clone())
            .ok_or_else(|| not_found("account", id))
    }

    async fn credentials(&self, id: AccountId) -> Result<ApiCredentials, StoreError> {
        self.lock()
            .accounts
            .get(&id)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| not_found("account", id))
    }

    async fn update_account(
        &self,
        id: AccountId,
        protection: Option<ProtectionConfig>,
        active: Option<bool>,
    ) -> Result<Account, StoreError> {
        let mut inner = self.lock();
        let (account, _) = inner
            .accounts
            .get_mut(&id)
            .ok_or_else(|| not_found("account", id))?;
        if let Some(protection) = protection {
            account.protection = protection;
        }
        if let Some(active) = active {
            account.active = active;
        }
        Ok(account.clone())
    }

    async fn active_accounts(&self) -> Result<Vec<Account>, StoreError> {
        Ok(self
            .lock()
            .accounts
            .values()
            .filter(|(a, _)| a.active)
            .map(|(a, _)| a.clone())
            .collect())
    }

    async fn create_entry(
        &self,
        entry: NewEntry,
        client_id_of: &(dyn Fn(EntryId) -> ClientOrderId + Send + Sync),
        at: Millis,
    ) -> Result<Entry, StoreError> {
        let mut inner = self.lock();
        // A key already used answers with its entry, as PostgreSQL's unique
        // index does, even on an account disabled since.
        if let Some(key) = &entry.idempotency_key
            && let Some(id) = inner.keys.get(&(entry.account, key.clone()))
        {
            let stored = inner
                .entries
                .get(id)
                .cloned()
                .ok_or_else(|| not_found("entry", id))?;
            return Err(StoreError::IdempotencyKeyUsed(Box::new(stored)));
        }
        // Checked under the same lock as the insert: a disable is either
        // before it (refused here) or after it (and sees the entry).
        match inner.accounts.get(&entry.account) {
            None => return Err(not_found("account", entry.account)),
            Some((account, _)) if !account.active => {
                return Err(StoreError::AccountInactive {
                    account: entry.account,
                });
            }
            Some(_) => {}
        }
        inner.next_entry += 1;
        let id = EntryId(inner.next_entry);
        let created = Entry {
            id,
            account: entry.account,
            symbol: entry.symbol,
            client_id: client_id_of(id),
            order_id: None,
            kind: entry.kind,
            size: entry.size,
            status: EntryStatus::PendingNew,
            executed_qty: Qty::ZERO,
            cumulative_quote: Decimal::ZERO,
            base_commission: Qty::ZERO,
            fees: Fees::default(),
            fills_qty: Qty::ZERO,
            levels: entry.levels,
            tags: entry.tags,
            filled_at: None,
            protection: Protection::NotNeeded,
            realized_quote: None,
            fees_complete: false,
            created_at: at,
        };
        inner.entries.insert(id, created.clone());
        if let Some(key) = entry.idempotency_key {
            inner.keys.insert((entry.account, key), id);
        }
        Ok(created)
    }

    async fn release_idempotency_key(&self, id: EntryId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if !inner.entries.contains_key(&id) {
            return Err(not_found("entry", id));
        }
        inner.keys.retain(|_, holder| *holder != id);
        Ok(())
    }

    async fn entry(&self, id: EntryId) -> Result<Entry, StoreError> {
        self.lock()
            .entries
            .get(&id)
            .cloned()
            .ok_or_else(|| not_found("entry", id))
    }

    async fn open_entries(&self, account: AccountId) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .lock()
            .entries
            .values()
            .filter(|e| e.account == account && is_open(e))
            .cloned()
            .collect())
    }

    async fn record_evidence(&self, id: EntryId, evidence: &Evidence) -> Result<Entry, StoreError> {
        let mut inner = self.lock();
        let mut entry = inner
            .entries
            .get(&id)
            .cloned()
            .ok_or_else(|| not_found("entry", id))?;
        let mut fills = inner.fills.get(&id).cloned().unwrap_or_default();
        merge_evidence(&mut entry, &mut fills, evidence);
        inner.fills.insert(id, fills);
        inner.entries.insert(id, entry.clone());
        Ok(entry)
    }

    async fn set_protection(&self, id: EntryId, protection: &Protection) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let entry = inner
            .entries
            .get_mut(&id)
            .ok_or_else(|| not_found("entry", id))?;
        if !is_settled(&entry.protection) {
            if !matches!(protection, Protection::Exited { .. }) {
                entry.realized_quote = None;
            }
            entry.protection = protection.clone();
        }
        Ok(())
    }

    async fn close_entry(
        &self,
        id: EntryId,
        realized: Realized,
        _at: Millis,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let entry = inner
            .entries
            .get_mut(&id)
            .ok_or_else(|| not_found("entry", id))?;
        entry.protection = Protection::Closed;
        entry.realized_quote = Some(realized.quote);
        entry.fees_complete = realized.fees_complete;
        Ok(())
    }

    async fn exit_entry(
        &self,
        id: EntryId,
        reason: &str,
        realized: Realized,
        read: &Entry,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let entry = inner
            .entries
            .get_mut(&id)
            .ok_or_else(|| not_found("entry", id))?;
        if is_settled(&entry.protection)
            || entry.executed_qty != read.executed_qty
            || entry.protection != read.protection
        {
            return Ok(false);
        }
        entry.protection = Protection::Exited {
            reason: reason.to_owned(),
        };
        entry.realized_quote = Some(realized.quote);
        entry.fees_complete = realized.fees_complete;
        Ok(true)
    }

    async fn legs(&self, entry: EntryId) -> Result<Vec<Leg>, StoreError> {
        Ok(self
            .lock()
            .legs
            .values()
            .filter(|l| l.key.entry == entry)
            .cloned()
            .collect())
    }

    async fn claim_leg(&self, claim: &LegClaim) -> Result<bool, StoreError> {
        claim_locked(&mut self.lock(), claim)
    }

    async fn update_leg(&self, update: &LegUpdate) -> Result<bool, StoreError> {
        update_locked(&mut self.lock(), update, None)
    }

    async fn take_over_leg(
        &self,
        update: &LegUpdate,
        stale_after: std::time::Duration,
    ) -> Result<bool, StoreError> {
        update_locked(&mut self.lock(), update, Some(stale_after))
    }

    async fn record_leg_sold(
        &self,
        key: LegKey,
        sold: LegSold,
        at: Millis,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let leg = inner
            .legs
            .get_mut(&key)
            .ok_or_else(|| not_found("leg", key))?;
        leg.sold = leg.sold.merge(sold);
        leg.updated_at = at;
        Ok(())
    }

    async fn record_leg_trades(
        &self,
        key: LegKey,
        side: SaleSide,
        trades: &[Fill],
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let account = inner
            .entries
            .get(&key.entry)
            .map(|e| e.account)
            .ok_or_else(|| not_found("entry", key.entry))?;
        let symbol = inner
            .legs
            .get(&key)
            .map(|l| l.symbol.clone())
            .ok_or_else(|| not_found("leg", key))?;
        for trade in trades {
            let id = (account, symbol.clone(), trade.trade_id);
            if inner.leg_trades.contains_key(&id) {
                continue;
            }
            inner.leg_trades.insert(id, key);
            if let Some(leg) = inner.legs.get_mut(&key) {
                leg.trades.add(side, trade);
            }
        }
        Ok(())
    }

    async fn append_event(&self, event: &EntryEventRecord) -> Result<(), StoreError> {
        self.lock().events.push(event.clone());
        Ok(())
    }

    async fn events(&self, entry: EntryId) -> Result<Vec<EntryEventRecord>, StoreError> {
        Ok(self
            .lock()
            .events
            .iter()
            .filter(|e| e.entry == entry)
            .cloned()
            .collect())
    }

    async fn flag_reconcile(
        &self,
        account: AccountId,
        _reason: &str,
        _at: Millis,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        // As PostgreSQL's foreign key: only an account that exists is flagged.
        if !inner.accounts.contains_key(&account) {
            return Err(not_found("account", account));
        }
        inner.flagged.insert(account);
        Ok(())
    }

    async fn take_flagged(&self, limit: usize) -> Result<Vec<AccountId>, StoreError> {
        let mut inner = self.lock();
        let taken: Vec<AccountId> = inner.flagged.iter().take(limit).copied().collect();
        for id in &taken {
            inner.flagged.remove(id);
        }
        Ok(taken)
    }

    async fn take_due_accounts(
        &self,
        holder: &str,
        interval: std::time::Duration,
        lease: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<AccountId>, StoreError> {
        let now = std::time::Instant::now();
        let mut inner = self.lock();
        let mut due: Vec<(Option<std::time::Instant>, AccountId)> = inner
            .accounts
            .values()
            .filter(|(a, _)| a.active)
            .map(|(a, _)| (inner.reconciled.get(&a.id).copied(), a.id))
            .filter(|(last, id)| match inner.retry_at.get(id) {
                // A pending retry rules over the interval, as in PostgreSQL.
                Some(at) => *at <= now,
                None => last.is_none_or(|at| now.duration_since(at) >= interval),
            })
            .filter(|(_, id)| {
                inner
                    .due_taken
                    .get(id)
                    .is_none_or(|(_, until)| *until <= now)
            })
            .collect();
        // Never reconciled first (None sorts first), then the oldest.
        due.sort();
        let taken: Vec<AccountId> = due.into_iter().take(limit).map(|(_, id)| id).collect();
        for id in &taken {
            inner
                .due_taken
                .insert(*id, (holder.to_owned(), now + lease));
        }
        Ok(taken)
    }

    async fn mark_reconciled(
        &self,
        account: AccountId,
        since: std::time::Instant,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if !inner.accounts.contains_key(&account) {
            return Err(not_found("account", account));
        }
        inner.due_taken.remove(&account);
        if inner
            .retry_written
            .get(&account)
            .is_none_or(|at| *at < since)
        {
            inner.retry_at.remove(&account);
            inner.retry_written.remove(&account);
        }
        inner.reconciled.insert(account, std::time::Instant::now());
        Ok(())
    }

    async fn defer_reconcile(
        &self,
        account: AccountId,
        after: std::time::Duration,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if !inner.accounts.contains_key(&account) {
            return Err(not_found("account", account));
        }
        inner.due_taken.remove(&account);
        let now = std::time::Instant::now();
        inner.retry_at.insert(account, now + after);
        inner.retry_written.insert(account, now);
        Ok(())
    }

    async fn take_due_retries(
        &self,
        holder: &str,
        lease: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<AccountId>, StoreError> {
        let now = std::time::Instant::now();
        let mut inner = self.lock();
        let mut due: Vec<(std::time::Instant, AccountId)> = inner
            .retry_at
            .iter()
            .filter(|(id, at)| {
                **at <= now
                    && inner.accounts.get(id).is_some_and(|(a, _)| a.active)
                    && inner
                        .due_taken
                        .get(id)
                        .is_none_or(|(_, until)| *until <= now)
            })
            .map(|(id, at)| (*at, *id))
            .collect();
        due.sort();
        let taken: Vec<AccountId> = due.into_iter().take(limit).map(|(_, id)| id).collect();
        for id in &taken {
            inner
                .due_taken
                .insert(*id, (holder.to_owned(), now + lease));
        }
        Ok(taken)
    }

    async fn claim_legs(&self, claims: &[LegClaim]) -> Result<Vec<bool>, StoreError> {
        let mut inner = self.lock();
        // A generation is won whole or not at all: its lowest leg here (its
        // lead) decides, whatever the order of the claims.
        let generation = |c: &LegClaim| (c.key.entry, c.key.generation);
        let is_lead = |claim: &LegClaim| {
            claims
                .iter()
                .filter(|c| generation(c) == generation(claim))
                .all(|c| c.key.leg.number() >= claim.key.leg.number())
        };
        let mut led = BTreeMap::new();
        for claim in claims.iter().filter(|c| is_lead(c)) {
            led.insert(generation(claim), claim_locked(&mut inner, claim)?);
        }
        let mut won = Vec::with_capacity(claims.len());
        for claim in claims {
            let lead_won = led.get(&generation(claim)).copied().unwrap_or(false);
            won.push(if is_lead(claim) {
                lead_won
            } else {
                lead_won && claim_locked(&mut inner, claim)?
            });
        }
        Ok(won)
    }

    async fn record_outcomes(
        &self,
        entry: EntryId,
        updates: &[LegUpdate],
        events: &[EntryEventRecord],
        protection: Option<&Protection>,
    ) -> Result<RecordedOutcomes, StoreError> {
        let mut inner = self.lock();
        // Everything is checked before anything changes: all or nothing.
        if !inner.entries.contains_key(&entry) {
            return Err(not_found("entry", entry));
        }
        if let Some(u) = updates.iter().find(|u| !inner.legs.contains_key(&u.key)) {
            return Err(not_found("leg", u.key));
        }
        let mut applied = Vec::with_capacity(updates.len());
        for update in updates {
            let Some(leg) = inner.legs.get_mut(&update.key) else {
                return Err(not_found("leg", update.key));
            };
            if leg.state.name() != update.from {
                applied.push(false);
                continue;
            }
            leg.state = update.to.clone();
            if update.error.is_some() {
                leg.last_error = update.error.clone();
            }
            leg.updated_at = update.at;
            applied.push(true);
        }
        inner.events.extend(events.iter().cloned());
        let Some(e) = inner.entries.get_mut(&entry) else {
            return Err(not_found("entry", entry));
        };
        if let Some(p) = protection
            && !is_settled(&e.protection)
        {
            e.protection = p.clone();
        }
        let entry = e.clone();
        Ok(RecordedOutcomes { applied, entry })
    }
}

#[async_trait]
impl Leases for MemStore {
    async fn acquire_leases(
        &self,
        holder: &str,
        max: usize,
        ttl: std::time::Duration,
    ) -> Result<Vec<(AccountId, bool)>, StoreError> {
        let now = std::time::Instant::now();
        let mut inner = self.lock();
        let candidates: Vec<(AccountId, bool)> = inner
            .accounts
            .values()
            .filter(|(a, _)| a.active)
            .filter_map(|(a, _)| match inner.leases.get(&a.id) {
                None => Some((a.id, false)),
                Some((h, until)) if h != holder && *until <= now => Some((a.id, true)),
                Some(_) => None,
            })
            .take(max)
            .collect();
        for (id, _) in &candidates {
            inner.leases.insert(*id, (holder.to_owned(), now + ttl));
        }
        Ok(candidates)
    }

    async fn renew_leases(
        &self,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<Vec<AccountId>, StoreError> {
        let now = std::time::Instant::now();
        let mut inner = self.lock();
        let mut held = Vec::new();
        for (id, (h, until)) in inner.leases.iter_mut() {
            if h == holder && *until > now {
                *until = now + ttl;
                held.push(*id);
            }
        }
        Ok(held)
    }

    async fn release_leases(&self, holder: &str) -> Result<(), StoreError> {
        self.lock().leases.retain(|_, (h, _)| h != holder);
        Ok(())
    }
}

#[async_trait]
impl Users for MemStore {
    async fn create_user(&self, name: &str, token_hash: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.users.contains_key(name) {
            return Err(StoreError::Conflict(format!("user {name} already exists")));
        }
        inner.users.insert(name.to_owned(), token_hash.to_owned());
        Ok(())
    }

    async fn user_by_token(&self, token_hash: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .lock()
            .users
            .iter()
            .find(|(_, h)| h.as_str() == token_hash)
            .map(|(n, _)| n.clone()))
    }

    async fn accounts_of(&self, owner: &str) -> Result<Vec<Account>, StoreError> {
        Ok(self
            .lock()
            .accounts
            .values()
            .filter(|(a, _)| a.owner == owner)
            .map(|(a, _)| a.clone())
            .collect())
    }

    async fn entries_of(
        &self,
        account: AccountId,
        status: Option<EntryStatus>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .lock()
            .entries
            .values()
            .rev()
            .filter(|e| e.account == account && status.is_none_or(|s| e.status == s))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn entry_by_idempotency_key(
        &self,
        account: AccountId,
        key: &IdempotencyKey,
    ) -> Result<Option<Entry>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .keys
            .get(&(account, key.clone()))
            .and_then(|id| inner.entries.get(id))
            .cloned())
    }
}

/// Whether an entry still needs attention: its order can fill, or filled coins
/// are not yet known sold.
pub fn is_open(entry: &Entry) -> bool {
    !entry.status.is_final()
        || !matches!(
            entry.protection,
            Protection::Closed | Protection::Exited { .. } | Protection::NotNeeded
        )
}

/// Whether a protection state is final: a protection write
/// ([`Store::set_protection`], [`Store::record_outcomes`]) leaves it as it is.
/// Only `Closed` is: every coin is known sold, and a write over it comes from
/// a copy of the entry read before it closed (a placer whose take-profit
/// filled, and closed the entry, while it placed). `Exited` is not: coins
/// filled after an exit are protected again.
pub fn is_settled(protection: &Protection) -> bool {
    *protection == Protection::Closed
}

/// Whether a leg's list was acknowledged by the exchange at some point.
pub fn was_placed(state: &LegState) -> bool {
    matches!(
        state,
        LegState::Placed { .. }
            | LegState::TakeProfitFilled
            | LegState::StopLossFilled
            | LegState::CanceledExternally { .. }
            | LegState::Replaced
    )
}

#[async_trait]
impl Coverage for MemStore {
    async fn coverage(
        &self,
        owner: Option<&str>,
        limit: usize,
    ) -> Result<CoverageReport, StoreError> {
        let inner = self.lock();
        let owned = |account: AccountId| {
            owner.is_none_or(|o| {
                inner
                    .accounts
                    .get(&account)
                    .is_some_and(|(a, _)| a.owner == o)
            })
        };
        let mut report = CoverageReport::default();
        let mut unprotected = Vec::new();
        for e in inner.entries.values().filter(|e| owned(e.account)) {
            let state = match e.protection {
                Protection::Protected { .. } => {
                    report.filled += 1;
                    report.protected += 1;
                    continue;
                }
                Protection::Unprotected => "unprotected",
                Protection::Unprotectable { .. } => "unprotectable",
                _ => continue,
            };
            report.filled += 1;
            report.unprotected_count += 1;
            unprotected.push(UnprotectedEntry {
                entry: e.id,
                account: e.account,
                client_id: e.client_id.to_string(),
                symbol: e.symbol.name.clone(),
                filled_at: e.filled_at.unwrap_or(e.created_at),
                state,
            });
        }
        unprotected.sort_by_key(|u| (u.filled_at, u.entry));
        unprotected.truncate(limit);
        report.unprotected = unprotected;
        report.placements = [Source::Websocket, Source::Sync, Source::Direct]
            .into_iter()
            .map(|source| {
                let n = inner
                    .legs
                    .values()
                    .filter(|l| l.source == source && was_placed(&l.state))
                    .filter(|l| {
                        inner
                            .entries
                            .get(&l.key.entry)
                            .is_some_and(|e| owned(e.account))
                    })
                    .count();
                (source, n as u64)
            })
            .collect();
        Ok(report)
    }

    async fn recent_events(
        &self,
        owner: &str,
        limit: usize,
    ) -> Result<Vec<EntryEventRecord>, StoreError> {
        let inner = self.lock();
        let mut events: Vec<(usize, &EntryEventRecord)> = inner
            .events
            .iter()
            .enumerate()
            .filter(|(_, ev)| {
                inner
                    .entries
                    .get(&ev.entry)
                    .and_then(|e| inner.accounts.get(&e.account))
                    .is_some_and(|(a, _)| a.owner == owner)
            })
            .collect();
        // Newest first; lines of one moment in the order they were written, reversed.
        events.sort_by(|a, b| b.1.at.cmp(&a.1.at).then(b.0.cmp(&a.0)));
        Ok(events
            .into_iter()
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }
}
