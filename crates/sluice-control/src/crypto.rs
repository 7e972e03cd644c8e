//! Secrets at rest and API tokens. Secrets (database passwords, Kafka credentials,
//! webhook URLs) are sealed with XChaCha20-Poly1305 under the server's master key
//! (`SLUICE_MASTER_KEY`) before they reach the control database. Each sealed value
//! binds what it belongs to (table, tenant, name) as associated data, so a value
//! copied into another row or tenant does not open, and names the key it was sealed
//! under (a fingerprint), so the master key can be rotated: servers open values under
//! the current or a previous key (`SLUICE_MASTER_KEY_PREVIOUS`), seal under the
//! current one, and `sluice keys rotate` re-seals every stored value. Tokens are
//! stored as SHA-256 hashes only (they are 256 random bits, so a fast hash is enough:
//! there is nothing to brute-force).

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::Rng as _;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// Marks the sealed format with a key id and associated data. Values sealed before
/// it (nonce and ciphertext only, no associated data) still open, until
/// `sluice keys rotate` re-seals them.
const FORMAT: [u8; 2] = *b"S1";
const KEY_ID: usize = 4;
const NONCE: usize = 24;

/// What a sealed secret belongs to, bound into it as associated data.
#[derive(Clone, Copy, Debug)]
pub struct Owner<'a> {
    pub table: &'static str,
    pub tenant: i64,
    /// The resource's name within its tenant (resources cannot be renamed); empty
    /// for per-tenant settings.
    pub name: &'a str,
}

impl<'a> Owner<'a> {
    pub fn new(table: &'static str, tenant: i64, name: &'a str) -> Self {
        Self { table, tenant, name }
    }

    fn aad(&self) -> Vec<u8> {
        // The name comes last, so no choice of name can make two owners' data equal.
        format!("sluice-secret\0{}\0{}\0{}", self.table, self.tenant, self.name).into_bytes()
    }
}

struct Key {
    id: [u8; KEY_ID],
    cipher: XChaCha20Poly1305,
}

impl Key {
    fn from_hex(key: &str, var: &str) -> Result<Self, String> {
        let bytes = hex::decode(key.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| format!("{var}: must be 64 hex characters (32 bytes); generate one with `openssl rand -hex 32`"))?;
        let digest = Sha256::digest([b"sluice-key-id\0".as_slice(), &bytes].concat());
        Ok(Self {
            id: digest[..KEY_ID].try_into().expect("4 bytes"),
            cipher: XChaCha20Poly1305::new_from_slice(&bytes).expect("32-byte key"),
        })
    }
}

/// Seals under the current master key; opens under the current or a previous one.
#[derive(Clone)]
pub struct Sealer {
    keys: std::sync::Arc<Vec<Key>>, // the current key first
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key ids only: they name the keys and reveal nothing of them.
        f.debug_struct("Sealer").field("keys", &self.keys.iter().map(|k| hex::encode(k.id)).collect::<Vec<_>>()).finish()
    }
}

impl Sealer {
    /// `key`: 64 hex characters (32 bytes), e.g. from `openssl rand -hex 32`.
    pub fn from_hex(key: &SecretString) -> Result<Self, String> {
        Self::with_previous(key, None)
    }

    /// The current key and, while a rotation is under way, the previous keys
    /// (comma-separated), which open what they sealed but seal nothing new.
    pub fn with_previous(current: &SecretString, previous: Option<&SecretString>) -> Result<Self, String> {
        let mut keys = vec![Key::from_hex(current.expose_secret(), "SLUICE_MASTER_KEY")?];
        for k in previous.map(|p| p.expose_secret().split(',').map(str::trim).filter(|k| !k.is_empty())).into_iter().flatten() {
            let key = Key::from_hex(k, "SLUICE_MASTER_KEY_PREVIOUS")?;
            if keys.iter().all(|have| have.id != key.id) {
                keys.push(key);
            }
        }
        Ok(Self { keys: std::sync::Arc::new(keys) })
    }

    /// The current key's id (a fingerprint: names the key, reveals nothing of it).
    pub fn key_id(&self) -> String {
        hex::encode(self.keys[0].id)
    }

    /// Format, key id, nonce (24 bytes), then the ciphertext and tag.
    pub fn seal(&self, owner: Owner<'_>, plain: &[u8]) -> Vec<u8> {
        let key = &self.keys[0];
        let nonce: [u8; NONCE] = rand::rng().random();
        let mut out = Vec::with_capacity(FORMAT.len() + KEY_ID + NONCE + plain.len() + 16);
        out.extend_from_slice(&FORMAT);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        let aad = owner.aad();
        out.extend(key.cipher.encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad: &aad }).expect("encryption cannot fail"));
        out
    }

    pub fn open(&self, owner: Owner<'_>, sealed: &[u8]) -> Result<Vec<u8>, String> {
        let what = || format!("the stored secret of {} {:?} (tenant {})", owner.table, owner.name, owner.tenant);
        if let Some(rest) = sealed.strip_prefix(&FORMAT)
            && rest.len() >= KEY_ID + NONCE
        {
            let (id, rest) = rest.split_at(KEY_ID);
            if let Some(key) = self.keys.iter().find(|k| k.id == id) {
                let aad = owner.aad();
                return key
                    .cipher
                    .decrypt(XNonce::from_slice(&rest[..NONCE]), Payload { msg: &rest[NONCE..], aad: &aad })
                    .map_err(|_| format!("{} does not open: it was altered or belongs to another row", what()));
            }
            // A legacy value whose random nonce happens to start with the marker.
            if let Some(plain) = self.open_legacy(sealed) {
                return Ok(plain);
            }
            return Err(format!(
                "{} was sealed under master key {}, which this server does not have: set SLUICE_MASTER_KEY (or SLUICE_MASTER_KEY_PREVIOUS while rotating) to that key",
                what(),
                hex::encode(id)
            ));
        }
        self.open_legacy(sealed)
            .ok_or_else(|| format!("{} cannot be decrypted: the server's SLUICE_MASTER_KEY is not the key it was sealed with", what()))
    }

    /// Whether a value is sealed in the current format under the current key (so
    /// `keys rotate` can leave it alone).
    pub fn is_current(&self, sealed: &[u8]) -> bool {
        sealed.strip_prefix(&FORMAT).is_some_and(|rest| rest.starts_with(&self.keys[0].id))
    }

    /// Values sealed before associated data and key ids: nonce and ciphertext.
    fn open_legacy(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE {
            return None;
        }
        self.keys.iter().find_map(|k| k.cipher.decrypt(XNonce::from_slice(&sealed[..NONCE]), &sealed[NONCE..]).ok())
    }
}

/// Every sealed column of the control database, with what its rows belong to: the
/// list `sluice keys rotate` walks. (`alert_settings` is per tenant: no name.)
pub const SEALED_COLUMNS: &[(&str, &str, &str)] = &[
    ("sources", "sealed", "name"),
    ("sinks", "sealed", "name"),
    ("enrichers", "sealed", "name"),
    ("mirrors", "sealed", "name"),
    ("pipelines", "role_password", "name"),
    ("alert_settings", "sealed", "''"),
];

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

    const AT: Owner<'static> = Owner { table: "sources", tenant: 7, name: "orders" };

    fn legacy_seal(key: &str, plain: &[u8]) -> Vec<u8> {
        // The format before associated data and key ids (still stored in older rows).
        let cipher = XChaCha20Poly1305::new_from_slice(&hex::decode(key).unwrap()).unwrap();
        let nonce: [u8; 24] = rand::rng().random();
        let mut out = nonce.to_vec();
        out.extend(cipher.encrypt(XNonce::from_slice(&nonce), plain).unwrap());
        out
    }

    #[test]
    fn seals_and_refuses_the_wrong_key() {
        let a = Sealer::from_hex(&"11".repeat(32).into()).unwrap();
        let b = Sealer::from_hex(&"22".repeat(32).into()).unwrap();
        let sealed = a.seal(AT, b"hunter2");
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(a.open(AT, &sealed).unwrap(), b"hunter2");
        let err = b.open(AT, &sealed).unwrap_err();
        assert!(err.contains(&a.key_id()) && err.contains("SLUICE_MASTER_KEY_PREVIOUS"), "{err}");
        assert_ne!(a.seal(AT, b"x"), a.seal(AT, b"x"), "fresh nonce per secret");
        assert!(Sealer::from_hex(&"zz".into()).unwrap_err().contains("SLUICE_MASTER_KEY"));
        assert!(Sealer::with_previous(&"11".repeat(32).into(), Some(&"nope".into())).unwrap_err().contains("SLUICE_MASTER_KEY_PREVIOUS"));
    }

    #[test]
    fn a_sealed_value_opens_only_for_its_owner() {
        let s = Sealer::from_hex(&"11".repeat(32).into()).unwrap();
        let sealed = s.seal(AT, b"hunter2");
        for other in [Owner::new("sinks", 7, "orders"), Owner::new("sources", 8, "orders"), Owner::new("sources", 7, "orders2")] {
            let err = s.open(other, &sealed).unwrap_err();
            assert!(err.contains("belongs to another row"), "{err}");
        }
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(s.open(AT, &flipped).is_err());
        assert!(s.open(AT, b"S1").is_err() && s.open(AT, b"").is_err(), "truncated values are refused, not a panic");
    }

    #[test]
    fn rotation_opens_old_values_and_seals_under_the_new_key() {
        let (old, new) = ("11".repeat(32), "22".repeat(32));
        let before = Sealer::from_hex(&old.clone().into()).unwrap();
        let during = Sealer::with_previous(&new.clone().into(), Some(&format!(" {old} ,").into())).unwrap();
        let after = Sealer::from_hex(&new.into()).unwrap();
        let sealed_before = before.seal(AT, b"pw");
        let legacy = legacy_seal(&old, b"older");
        assert_eq!(during.open(AT, &sealed_before).unwrap(), b"pw");
        assert_eq!(during.open(AT, &legacy).unwrap(), b"older", "values from before key ids still open");
        assert!(!during.is_current(&sealed_before) && !during.is_current(&legacy));
        let resealed = during.seal(AT, &during.open(AT, &sealed_before).unwrap());
        assert!(during.is_current(&resealed));
        assert_eq!(after.open(AT, &resealed).unwrap(), b"pw");
        assert!(after.open(AT, &sealed_before).is_err(), "the old key is gone after rotation");
        assert_ne!(before.key_id(), after.key_id());
        assert_eq!(during.key_id(), after.key_id());
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (t1, t2) = (new_token(), new_token());
        assert_ne!(t1, t2);
        assert_eq!(token_hash(&t1).len(), 32);
        assert_eq!(new_password().len(), 32);
    }
}
