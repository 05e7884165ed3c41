//! Binance answers and transport failures, mapped into the domain's
//! [`ExchangeError`] kinds. One table, used by REST and the stream alike.

use std::time::Duration;

use oco_core::ExchangeError;

/// Errors of the adapter's own constructors.
#[derive(Debug, thiserror::Error)]
pub enum BinanceError {
    /// A URL in the config does not parse or has the wrong scheme.
    #[error("invalid {what} url '{url}': {reason}")]
    BadUrl {
        /// Which setting.
        what: &'static str,
        /// The value given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// A config value is out of its range.
    #[error("invalid {field}: {reason}")]
    BadConfig {
        /// Which setting.
        field: &'static str,
        /// The value and the rule it breaks.
        reason: String,
    },
    /// The HTTP client could not be built (TLS setup).
    #[error("cannot build the http client: {0}")]
    Client(String),
}

/// Whether a request can change the account: decides how an unclear answer
/// is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Reads only: an unclear answer is simply a failed read.
    Read,
    /// Places or cancels: an unclear answer may hide a success.
    Write,
}

/// Retry-After used when a 429 carries no header.
const DEFAULT_429_WAIT: Duration = Duration::from_secs(10);
/// Retry-After used when a 418 carries no header (Binance's shortest ban).
const DEFAULT_418_WAIT: Duration = Duration::from_secs(120);

/// Maps an HTTP answer that is not a success.
///
/// `code`/`msg` come from Binance's `{"code","msg"}` body when it parsed.
pub fn map_http_error(
    op: Op,
    status: u16,
    code: Option<i64>,
    msg: Option<&str>,
    retry_after: Option<Duration>,
) -> ExchangeError {
    let text = msg.unwrap_or("").to_owned();
    if status == 418 {
        return ExchangeError::RateLimited {
            retry_after: retry_after.unwrap_or(DEFAULT_418_WAIT),
        };
    }
    if status == 429 || matches!(code, Some(-1003 | -1015)) {
        return ExchangeError::RateLimited {
            retry_after: retry_after.unwrap_or(DEFAULT_429_WAIT),
        };
    }
    if status >= 500 {
        // Binance: a 5XX means the execution status is unknown; it could
        // have been a success.
        let what = format!("http {status} {}", describe(code, &text));
        return unknown_or_transient(op, what);
    }
    let Some(code) = code else {
        // A 4xx without Binance's body (a proxy, the WAF): nothing says the
        // request never reached the engine, so a write stays unknown.
        let what = format!("http {status} without an error body");
        return match (status, op) {
            (401, _) => ExchangeError::Auth(what),
            (403, _) | (_, Op::Read) => ExchangeError::Transient(what),
            (_, Op::Write) => ExchangeError::UnknownOutcome(what),
        };
    };
    map_code(op, code, &text)
}

/// Maps a Binance error code (REST body or WebSocket API `error`).
pub fn map_code(op: Op, code: i64, msg: &str) -> ExchangeError {
    match code {
        // The code of a missing order list is undocumented (-2018 is only
        // assumed): a lookup told it does not exist in so many words finds
        // nothing, whatever the code, or the leg would stay in doubt forever.
        _ if op == Op::Read && says_absent(msg) => ExchangeError::NotFound,
        // Execution status unknown by Binance's own words; -1008 (overload)
        // is read the same way for writes, to be safe.
        -1006 | -1007 | -1008 | -1000 | -1001 => {
            unknown_or_transient(op, describe(Some(code), msg))
        }
        -1003 | -1015 => ExchangeError::RateLimited {
            retry_after: DEFAULT_429_WAIT,
        },
        // Checked before the engine: nothing happened.
        -1021 => ExchangeError::Transient(describe(Some(code), msg)),
        -1002 | -1022 | -2014 | -2015 => ExchangeError::Auth(describe(Some(code), msg)),
        -2013 | -2018 | -2026 => ExchangeError::NotFound,
        _ => ExchangeError::Rejected {
            code: i32::try_from(code).unwrap_or(i32::MIN),
            msg: msg.to_owned(),
        },
    }
}

/// Binance's words for a lookup that found nothing: "Order list does not
/// exist." (`GET /api/v3/orderList`) and "Order does not exist."
/// (`GET /api/v3/order`).
fn says_absent(msg: &str) -> bool {
    let words = msg.trim().trim_end_matches('.');
    words.eq_ignore_ascii_case("Order list does not exist")
        || words.eq_ignore_ascii_case("Order does not exist")
}

/// Maps a transport failure. `connect` is true when the connection was never
/// established, so nothing was sent.
pub fn map_transport(op: Op, connect: bool, timeout: bool, what: String) -> ExchangeError {
    if connect {
        return ExchangeError::Transient(what);
    }
    let what = if timeout {
        format!("timeout: {what}")
    } else {
        what
    };
    unknown_or_transient(op, what)
}

/// A success answer that did not parse: for a write it was probably applied.
pub fn map_malformed(op: Op, what: String) -> ExchangeError {
    unknown_or_transient(op, format!("malformed answer: {what}"))
}

fn unknown_or_transient(op: Op, what: String) -> ExchangeError {
    match op {
        Op::Write => ExchangeError::UnknownOutcome(what),
        Op::Read => ExchangeError::Transient(what),
    }
}

fn describe(code: Option<i64>, msg: &str) -> String {
    match code {
        Some(c) => format!("{c} {msg}"),
        None => msg.to_owned(),
    }
}

/// True for a `-1013` static filter failure, after which the symbol's rules
/// are reloaded.
pub fn is_filter_failure(err: &ExchangeError) -> bool {
    matches!(err, ExchangeError::Rejected { code: -1013, msg } if msg.contains("Filter failure"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn server_errors_on_writes_are_unknown_and_on_reads_transient() {
        assert!(matches!(
            map_http_error(Op::Write, 503, None, None, None),
            ExchangeError::UnknownOutcome(_)
        ));
        assert!(matches!(
            map_http_error(Op::Write, 500, Some(-1006), Some("x"), None),
            ExchangeError::UnknownOutcome(_)
        ));
        assert!(matches!(
            map_http_error(Op::Read, 502, None, None, None),
            ExchangeError::Transient(_)
        ));
        for code in [-1006, -1007, -1008] {
            assert!(matches!(
                map_code(Op::Write, code, "m"),
                ExchangeError::UnknownOutcome(_)
            ));
            assert!(matches!(
                map_code(Op::Read, code, "m"),
                ExchangeError::Transient(_)
            ));
        }
    }

    #[test]
    fn rate_limits_carry_retry_after() {
        assert_eq!(
            map_http_error(
                Op::Write,
                429,
                Some(-1015),
                Some("Too many new orders"),
                Some(secs(7))
            ),
            ExchangeError::RateLimited {
                retry_after: secs(7)
            }
        );
        assert_eq!(
            map_http_error(Op::Read, 418, Some(-1003), Some("banned"), None),
            ExchangeError::RateLimited {
                retry_after: secs(120)
            }
        );
        assert_eq!(
            map_http_error(Op::Read, 429, None, None, None),
            ExchangeError::RateLimited {
                retry_after: secs(10)
            }
        );
    }

    #[test]
    fn auth_not_found_and_rejections() {
        for code in [-2014, -2015, -1022] {
            assert!(matches!(
                map_code(Op::Read, code, "m"),
                ExchangeError::Auth(_)
            ));
        }
        for code in [-2013, -2018] {
            assert_eq!(map_code(Op::Read, code, "m"), ExchangeError::NotFound);
        }
        // The missing list's code is undocumented: its words decide a lookup.
        for (code, msg) in [
            (-2011, "Order list does not exist."),
            (-1121, "Order list does not exist."),
            (-2010, "Order does not exist."),
            (-2011, "order list does not exist"),
        ] {
            assert_eq!(map_code(Op::Read, code, msg), ExchangeError::NotFound);
        }
        // Other words under such codes are refusals still, and a write's
        // answer is not read as a lookup's.
        assert!(matches!(
            map_code(Op::Read, -2011, "Unknown order sent."),
            ExchangeError::Rejected { code: -2011, .. }
        ));
        assert!(matches!(
            map_code(Op::Write, -2011, "Order list does not exist."),
            ExchangeError::Rejected { code: -2011, .. }
        ));
        assert_eq!(
            map_code(Op::Write, -2010, "Duplicate order sent."),
            ExchangeError::Rejected {
                code: -2010,
                msg: "Duplicate order sent.".into()
            }
        );
        assert!(is_filter_failure(&map_code(
            Op::Write,
            -1013,
            "Filter failure: LOT_SIZE"
        )));
        assert!(!is_filter_failure(&map_code(
            Op::Write,
            -2010,
            "Filter failure: MAX_NUM_ORDERS"
        )));
    }

    #[test]
    fn transport_failures() {
        assert!(matches!(
            map_transport(Op::Write, true, false, "refused".into()),
            ExchangeError::Transient(_)
        ));
        assert!(matches!(
            map_transport(Op::Write, false, true, "t".into()),
            ExchangeError::UnknownOutcome(_)
        ));
        assert!(matches!(
            map_transport(Op::Read, false, true, "t".into()),
            ExchangeError::Transient(_)
        ));
        assert!(matches!(
            map_http_error(Op::Write, 404, None, None, None),
            ExchangeError::UnknownOutcome(_)
        ));
    }
}
