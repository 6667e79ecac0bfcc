//! Access tokens: RS256 JWTs signed by the server's own key.
//!
//! Verification pins the algorithm: the header must say `RS256` and name a
//! known `kid`, and the signature is checked with RSA PKCS#1 v1.5 SHA-256
//! only, so `alg: none` and HS256-with-the-public-key tokens are refused
//! before any key is used.

use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{self, KeyPair as _};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use proto::auth::{Claims, Jwk, JwtHeader};

use crate::crypto;

/// The token-signing key.
pub struct SigningKey {
    kid: String,
    key_pair: KeyPair,
    public: PublicKeyComponents<Vec<u8>>,
}

/// Why a token was refused (logged, never shown in detail to the client).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a JWT")]
    Malformed,
    #[error("the token's algorithm is not RS256")]
    Algorithm,
    #[error("the token's key is unknown")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    Signature,
}

/// How long after its retirement a key still verifies tokens and stays in
/// the JWKS: the longest a token it signed can live (a server may sign with
/// it until it reloads its keys), with the clock skew tokens are allowed.
pub const RETIRED_KEY_GRACE_SECONDS: i64 = crate::authority::TOKEN_LIFETIME + 300 + 60;

/// A key `cordon keys rotate` replaced, and when (nanoseconds).
pub struct RetiredKey {
    pub key: std::sync::Arc<SigningKey>,
    pub retired_at: i64,
}

/// The server's token-signing keys: the current one signs; those it
/// replaced still verify tokens and stay published in the JWKS until every
/// token they signed has expired, and verify audit checkpoints for ever.
pub struct KeyRing {
    current: std::sync::Arc<SigningKey>,
    retired: Vec<RetiredKey>,
}

impl KeyRing {
    pub fn new(current: SigningKey, retired: Vec<RetiredKey>) -> KeyRing {
        KeyRing {
            current: std::sync::Arc::new(current),
            retired,
        }
    }

    /// The key that signs.
    pub fn current(&self) -> std::sync::Arc<SigningKey> {
        self.current.clone()
    }

    /// The keys that verify tokens at `now` (nanoseconds): the current one,
    /// then those retired less than [`RETIRED_KEY_GRACE_SECONDS`] ago.
    fn verifying(&self, now: i64) -> impl Iterator<Item = &SigningKey> {
        let grace = RETIRED_KEY_GRACE_SECONDS.saturating_mul(1_000_000_000);
        std::iter::once(&*self.current).chain(
            self.retired
                .iter()
                .filter(move |r| r.retired_at.saturating_add(grace) > now)
                .map(|r| &*r.key),
        )
    }

    /// Checks `token` with the key its header names, among those that
    /// verify tokens at `now`.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        let kid = token_kid(token)?;
        self.verifying(now)
            .find(|key| key.kid == kid)
            .ok_or(TokenError::UnknownKey)?
            .verify(token)
    }

    /// The public keys published at `now`.
    pub fn jwks(&self, now: i64) -> Vec<Jwk> {
        self.verifying(now).map(SigningKey::jwk).collect()
    }

    /// Whether any key, retired or not, signed `text` (audit checkpoints).
    pub fn verify_text(&self, text: &str, signature: &str) -> bool {
        std::iter::once(&self.current)
            .chain(self.retired.iter().map(|r| &r.key))
            .any(|key| key.verify_text(text, signature))
    }

    /// The key ids and retirement times, current first: two rings with the
    /// same are the same.
    pub fn fingerprint(&self) -> Vec<(String, i64)> {
        std::iter::once((self.current.kid.clone(), 0))
            .chain(
                self.retired
                    .iter()
                    .map(|r| (r.key.kid.clone(), r.retired_at)),
            )
            .collect()
    }
}

/// The `kid` of a token (or of its header alone) whose header says RS256.
fn token_kid(token: &str) -> Result<String, TokenError> {
    let header = token.split('.').next().ok_or(TokenError::Malformed)?;
    let header: JwtHeader = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|h| crate::json::from_slice(&h).ok())
        .ok_or(TokenError::Malformed)?;
    if header.alg != "RS256" {
        return Err(TokenError::Algorithm);
    }
    header.kid.ok_or(TokenError::UnknownKey)
}

impl SigningKey {
    pub fn generate() -> anyhow::Result<SigningKey> {
        let key_pair = KeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| anyhow::anyhow!("RSA key generation failed"))?;
        let pkcs8 =
            aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&key_pair)
                .map_err(|_| anyhow::anyhow!("RSA key export failed"))?;
        Self::from_pkcs8(pkcs8.as_ref())
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> anyhow::Result<SigningKey> {
        let key_pair = KeyPair::from_pkcs8(pkcs8)
            .map_err(|e| anyhow::anyhow!("the signing key is invalid: {e}"))?;
        let public = PublicKeyComponents::<Vec<u8>>::from(key_pair.public_key());
        // The kid is a thumbprint of the public key, so it changes with the key.
        let mut material = public.n.clone();
        material.extend_from_slice(&public.e);
        let kid = URL_SAFE_NO_PAD.encode(&crypto::sha256_hex(&material).as_bytes()[..24]);
        Ok(SigningKey {
            kid,
            key_pair,
            public,
        })
    }

    /// The private key as base64 PKCS#8, for storage.
    pub fn to_pkcs8_base64(&self) -> String {
        let pkcs8 =
            aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&self.key_pair)
                .expect("an RSA key pair exports as PKCS#8");
        STANDARD.encode(pkcs8.as_ref())
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn jwk(&self) -> Jwk {
        Jwk {
            kty: "RSA".into(),
            key_use: "sig".into(),
            kid: self.kid.clone(),
            alg: "RS256".into(),
            n: URL_SAFE_NO_PAD.encode(&self.public.n),
            e: URL_SAFE_NO_PAD.encode(&self.public.e),
        }
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let header = JwtHeader {
            alg: "RS256".into(),
            typ: Some("JWT".into()),
            kid: Some(self.kid.clone()),
        };
        let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("header"));
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims"));
        let signing_input = format!("{header}.{payload}");
        let mut signature = vec![0u8; self.key_pair.public_modulus_len()];
        self.key_pair
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .expect("RSA signing");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// Checks the header and signature of `token` and returns its claims.
    /// The claims' meaning (audience, issuer, times) is checked by the caller.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if token_kid(header)? != self.kid {
            return Err(TokenError::UnknownKey);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        let signing_input =
            &token[..token.len() - token.rsplit('.').next().map_or(0, str::len) - 1];
        self.public
            .verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                signing_input.as_bytes(),
                &signature,
            )
            .map_err(|_| TokenError::Signature)?;
        URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|p| crate::json::from_slice(&p).ok())
            .ok_or(TokenError::Malformed)
    }

    /// A base64url RS256 signature of `text` (audit checkpoints).
    pub fn sign_text(&self, text: &str) -> String {
        let mut signature = vec![0u8; self.key_pair.public_modulus_len()];
        self.key_pair
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                text.as_bytes(),
                &mut signature,
            )
            .expect("RSA signing");
        URL_SAFE_NO_PAD.encode(signature)
    }

    /// Whether `signature` is this key's [`SigningKey::sign_text`] of `text`.
    pub fn verify_text(&self, text: &str, signature: &str) -> bool {
        URL_SAFE_NO_PAD.decode(signature).is_ok_and(|signature| {
            self.public
                .verify(
                    &signature::RSA_PKCS1_2048_8192_SHA256,
                    text.as_bytes(),
                    &signature,
                )
                .is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            aud: "https://api.securitycenter.microsoft.com".into(),
            iss: "https://localhost:8443/t/v2.0".into(),
            iat: 1,
            nbf: 1,
            exp: 2,
            tid: "t".into(),
            appid: Some("a".into()),
            app_displayname: Some("app".into()),
            oid: "o".into(),
            sub: None,
            ver: "1.0".into(),
            roles: Some(vec!["Machine.Isolate".into()]),
            scp: None,
            upn: None,
            name: None,
            groups: None,
            jti: None,
        }
    }

    /// A header naming `alg` twice is malformed, whichever value a reader
    /// would keep.
    #[test]
    fn a_header_key_given_twice_is_malformed() {
        let key = SigningKey::generate().unwrap();
        let token = key.sign(&claims());
        let (_, rest) = token.split_once('.').unwrap();
        let header = format!(r#"{{"alg":"none","kid":"{}","alg":"RS256"}}"#, key.kid());
        let forged = format!("{}.{rest}", URL_SAFE_NO_PAD.encode(header));
        assert!(matches!(key.verify(&forged), Err(TokenError::Malformed)));
    }

    #[test]
    fn signs_and_verifies_and_pins_the_algorithm() {
        let key = SigningKey::generate().unwrap();
        let token = key.sign(&claims());
        assert_eq!(key.verify(&token).unwrap(), claims());

        // The same key restored from storage verifies the token too.
        let restored =
            SigningKey::from_pkcs8(&STANDARD.decode(key.to_pkcs8_base64()).unwrap()).unwrap();
        assert_eq!(restored.kid(), key.kid());
        assert!(restored.verify(&token).is_ok());

        let other = SigningKey::generate().unwrap();
        assert!(matches!(other.verify(&token), Err(TokenError::UnknownKey)));

        let (head, rest) = token.split_once('.').unwrap();
        let none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"x"}"#);
        assert!(matches!(
            key.verify(&format!("{none}.{rest}")),
            Err(TokenError::Algorithm)
        ));
        let _ = head;

        let mut tampered = token.clone();
        tampered.insert(token.find('.').unwrap() + 3, 'A');
        assert!(key.verify(&tampered).is_err());
        assert!(matches!(key.verify("a.b"), Err(TokenError::Malformed)));
    }
}
