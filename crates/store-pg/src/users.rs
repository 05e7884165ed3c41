//! Users of the entry API: names and token hashes, what they own.

use async_trait::async_trait;
use diesel::QueryableByName;
use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_async::RunQueryDsl;
use oco_core::ports::Users;
use oco_core::state::EntryStatus;
use oco_core::{Account, AccountId, Entry, IdempotencyKey, StoreError};

use crate::error::db;
use crate::rows::{AccountRow, EntryRow};
use crate::schema::{accounts, entries};
use crate::store::PgStore;

#[derive(QueryableByName)]
struct NameRow {
    #[diesel(sql_type = Text)]
    name: String,
}

#[async_trait]
impl Users for PgStore {
    async fn create_user(&self, name: &str, token_hash: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let inserted = diesel::sql_query(
            "INSERT INTO users (name, token_hash) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind::<Text, _>(name)
        .bind::<Text, _>(token_hash)
        .execute(&mut conn)
        .await
        .map_err(|e| db(&format!("creating user {name}"), e))?;
        if inserted == 0 {
            return Err(StoreError::Conflict(format!("user {name} already exists")));
        }
        Ok(())
    }

    async fn user_by_token(&self, token_hash: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        let rows: Vec<NameRow> = diesel::sql_query("SELECT name FROM users WHERE token_hash = $1")
            .bind::<Text, _>(token_hash)
            .load(&mut conn)
            .await
            .map_err(|e| db("looking a token up", e))?;
        Ok(rows.into_iter().next().map(|r| r.name))
    }

    async fn accounts_of(&self, owner: &str) -> Result<Vec<Account>, StoreError> {
        let mut conn = self.conn().await?;
        accounts::table
            .filter(accounts::owner.eq(owner))
            .order(accounts::id)
            .select(AccountRow::as_select())
            .load(&mut conn)
            .await
            .map_err(|e| db(&format!("listing the accounts of {owner}"), e))?
            .into_iter()
            .map(AccountRow::into_account)
            .collect()
    }

    async fn entries_of(
        &self,
        account: AccountId,
        status: Option<EntryStatus>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut conn = self.conn().await?;
        let mut query = entries::table
            .filter(entries::account_id.eq(account.0))
            .order(entries::id.desc())
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .select(EntryRow::as_select())
            .into_boxed();
        if let Some(status) = status {
            query = query.filter(entries::status.eq(status.name()));
        }
        query
            .load(&mut conn)
            .await
            .map_err(|e| db(&format!("listing the entries of account {account}"), e))?
            .into_iter()
            .map(EntryRow::into_entry)
            .collect()
    }

    async fn entry_by_idempotency_key(
        &self,
        account: AccountId,
        key: &IdempotencyKey,
    ) -> Result<Option<Entry>, StoreError> {
        let mut conn = self.conn().await?;
        PgStore::load_entry_by_key(&mut conn, account, key).await
    }
}
