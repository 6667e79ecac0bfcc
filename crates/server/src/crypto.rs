//! Small cryptographic helpers: randomness, identifiers, secret hashing.
//!
//! Users' passwords, chosen by people, are stored as PBKDF2-HMAC-SHA512
//! hashes with a random salt (210,000 iterations, OWASP's figure for this
//! function). Client secrets and enroll tokens are 256-bit random values
//! that no one can guess, so a slow hash would buy nothing for them but cost
//! the server: they are stored as SHA-256 and compared in constant time.
//! Applications created before keep their PBKDF2 hash until their first
//! successful check, which replaces it ([`ClientSecretCheck::Upgrade`]).

use std::num::NonZeroU32;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::{digest, pbkdf2};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

const PBKDF2_ITERATIONS: u32 = 210_000;
const HASH_SCHEME: &str = "pbkdf2-sha512";
/// The scheme of client secrets' hashes: `sha256$<hex digest>`.
const CLIENT_SECRET_SCHEME: &str = "sha256";

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .expect("the system random number generator failed");
    out
}

/// A random (version 4) GUID in lowercase canonical form.
pub fn new_guid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A machine id: 40 lowercase hex characters.
pub fn new_machine_id() -> String {
    hex(&random_bytes::<20>())
}

/// A 256-bit secret in URL-safe base64 that never begins with `-`, so it
/// can't be mistaken for a command-line flag.
pub fn new_secret() -> String {
    loop {
        let secret = URL_SAFE_NO_PAD.encode(random_bytes::<32>());
        if !secret.starts_with('-') {
            return secret;
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

/// Encodes a slow salted hash of `secret`: `pbkdf2-sha512$<iterations>$<salt>$<hash>`.
pub fn hash_secret(secret: &str) -> String {
    let salt = random_bytes::<16>();
    let mut out = [0u8; 64];
    let iterations = NonZeroU32::new(PBKDF2_ITERATIONS).expect("non-zero");
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA512,
        iterations,
        &salt,
        secret.as_bytes(),
        &mut out,
    );
    format!(
        "{HASH_SCHEME}${PBKDF2_ITERATIONS}${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(out)
    )
}

/// Checks `secret` against a hash made by [`hash_secret`], in constant time.
pub fn verify_secret(secret: &str, encoded: &str) -> bool {
    let parts: Vec<&str> = encoded.split('$').collect();
    let [scheme, iterations, salt, hash] = parts.as_slice() else {
        return false;
    };
    let (Some(iterations), Ok(salt), Ok(hash)) = (
        iterations.parse().ok().and_then(NonZeroU32::new),
        STANDARD.decode(salt),
        STANDARD.decode(hash),
    ) else {
        return false;
    };
    *scheme == HASH_SCHEME
        && pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA512,
            iterations,
            &salt,
            secret.as_bytes(),
            &hash,
        )
        .is_ok()
}

/// [`verify_secret`] on the blocking pool, holding `slot` of a semaphore
/// that bounds how many slow hashes run at once: the slot is released when
/// the hash ends, not when a client that hung up stops waiting for it, so
/// abandoned requests cannot pile up work.
pub async fn verify_secret_off_thread(
    secret: String,
    encoded: String,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> bool {
    tokio::task::spawn_blocking(move || {
        let matches = verify_secret(&secret, &encoded);
        drop(slot);
        matches
    })
    .await
    .unwrap_or(false)
}

/// Encodes the hash of a client secret made by [`new_secret`]:
/// `sha256$<hex digest>`.
pub fn hash_client_secret(secret: &str) -> String {
    format!("{CLIENT_SECRET_SCHEME}${}", sha256_hex(secret.as_bytes()))
}

/// What checking a client secret against its stored hash takes.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientSecretCheck {
    /// A fast hash, already compared: whether it matched.
    Done(bool),
    /// An older slow (PBKDF2) hash: check it with [`verify_secret`], and on
    /// a match store [`hash_client_secret`] in its place.
    Upgrade,
}

/// Checks a client secret against a [`hash_client_secret`] hash in constant
/// time, in microseconds; says so when the hash is of the older slow kind.
pub fn check_client_secret(secret: &str, encoded: &str) -> ClientSecretCheck {
    match encoded.split_once('$') {
        Some((CLIENT_SECRET_SCHEME, digest)) => {
            let computed = sha256_hex(secret.as_bytes());
            ClientSecretCheck::Done(
                aws_lc_rs::constant_time::verify_slices_are_equal(
                    computed.as_bytes(),
                    digest.as_bytes(),
                )
                .is_ok(),
            )
        }
        Some((HASH_SCHEME, _)) => ClientSecretCheck::Upgrade,
        _ => ClientSecretCheck::Done(false),
    }
}

/// Whether `text` is a GUID (any case).
pub fn is_guid(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Whether `text` is a machine id: 40 hex characters (any case).
pub fn is_machine_id(text: &str) -> bool {
    text.len() == 40 && text.bytes().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_hash_and_verify() {
        let secret = new_secret();
        assert!(!secret.starts_with('-'));
        let hash = hash_secret(&secret);
        assert!(hash.starts_with("pbkdf2-sha512$210000$"));
        assert!(!hash.contains(&secret));
        assert!(verify_secret(&secret, &hash));
        assert!(!verify_secret("wrong", &hash));
        assert!(!verify_secret(&secret, "garbage"));
        assert_ne!(hash, hash_secret(&secret), "salted");
    }

    #[test]
    fn client_secrets_hash_fast_and_verify() {
        let secret = new_secret();
        let hash = hash_client_secret(&secret);
        assert!(hash.starts_with("sha256$"), "{hash}");
        assert!(!hash.contains(&secret));
        assert_eq!(
            check_client_secret(&secret, &hash),
            ClientSecretCheck::Done(true)
        );
        assert_eq!(
            check_client_secret("wrong", &hash),
            ClientSecretCheck::Done(false)
        );
        assert_eq!(
            check_client_secret(&secret, "garbage"),
            ClientSecretCheck::Done(false)
        );
        assert_eq!(
            check_client_secret(&secret, "sha256$"),
            ClientSecretCheck::Done(false)
        );
        // An older hash is checked the slow way, once.
        assert_eq!(
            check_client_secret(&secret, &hash_secret(&secret)),
            ClientSecretCheck::Upgrade
        );
    }

    /// A client that hangs up drops its request, not the hash it started:
    /// that hash keeps its slot until it ends, so abandoned requests cannot
    /// run more slow hashes at once than there are slots.
    #[tokio::test]
    async fn an_abandoned_slow_hash_keeps_its_slot_until_it_ends() {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let hash = hash_secret("the secret");
        let slot = slots.clone().acquire_owned().await.unwrap();
        let check = tokio::spawn(verify_secret_off_thread("a guess".into(), hash, slot));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        check.abort();
        assert_eq!(slots.available_permits(), 0, "the hash still runs");
        let _slot = tokio::time::timeout(std::time::Duration::from_secs(60), slots.acquire())
            .await
            .expect("the slot comes back when the hash ends")
            .unwrap();
    }

    #[test]
    fn identifiers_have_their_shapes() {
        let guid = new_guid();
        assert!(is_guid(&guid), "{guid}");
        assert_eq!(&guid[14..15], "4");
        assert!(is_machine_id(&new_machine_id()));
        assert!(!is_machine_id("xyz"));
        assert!(!is_guid("00000000-0000-0000-0000-00000000000g"));
    }
}
