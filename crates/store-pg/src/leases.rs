//! Account leases: each active account is streamed by one gateway at a time.
//! A lease expires unless renewed, so a dead node's accounts move to live
//! ones. Expiry is judged on the database clock (`now()`), the one clock all
//! nodes share.
//!
//! Every statement here runs on the store's lease pool, never on the one the
//! fills write through: a gateway lets all its accounts go when its renewals
//! stop going through, and must not take a burst of fills for a lost database.

use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bool, Text};
use diesel_async::RunQueryDsl;
use oco_core::{AccountId, StoreError};

use crate::error::db;
use crate::store::PgStore;

#[derive(QueryableByName)]
struct MarkedRow {
    #[diesel(sql_type = BigInt)]
    account_id: i64,
    #[diesel(sql_type = Bool)]
    taken_over: bool,
}

#[derive(QueryableByName)]
struct AccountIdRow {
    #[diesel(sql_type = BigInt)]
    account_id: i64,
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

fn ids(mut rows: Vec<AccountIdRow>) -> Vec<AccountId> {
    rows.sort_unstable_by_key(|r| r.account_id);
    rows.into_iter().map(|r| AccountId(r.account_id)).collect()
}

impl PgStore {
    /// Takes up to `max` leases that are free or expired, on active accounts,
    /// for `holder` until `ttl` from now; returns the accounts newly taken
    /// (not those `holder` already held). Concurrent acquirers never take the
    /// same account: candidates are locked with `FOR UPDATE SKIP LOCKED`.
    ///
    /// # Errors
    /// `Unavailable` when the database cannot be reached.
    pub async fn acquire_leases(
        &self,
        holder: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<AccountId>, StoreError> {
        Ok(self
            .acquire_leases_marked(holder, max, ttl)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// [`PgStore::acquire_leases`], telling for each account whether it was
    /// taken over from an expired lease (its holder died or stalled, so its
    /// events may have been missed) rather than found free.
    ///
    /// # Errors
    /// `Unavailable` when the database cannot be reached.
    pub async fn acquire_leases_marked(
        &self,
        holder: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<(AccountId, bool)>, StoreError> {
        let mut conn = self.lease_conn().await?;
        let mut rows: Vec<MarkedRow> = diesel::sql_query(
            "WITH candidates AS ( \
                 SELECT a.id, l.holder AS previous FROM accounts a \
                 LEFT JOIN account_leases l ON l.account_id = a.id \
                 WHERE a.active AND (l.account_id IS NULL OR l.expires_at <= now()) \
                 ORDER BY a.id LIMIT $2 \
                 FOR UPDATE OF a SKIP LOCKED), \
             taken AS ( \
                 INSERT INTO account_leases (account_id, holder, expires_at) \
                 SELECT id, $1, now() + $3 * interval '1 millisecond' FROM candidates \
                 ON CONFLICT (account_id) DO UPDATE \
                     SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at \
                     WHERE account_leases.expires_at <= now() \
                 RETURNING account_id) \
             SELECT t.account_id, (c.previous IS NOT NULL) AS taken_over \
             FROM taken t JOIN candidates c ON c.id = t.account_id",
        )
        .bind::<Text, _>(holder)
        .bind::<BigInt, _>(i64::try_from(max).unwrap_or(i64::MAX))
        .bind::<BigInt, _>(ttl_ms(ttl))
        .load(&mut conn)
        .await
        .map_err(|e| db(&format!("acquiring leases for {holder}"), e))?;
        rows.sort_unstable_by_key(|r| r.account_id);
        Ok(rows
            .into_iter()
            .map(|r| (AccountId(r.account_id), r.taken_over))
            .collect())
    }

    /// Extends every lease `holder` still holds on an active account to `ttl`
    /// from now and returns those accounts; leases on accounts disabled since
    /// are dropped. A lease lost to another holder after expiring is not in
    /// the answer: stop streaming it.
    ///
    /// # Errors
    /// `Unavailable` when the database cannot be reached.
    pub async fn renew_leases(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> Result<Vec<AccountId>, StoreError> {
        let mut conn = self.lease_conn().await?;
        let rows: Vec<AccountIdRow> = diesel::sql_query(
            "WITH dropped AS ( \
                 DELETE FROM account_leases l USING accounts a \
                 WHERE l.account_id = a.id AND l.holder = $1 AND NOT a.active) \
             UPDATE account_leases l SET expires_at = now() + $2 * interval '1 millisecond' \
             FROM accounts a \
             WHERE l.account_id = a.id AND l.holder = $1 AND a.active \
             RETURNING l.account_id",
        )
        .bind::<Text, _>(holder)
        .bind::<BigInt, _>(ttl_ms(ttl))
        .load(&mut conn)
        .await
        .map_err(|e| db(&format!("renewing the leases of {holder}"), e))?;
        Ok(ids(rows))
    }

    /// Gives up every lease of `holder` (clean shutdown); returns how many.
    ///
    /// # Errors
    /// `Unavailable` when the database cannot be reached.
    pub async fn release_leases(&self, holder: &str) -> Result<usize, StoreError> {
        let mut conn = self.lease_conn().await?;
        diesel::sql_query("DELETE FROM account_leases WHERE holder = $1")
            .bind::<Text, _>(holder)
            .execute(&mut conn)
            .await
            .map_err(|e| db(&format!("releasing the leases of {holder}"), e))
    }
}

// Any holder other than the one that released it cleanly may have missed events:
// an expired lease is reported as a takeover so the gateway flags the account.
#[async_trait::async_trait]
impl oco_core::ports::Leases for PgStore {
    async fn acquire_leases(
        &self,
        holder: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<(AccountId, bool)>, StoreError> {
        self.acquire_leases_marked(holder, max, ttl).await
    }

    async fn renew_leases(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> Result<Vec<AccountId>, StoreError> {
        PgStore::renew_leases(self, holder, ttl).await
    }

    async fn release_leases(&self, holder: &str) -> Result<(), StoreError> {
        PgStore::release_leases(self, holder).await.map(|_| ())
    }
}
