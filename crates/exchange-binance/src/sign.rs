//! HMAC-SHA256 signing, REST (over the percent-encoded query) and WebSocket
//! API (over the parameters sorted by name, raw values).

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A query string built pair by pair, each name and value percent-encoded as
/// Binance requires before signing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    buf: String,
}

impl Query {
    /// An empty query.
    pub fn new() -> Self {
        Self {
            buf: String::with_capacity(256),
        }
    }

    /// Appends `name=value`, percent-encoded.
    pub fn push(&mut self, name: &str, value: &str) -> &mut Self {
        if !self.buf.is_empty() {
            self.buf.push('&');
        }
        self.buf
            .extend(url::form_urlencoded::byte_serialize(name.as_bytes()));
        self.buf.push('=');
        self.buf
            .extend(url::form_urlencoded::byte_serialize(value.as_bytes()));
        self
    }

    /// The query string, without a leading `?`.
    pub fn as_str(&self) -> &str {
        &self.buf
    }

    /// True when nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Lowercase hex HMAC-SHA256 of `payload` under `secret`.
pub fn hmac_hex(secret: &[u8], payload: &[u8]) -> String {
    // HMAC takes keys of any length, so this never falls back; the fallback
    // keeps the function total without an unwrap.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(payload);
    hex::encode(mac.finalize().into_bytes())
}

/// Signature of a REST request: HMAC over the percent-encoded query string
/// (this adapter never sends a body, so the payload is the query alone).
pub fn rest_signature(secret: &SecretString, query: &str) -> String {
    hmac_hex(secret.expose_secret().as_bytes(), query.as_bytes())
}

/// Signature of a WebSocket API request: every parameter but `signature`,
/// sorted by name, joined as `k=v` with `&`, values as raw UTF-8.
pub fn ws_signature(secret: &SecretString, params: &[(&str, &str)]) -> String {
    let mut sorted: Vec<&(&str, &str)> = params.iter().filter(|(k, _)| *k != "signature").collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let payload = sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    hmac_hex(secret.expose_secret().as_bytes(), payload.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    // API_FACTS.md §2, recomputed with openssl and matching Binance's docs.
    const SECRET: &str = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j";

    fn secret() -> SecretString {
        SecretString::from(SECRET)
    }

    #[test]
    fn rest_vector_from_the_docs() {
        let mut q = Query::new();
        for (k, v) in [
            ("symbol", "LTCBTC"),
            ("side", "BUY"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "1"),
            ("price", "0.1"),
            ("recvWindow", "5000"),
            ("timestamp", "1499827319559"),
        ] {
            q.push(k, v);
        }
        assert_eq!(
            q.as_str(),
            "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559"
        );
        assert_eq!(
            rest_signature(&secret(), q.as_str()),
            "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
        );
    }

    #[test]
    fn rest_vector_non_ascii_is_signed_percent_encoded() {
        let mut q = Query::new();
        for (k, v) in [
            ("symbol", "１２３４５６"),
            ("side", "BUY"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "1"),
            ("price", "0.1"),
            ("recvWindow", "5000"),
            ("timestamp", "1499827319559"),
        ] {
            q.push(k, v);
        }
        assert!(
            q.as_str().starts_with("symbol=%EF%BC%91%EF%BC%92"),
            "{}",
            q.as_str()
        );
        assert_eq!(
            rest_signature(&secret(), q.as_str()),
            "e1353ec6b14d888f1164ae9af8228a3dbd508bc82eb867db8ab6046442f33ef3"
        );
    }

    fn ws_params(symbol: &str) -> Vec<(&str, &str)> {
        // Deliberately unsorted: the signer sorts.
        vec![
            ("symbol", symbol),
            ("side", "SELL"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "0.01000000"),
            ("price", "52000.00"),
            (
                "apiKey",
                "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A",
            ),
            ("recvWindow", "100"),
            ("timestamp", "1645423376532"),
        ]
    }

    #[test]
    fn ws_vector_from_the_docs() {
        assert_eq!(
            ws_signature(&secret(), &ws_params("BTCUSDT")),
            "aa1b5712c094bc4e57c05a1a5c1fd8d88dcd628338ea863fec7b88e59fe2db24"
        );
    }

    #[test]
    fn ws_vector_non_ascii_is_signed_raw() {
        // The docs' second set differs in more than the symbol (API_FACTS.md
        // abbreviates it): BUY, 1.00000000 at 0.10000000, recvWindow 5000.
        let params = [
            ("symbol", "１２３４５６"),
            ("side", "BUY"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("quantity", "1.00000000"),
            ("price", "0.10000000"),
            ("recvWindow", "5000"),
            ("timestamp", "1645423376532"),
            (
                "apiKey",
                "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A",
            ),
        ];
        assert_eq!(
            ws_signature(&secret(), &params),
            "b33892ae8e687c939f4468c6268ddd4c40ac1af18ad19a064864c47bae0752cd"
        );
    }

    #[test]
    fn ws_signature_ignores_a_signature_param() {
        let mut p = ws_params("BTCUSDT");
        p.push(("signature", "whatever"));
        assert_eq!(
            ws_signature(&secret(), &p),
            "aa1b5712c094bc4e57c05a1a5c1fd8d88dcd628338ea863fec7b88e59fe2db24"
        );
    }
}
