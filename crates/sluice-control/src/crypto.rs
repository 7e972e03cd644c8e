//! Secrets at rest and API tokens. Database passwords are sealed with
//! XChaCha20-Poly1305 under the server's master key (`SLUICE_MASTER_KEY`) before they
//! reach the control database; tokens are stored as SHA-256 hashes only (they are 256
//! random bits, so a fast hash is enough: there is nothing to brute-force).

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::Rng as _;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// Encrypts and decrypts secrets with the master key.
#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl Sealer {
    /// `key`: 64 hex characters (32 bytes), e.g. from `openssl rand -hex 32`.
    pub fn from_hex(key: &SecretString) -> Result<Self, String> {
        let bytes = hex::decode(key.expose_secret().trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or("SLUICE_MASTER_KEY: must be 64 hex characters (32 bytes); generate one with `openssl rand -hex 32`")?;
        Ok(Self { cipher: XChaCha20Poly1305::new_from_slice(&bytes).expect("32-byte key") })
    }

    /// Nonce (24 bytes) followed by the ciphertext and tag.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; 24] = rand::rng().random();
        let mut out = nonce.to_vec();
        out.extend(self.cipher.encrypt(XNonce::from_slice(&nonce), plain).expect("encryption cannot fail"));
        out
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
        if sealed.len() < 24 {
            return Err("sealed secret is truncated".into());
        }
        self.cipher
            .decrypt(XNonce::from_slice(&sealed[..24]), &sealed[24..])
            .map_err(|_| "a stored secret cannot be decrypted: the server's SLUICE_MASTER_KEY is not the key it was sealed with".into())
    }
}

/// A new API token, as shown once to its owner.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    format!("slc_{}", hex::encode(bytes))
}

pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// A password for a generated database role: 32 alphanumerics (~190 bits).
pub fn new_password() -> String {
    let mut rng = rand::rng();
    (0..32).map(|_| rng.sample(rand::distr::Alphanumeric) as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_refuses_the_wrong_key() {
        let a = Sealer::from_hex(&"11".repeat(32).into()).unwrap();
        let b = Sealer::from_hex(&"22".repeat(32).into()).unwrap();
        let sealed = a.seal(b"hunter2");
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(a.open(&sealed).unwrap(), b"hunter2");
        assert!(b.open(&sealed).unwrap_err().contains("SLUICE_MASTER_KEY"));
        assert_ne!(a.seal(b"x"), a.seal(b"x"), "fresh nonce per secret");
        assert!(Sealer::from_hex(&"zz".into()).is_err());
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (t1, t2) = (new_token(), new_token());
        assert_ne!(t1, t2);
        assert_eq!(token_hash(&t1).len(), 32);
        assert_eq!(new_password().len(), 32);
    }
}
