//! Binance-shaped API errors (`{"code":..,"msg":..}`) and the crate's own error type.

use std::fmt;

/// Errors of the simulator's own API (start-up, control operations).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The listen address could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// Address that was asked for.
        addr: std::net::SocketAddr,
        /// The IO error.
        source: std::io::Error,
    },
    /// An IO error while serving.
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    /// A symbol the simulator does not list.
    #[error("unknown symbol {0}")]
    UnknownSymbol(String),
    /// An API key the simulator does not know.
    #[error("unknown api key {0}")]
    UnknownAccount(String),
    /// A value the control API refuses (reason inside).
    #[error("invalid value: {0}")]
    Invalid(String),
}

/// An error answered to a client: HTTP status, Binance code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: u16,
    pub code: i64,
    pub msg: String,
    /// Seconds for a `Retry-After` header (429/418).
    pub retry_after: Option<u64>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.msg)
    }
}

impl ApiError {
    pub fn new(status: u16, code: i64, msg: impl Into<String>) -> Self {
        Self {
            status,
            code,
            msg: msg.into(),
            retry_after: None,
        }
    }

    /// HTTP 400 with the given code and message.
    pub fn bad(code: i64, msg: impl Into<String>) -> Self {
        Self::new(400, code, msg)
    }

    pub fn body(&self) -> String {
        serde_json::json!({"code": self.code, "msg": self.msg}).to_string()
    }

    pub fn mandatory(name: &str) -> Self {
        Self::bad(
            -1102,
            format!("Mandatory parameter '{name}' was not sent, was empty/null, or malformed."),
        )
    }

    pub fn either(a: &str, b: &str) -> Self {
        Self::bad(
            -1102,
            format!("Param '{a}' or '{b}' must be sent, but both were empty/null!"),
        )
    }

    pub fn empty(name: &str) -> Self {
        Self::bad(-1105, format!("Parameter '{name}' was empty."))
    }

    pub fn not_required(name: &str) -> Self {
        Self::bad(-1106, format!("Parameter '{name}' sent when not required."))
    }

    pub fn illegal(name: &str, range: &str) -> Self {
        Self::bad(
            -1100,
            format!("Illegal characters found in parameter '{name}'; legal range is '{range}'."),
        )
    }

    pub fn precision(name: &str) -> Self {
        Self::bad(-1111, format!("Parameter '{name}' has too much precision."))
    }

    pub fn filter(name: &str) -> Self {
        Self::bad(-1013, format!("Filter failure: {name}"))
    }

    /// Matching-engine rejection (`-2010`).
    pub fn rejected(msg: &str) -> Self {
        Self::bad(-2010, msg)
    }

    pub fn dup() -> Self {
        Self::rejected("Duplicate order sent.")
    }

    pub fn insufficient() -> Self {
        Self::rejected("Account has insufficient balance for requested action.")
    }

    pub fn bad_symbol() -> Self {
        Self::bad(-1121, "Invalid symbol.")
    }

    pub fn no_order() -> Self {
        Self::bad(-2013, "Order does not exist.")
    }

    pub fn no_list() -> Self {
        Self::bad(-2018, "Order list does not exist.")
    }

    pub fn unknown_cancel() -> Self {
        Self::bad(-2011, "Unknown order sent.")
    }

    pub fn unknown_list_cancel() -> Self {
        Self::bad(-2011, "Unknown order list sent.")
    }

    pub fn bad_key() -> Self {
        Self::new(
            401,
            -2015,
            "Invalid API-key, IP, or permissions for action.",
        )
    }

    pub fn key_format() -> Self {
        Self::new(401, -2014, "API-key format invalid.")
    }

    pub fn signature() -> Self {
        Self::bad(-1022, "Signature for this request is not valid.")
    }

    pub fn recv_window() -> Self {
        Self::bad(
            -1021,
            "Timestamp for this request is outside of the recvWindow.",
        )
    }

    pub fn ahead() -> Self {
        Self::bad(
            -1021,
            "Timestamp for this request was 1000ms ahead of the server's time.",
        )
    }

    pub fn unknown_outcome() -> Self {
        Self::new(
            503,
            -1007,
            "Timeout waiting for response from backend server. Send status unknown; execution status unknown.",
        )
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}
