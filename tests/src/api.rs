//! A client of the entry API, as a user or signal service sees it.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::wait::wait_for;

/// One user's view of the API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client of the API at `base` with `token`.
    pub fn new(base: &str, token: &str) -> ApiClient {
        ApiClient {
            base: base.to_owned(),
            token: token.to_owned(),
            http: crate::http_client(Duration::from_secs(20)),
        }
    }

    /// Waits until the API answers.
    ///
    /// # Errors
    /// When it does not within `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let url = format!("{}/v1/openapi.json", self.base);
        wait_for("the API to answer", timeout, || async {
            let reply = self.http.get(&url).send().await.ok()?;
            reply.status().is_success().then_some(())
        })
        .await
    }

    /// Sends `method path` with `body`; `(status, body)`.
    ///
    /// # Errors
    /// Transport errors (the request may or may not have been applied).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let reply = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = reply.status().as_u16();
        let text = reply
            .text()
            .await
            .with_context(|| format!("{method} {path}"))?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Registers an exchange account; its id.
    ///
    /// # Errors
    /// Anything but 201.
    pub async fn create_account(&self, api_key: &str, secret: &str) -> anyhow::Result<i64> {
        let (status, body) = self
            .send(
                reqwest::Method::POST,
                "/v1/accounts",
                Some(json!({"exchange": "binance", "apiKey": api_key, "apiSecret": secret})),
            )
            .await?;
        if status != 201 {
            bail!("POST /v1/accounts: {status} {body}");
        }
        body["id"].as_i64().context("account id")
    }

    /// `POST /v1/entries`.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn post_entry(&self, entry: Value) -> anyhow::Result<(u16, Value)> {
        self.send(reqwest::Method::POST, "/v1/entries", Some(entry))
            .await
    }

    /// `GET /v1/entries/{id}`.
    ///
    /// # Errors
    /// Transport errors and anything but 200.
    pub async fn entry(&self, id: i64) -> anyhow::Result<Value> {
        let (status, body) = self
            .send(reqwest::Method::GET, &format!("/v1/entries/{id}"), None)
            .await?;
        if status != 200 {
            bail!("GET /v1/entries/{id}: {status} {body}");
        }
        Ok(body)
    }
}
