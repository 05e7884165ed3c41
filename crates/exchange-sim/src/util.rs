//! Small helpers shared by every module: clocks, decimal formatting, ids, HMAC.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use rust_decimal::Decimal;
use serde::Serializer;
use sha2::Sha256;

/// Microseconds since the Unix epoch (real clock).
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (real clock).
pub(crate) fn now_ms() -> u64 {
    now_us() / 1000
}

/// Binance prints prices and quantities with 8 decimals.
pub(crate) fn fmt8(d: Decimal) -> String {
    format!("{d:.8}")
}

/// Serde helper: a decimal as a JSON string with 8 decimals.
pub(crate) fn ser8<S: Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&fmt8(*d))
}

/// Rounds `value` down to a multiple of `step` (no-op when step is zero).
pub(crate) fn floor_to(value: Decimal, step: Decimal) -> Decimal {
    if step.is_zero() {
        return value;
    }
    (value / step).floor() * step
}

/// True when `value` is an exact multiple of `step` (always true when step is zero).
pub(crate) fn is_multiple(value: Decimal, step: Decimal) -> bool {
    step.is_zero() || (value % step).is_zero()
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

const B62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A Binance-looking 22-character client id, derived deterministically from `seed`.
pub(crate) fn gen_client_id(seed: u64) -> String {
    let mut out = String::with_capacity(22);
    let mut state = splitmix(seed ^ 0x5151_0000_0000_0000);
    for i in 0..22 {
        if i % 10 == 0 {
            state = splitmix(state.wrapping_add(i));
        }
        let idx = usize::try_from(state % 62).unwrap_or(0);
        out.push(char::from(B62[idx]));
        state /= 62;
    }
    out
}

/// Lowercase hex HMAC-SHA256 of `msg` keyed with `secret`.
pub fn hmac_sha256_hex(secret: &str, msg: &str) -> String {
    match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(msg.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

/// Constant-time check of a hex HMAC-SHA256 signature (case-insensitive hex).
pub(crate) fn verify_hmac(secret: &str, msg: &[u8], signature_hex: &str) -> bool {
    let Ok(sig) = hex::decode(signature_hex) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(msg);
    mac.verify_slice(&sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_binance_doc_vector() {
        let secret = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j";
        let payload = "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559";
        assert_eq!(
            hmac_sha256_hex(secret, payload),
            "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
        );
        assert!(verify_hmac(
            secret,
            payload.as_bytes(),
            "C8DB56825AE71D6D79447849E617115F4A920FA2ACDCAB2B053C4B2838BD6B71"
        ));
    }

    #[test]
    fn client_ids_are_legal_and_distinct() {
        let a = gen_client_id(1);
        let b = gen_client_id(2);
        assert_eq!(a.len(), 22);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn decimals_print_with_eight_places() {
        assert_eq!(fmt8(Decimal::new(15, 1)), "1.50000000");
        assert_eq!(
            floor_to(Decimal::new(123_456, 5), Decimal::new(1, 3)),
            Decimal::new(1234, 3)
        );
    }
}
