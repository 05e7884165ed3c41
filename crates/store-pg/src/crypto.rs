//! API secrets at rest: XChaCha20-Poly1305 with a random 192-bit nonce per
//! secret, bound to its account's API key as associated data, so a ciphertext
//! copied onto another account's row does not decrypt.
//!
//! Stored form: `0x01 || nonce (24 bytes) || ciphertext with tag`. The leading
//! byte names the format, leaving room for key rotation (a later format can
//! carry a key id).

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::config::SecretKey;

const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 24;
const SECRET_AD: &[u8] = b"ocoguard/account-secret/v1:";
const CHECK_AD: &[u8] = b"ocoguard/key-check/v1";
const CHECK_TEXT: &[u8] = b"ocoguard key check";

/// Why a blob did not decrypt (deliberately without detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpenError;

/// Seals and opens secrets under one key.
pub(crate) struct Cipher {
    aead: XChaCha20Poly1305,
}

impl Cipher {
    pub(crate) fn new(key: &SecretKey) -> Cipher {
        Cipher {
            aead: XChaCha20Poly1305::new(key.bytes().into()),
        }
    }

    /// Encrypts an account's API secret.
    pub(crate) fn seal_secret(&self, api_key: &str, secret: &str) -> Result<Vec<u8>, OpenError> {
        let ad = [SECRET_AD, api_key.as_bytes()].concat();
        self.seal(&ad, secret.as_bytes())
    }

    /// Decrypts an account's API secret.
    pub(crate) fn open_secret(
        &self,
        api_key: &str,
        blob: &[u8],
    ) -> Result<Zeroizing<String>, OpenError> {
        let ad = [SECRET_AD, api_key.as_bytes()].concat();
        let plain = self.open(&ad, blob)?;
        String::from_utf8(plain.to_vec())
            .map(Zeroizing::new)
            .map_err(|_| OpenError)
    }

    /// A fresh key check value: proves, later, which key was in use.
    pub(crate) fn key_check(&self) -> Result<Vec<u8>, OpenError> {
        self.seal(CHECK_AD, CHECK_TEXT)
    }

    /// True when `blob` was made by [`Cipher::key_check`] under this key.
    pub(crate) fn verify_key_check(&self, blob: &[u8]) -> bool {
        self.open(CHECK_AD, blob)
            .is_ok_and(|p| p.as_slice() == CHECK_TEXT)
    }

    fn seal(&self, ad: &[u8], plain: &[u8]) -> Result<Vec<u8>, OpenError> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .aead
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: ad,
                },
            )
            .map_err(|_| OpenError)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn open(&self, ad: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let Some((&FORMAT_V1, rest)) = blob.split_first() else {
            return Err(OpenError);
        };
        if rest.len() < NONCE_LEN {
            return Err(OpenError);
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        self.aead
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: ad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| OpenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_bind_to_their_key() {
        let c = Cipher::new(&SecretKey::generate());
        let a = c.seal_secret("key-a", "s3cret").unwrap();
        let b = c.seal_secret("key-a", "s3cret").unwrap();
        assert_ne!(a, b, "a fresh nonce each time");
        assert!(
            !a.windows(6).any(|w| w == b"s3cret"),
            "no plaintext in the blob"
        );
        assert_eq!(c.open_secret("key-a", &a).unwrap().as_str(), "s3cret");
        assert!(c.open_secret("key-b", &a).is_err(), "bound to the api key");
        let mut tampered = a.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(c.open_secret("key-a", &tampered).is_err());
        assert!(c.open_secret("key-a", &[]).is_err());
        assert!(c.open_secret("key-a", &[1, 2, 3]).is_err());
    }

    #[test]
    fn key_check_detects_another_key() {
        let c = Cipher::new(&SecretKey::generate());
        let check = c.key_check().unwrap();
        assert!(c.verify_key_check(&check));
        assert!(!Cipher::new(&SecretKey::generate()).verify_key_check(&check));
    }
}
