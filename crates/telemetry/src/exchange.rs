//! An [`Exchange`] decorator that counts every error by code.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use oco_core::ports::{
    ApiCredentials, Balance, CancelOutcome, Exchange, ExchangeError, ListCancelOutcome, OcoAck,
    OcoRequest, OrderListSnapshot, OrderRequest, OrderSnapshot,
};
use oco_core::{Fill, Price, SymbolRules};

use crate::metrics::Metrics;

/// The `code` label of an error: the exchange's code for a refusal (codes
/// beyond four digits collapse to `other`, so the label stays bounded), the
/// kind otherwise; `None` for "not found", the normal answer to a lookup.
pub fn error_code(err: &ExchangeError) -> Option<String> {
    Some(match err {
        ExchangeError::Rejected { code, .. } if code.unsigned_abs() < 10_000 => code.to_string(),
        ExchangeError::Rejected { .. } => "other".to_owned(),
        ExchangeError::UnknownOutcome(_) => "unknown_outcome".to_owned(),
        ExchangeError::RateLimited { .. } => "rate_limited".to_owned(),
        ExchangeError::Transient(_) => "transient".to_owned(),
        ExchangeError::Auth(_) => "auth".to_owned(),
        ExchangeError::NotFound => return None,
    })
}

/// Passes every call to the inner exchange and counts its errors in
/// `oco_exchange_errors_total{code}`.
pub struct ObservedExchange {
    inner: Arc<dyn Exchange>,
    metrics: Arc<Metrics>,
}

impl ObservedExchange {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Exchange>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn seen<T>(&self, result: Result<T, ExchangeError>) -> Result<T, ExchangeError> {
        if let Err(err) = &result {
            self.metrics.exchange_error(err);
        }
        result
    }
}

#[async_trait]
impl Exchange for ObservedExchange {
    async fn symbol_rules(&self, symbol: &str) -> Result<SymbolRules, ExchangeError> {
        self.seen(self.inner.symbol_rules(symbol).await)
    }

    fn invalidate_rules(&self, symbol: &str) {
        self.inner.invalidate_rules(symbol);
    }

    fn cached_symbol_rules(&self, symbol: &str) -> Option<SymbolRules> {
        self.inner.cached_symbol_rules(symbol)
    }

    fn placements_held(&self, creds: &ApiCredentials, lists: u32) -> Option<Duration> {
        self.inner.placements_held(creds, lists)
    }

    async fn last_price(&self, symbol: &str) -> Result<Price, ExchangeError> {
        self.seen(self.inner.last_price(symbol).await)
    }

    async fn balances(&self, creds: &ApiCredentials) -> Result<Vec<Balance>, ExchangeError> {
        self.seen(self.inner.balances(creds).await)
    }

    async fn place_order(
        &self,
        creds: &ApiCredentials,
        order: &OrderRequest,
    ) -> Result<OrderSnapshot, ExchangeError> {
        self.seen(self.inner.place_order(creds, order).await)
    }

    async fn query_order(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        client_id: &str,
    ) -> Result<OrderSnapshot, ExchangeError> {
        self.seen(self.inner.query_order(creds, symbol, client_id).await)
    }

    async fn order_trades(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        order_id: i64,
    ) -> Result<Vec<Fill>, ExchangeError> {
        self.seen(self.inner.order_trades(creds, symbol, order_id).await)
    }

    async fn cancel_order(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        client_id: &str,
    ) -> Result<CancelOutcome, ExchangeError> {
        self.seen(self.inner.cancel_order(creds, symbol, client_id).await)
    }

    async fn place_oco(
        &self,
        creds: &ApiCredentials,
        oco: &OcoRequest,
    ) -> Result<OcoAck, ExchangeError> {
        self.seen(self.inner.place_oco(creds, oco).await)
    }

    async fn open_order_ids(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
    ) -> Result<Option<Vec<String>>, ExchangeError> {
        self.seen(self.inner.open_order_ids(creds, symbol).await)
    }

    async fn order_list(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        list_client_id: &str,
    ) -> Result<Option<OrderListSnapshot>, ExchangeError> {
        self.seen(self.inner.order_list(creds, symbol, list_client_id).await)
    }

    async fn open_order_lists(
        &self,
        creds: &ApiCredentials,
    ) -> Result<Vec<OrderListSnapshot>, ExchangeError> {
        self.seen(self.inner.open_order_lists(creds).await)
    }

    async fn cancel_order_list(
        &self,
        creds: &ApiCredentials,
        symbol: &str,
        list_client_id: &str,
    ) -> Result<ListCancelOutcome, ExchangeError> {
        self.seen(
            self.inner
                .cancel_order_list(creds, symbol, list_client_id)
                .await,
        )
    }
}
