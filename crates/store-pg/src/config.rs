//! How to reach the database and the key that guards API secrets at rest.

use std::fmt;

use base64::Engine as _;
use zeroize::Zeroizing;

/// Everything [`crate::PgStore::connect`] needs. Built by the binary from its
/// configuration; this library reads no environment.
#[derive(Clone)]
pub struct PgConfig {
    /// `postgres://user[:password]@host[:port]/database`. Plain TCP (no TLS).
    pub url: String,
    /// Most connections each of the store's two pools opens at once (at
    /// least 1): the durable one and the evidence one (asynchronous commits).
    /// The store opens up to [`crate::LEASE_CONNECTIONS`] more, for the
    /// account leases alone, so a process may hold
    /// `2 × pool_size + LEASE_CONNECTIONS` connections, plus any `LISTEN`
    /// connection it opens.
    pub pool_size: usize,
    /// The key API secrets are encrypted under.
    pub secret_key: SecretKey,
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password: show neither it nor the key.
        f.debug_struct("PgConfig")
            .field("url", &"[redacted]")
            .field("pool_size", &self.pool_size)
            .field("secret_key", &self.secret_key)
            .finish()
    }
}

/// A 256-bit key for XChaCha20-Poly1305. `Debug` never shows it and the bytes
/// are wiped when dropped.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; 32]>);

/// A key that could not be read from configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Empty text.
    #[error("secret key is empty: expected 32 bytes as 64 hex digits or 44 base64 characters")]
    Missing,
    /// Neither encoding, or the wrong length (the key itself is never echoed).
    #[error(
        "secret key is malformed: expected 32 bytes as 64 hex digits or 44 base64 characters, got {len} characters"
    )]
    Malformed {
        /// Length of the text that was given.
        len: usize,
    },
}

impl SecretKey {
    /// Reads a key from configuration text: 64 hex digits, or standard padded
    /// base64 (44 characters), either encoding exactly 32 bytes. Surrounding
    /// whitespace is ignored. Generate one with `openssl rand -hex 32`.
    ///
    /// # Errors
    /// [`KeyError`] for empty or malformed text; the message never repeats it.
    pub fn parse(text: &str) -> Result<SecretKey, KeyError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(KeyError::Missing);
        }
        let malformed = KeyError::Malformed { len: text.len() };
        let mut key = Zeroizing::new([0u8; 32]);
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode_to_slice(text, key.as_mut_slice()).map_err(|_| malformed)?;
            return Ok(SecretKey(key));
        }
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| malformed.clone())?,
        );
        if bytes.len() != 32 {
            return Err(malformed);
        }
        key.copy_from_slice(&bytes);
        Ok(SecretKey(key))
    }

    /// A key from raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> SecretKey {
        SecretKey(Zeroizing::new(bytes))
    }

    /// A fresh random key (tests and key generation).
    pub fn generate() -> SecretKey {
        use chacha20poly1305::aead::rand_core::RngCore as _;
        let mut key = Zeroizing::new([0u8; 32]);
        chacha20poly1305::aead::OsRng.fill_bytes(key.as_mut_slice());
        SecretKey(key)
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hex_and_base64() {
        let hex_key = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let k = SecretKey::parse(hex_key).unwrap();
        assert_eq!(k.bytes()[1], 0x11);
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(
            SecretKey::parse(&format!(" {b64}\n")).unwrap().bytes(),
            &[7u8; 32]
        );
    }

    #[test]
    fn refuses_bad_keys_without_echoing_them() {
        assert_eq!(SecretKey::parse("  ").unwrap_err(), KeyError::Missing);
        let short = "deadbeef";
        let err = SecretKey::parse(short).unwrap_err();
        assert!(!err.to_string().contains(short), "{err}");
        let b64_16 = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
        assert!(SecretKey::parse(&b64_16).is_err());
        assert!(SecretKey::parse(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn debug_hides_the_key() {
        let k = SecretKey::from_bytes([0xab; 32]);
        let shown = format!("{k:?}");
        assert!(!shown.contains("ab") && !shown.contains("171"), "{shown}");
    }
}
