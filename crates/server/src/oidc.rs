//! Access tokens from external OpenID Connect providers.
//!
//! Trust model: the operator names each trusted provider by its issuer URL
//! and the audience its tokens must carry. Everything else comes from that
//! issuer over HTTPS (plain HTTP only to loopback), verified against the
//! system roots and the operator's CA file: the discovery document, whose
//! `issuer` must be the configured one, names the JWKS, whose RSA signing
//! keys are the only keys a token of that issuer may be signed with. Nothing
//! in a token chooses where keys come from (`jku`, `x5u` and `jwk` headers
//! are ignored) and the algorithm is pinned to RS256, so `none`, HMAC and
//! other algorithms are refused before any key is used. A token's `iss`
//! selects the provider; after the signature, its issuer, audience and
//! lifetime are checked, and only then are its roles, groups and scopes
//! read. The unverified `iss` is used only to route the token.
//!
//! Keys are cached per provider. A token naming an unknown `kid` makes the
//! verifier refetch the keys, at most once per [`REFETCH_INTERVAL`] after the
//! first load, so that tokens with made-up key ids cannot make the server
//! hammer the provider; a failed fetch is retried no sooner either. Fetches
//! of one provider never run in parallel, each has a timeout and a size cap,
//! and redirects are not followed.
//! Tokens are never logged.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Map, Value};

/// Tokens are accepted this long before `nbf` and after `exp`.
const CLOCK_SKEW_SECONDS: i64 = 300;
/// The shortest time between two fetches of one provider's keys.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(30);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BODY: usize = 1 << 20;
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// One trusted provider: `--oidc-issuer URL --oidc-audience AUD`.
#[derive(Debug, Clone)]
pub struct Provider {
    pub issuer: String,
    pub audience: String,
}

#[derive(Debug, Clone)]
pub struct OidcSettings {
    pub providers: Vec<Provider>,
    /// Claim whose values name Cordon roles (default "roles").
    pub role_claim: String,
    /// Claim whose values are user-group names (default "groups").
    pub group_claim: String,
    /// `VALUE=ROLE` pairs: a role-claim value mapped to a Cordon role name.
    /// With any pair given, only mapped values grant roles; with none, the
    /// values name Cordon roles directly.
    pub role_map: Vec<(String, String)>,
    /// Extra PEM CA certificates to trust when fetching discovery/JWKS
    /// (besides the system roots in /etc/ssl/certs/ca-certificates.crt if present).
    pub ca_file: Option<PathBuf>,
}

impl OidcSettings {
    pub fn new(providers: Vec<Provider>) -> Self {
        OidcSettings {
            providers,
            role_claim: "roles".into(),
            group_claim: "groups".into(),
            role_map: Vec::new(),
            ca_file: None,
        }
    }
}

/// A verified external token.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalIdentity {
    pub issuer: String,
    /// `oid`, else `sub`.
    pub subject: String,
    /// `upn`, else `preferred_username`, else `email`, else `sub`, else the subject.
    pub upn: String,
    /// `name`, else `app_displayname`, else upn.
    pub name: String,
    /// Role names after the role map (deduplicated, order kept).
    pub roles: Vec<String>,
    /// Values of the group claim (deduplicated, order kept).
    pub user_groups: Vec<String>,
    /// Delegated scopes from `scp` (space separated) or `scope`; None when
    /// the token has neither.
    pub scopes: Option<Vec<String>>,
    /// Set for an application's own token (client credentials, as Entra ID
    /// issues them): the values of its `roles` claim, unmapped. An
    /// application token has `idtyp` `app`, or names a client (`appid`,
    /// `azp` or `client_id`) and carries neither delegated scopes nor a
    /// user's name (`upn`, `preferred_username`, `email`).
    pub application_roles: Option<Vec<String>>,
}

/// Why an external token was refused (for the log; clients get no detail).
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the token's issuer is not a configured OpenID Connect provider")]
    NotExternal,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token has no {0}")]
    Missing(&'static str),
    #[error("the token's algorithm is not RS256")]
    Algorithm,
    #[error("the token's key is not among the provider's keys")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    Signature,
    #[error("the token is not for this API's audience")]
    Audience,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the provider's keys could not be fetched: {0}")]
    Fetch(String),
}

type Keys = HashMap<String, RsaPublicKeyComponents<Vec<u8>>>;

/// The cached keys of one provider and what its fetches need.
struct ProviderState {
    provider: Provider,
    keys: std::sync::Mutex<Keys>,
    refresh: tokio::sync::Mutex<Refresh>,
}

#[derive(Default)]
struct Refresh {
    /// From the discovery document; `None` until fetched or after a failure.
    jwks_uri: Option<String>,
    loaded: bool,
    not_before: Option<Instant>,
}

impl ProviderState {
    fn key(&self, kid: &str) -> Option<RsaPublicKeyComponents<Vec<u8>>> {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.get(kid).cloned()
    }
}

/// Verifies tokens of the configured providers.
pub struct Verifier {
    settings: OidcSettings,
    states: Vec<ProviderState>,
    tls: Arc<rustls::ClientConfig>,
    fetches: AtomicU64,
}

impl Verifier {
    /// Checks the issuer URLs (https, or http to a loopback host) and loads
    /// the CA certificates. Fetches nothing: keys are fetched on first use.
    pub fn new(settings: OidcSettings) -> anyhow::Result<Verifier> {
        let mut states: Vec<ProviderState> = Vec::new();
        for provider in &settings.providers {
            Target::parse(&provider.issuer)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("bad OpenID Connect issuer {:?}", provider.issuer))?;
            if provider.issuer.contains(['?', '#']) {
                bail!("the issuer {:?} has a query or fragment", provider.issuer);
            }
            if provider.audience.trim().is_empty() {
                bail!("the issuer {} has no audience", provider.issuer);
            }
            if states.iter().any(|s| s.provider.issuer == provider.issuer) {
                bail!("the issuer {} is configured twice", provider.issuer);
            }
            states.push(ProviderState {
                provider: provider.clone(),
                keys: Default::default(),
                refresh: Default::default(),
            });
        }
        let mut roots = rustls::RootCertStore::empty();
        if !states.is_empty()
            && let Ok(certs) = CertificateDer::pem_file_iter(SYSTEM_ROOTS)
        {
            roots.add_parsable_certificates(certs.filter_map(Result::ok));
        }
        if let Some(path) = &settings.ca_file {
            let certs: Vec<_> = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect())
                .with_context(|| format!("cannot read the CA file {}", path.display()))?;
            if roots.add_parsable_certificates(certs).0 == 0 {
                bail!("{} holds no usable CA certificate", path.display());
            }
        }
        let https = states
            .iter()
            .any(|s| s.provider.issuer.starts_with("https:"));
        if https && roots.is_empty() {
            bail!(
                "no CA certificates to verify the OpenID Connect providers with: {SYSTEM_ROOTS} is missing and no CA file was given"
            );
        }
        let crypto = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(crypto)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Verifier {
            settings,
            states,
            tls: Arc::new(tls),
            fetches: AtomicU64::new(0),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// How many times the verifier fetched a provider's keys (all providers).
    pub fn jwks_fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The provider named by the token's unverified `iss`, if it is one of
    /// the configured issuers (so the caller knows to route the token here
    /// rather than to the built-in key).
    pub fn provider_for(&self, token: &str) -> Option<&Provider> {
        self.state_for(token).map(|s| &s.provider)
    }

    fn state_for(&self, token: &str) -> Option<&ProviderState> {
        let claims = decode_json(token.split('.').nth(1)?).ok()?;
        let issuer = claims.get("iss")?.as_str()?;
        self.states.iter().find(|s| s.provider.issuer == issuer)
    }

    pub async fn verify(&self, token: &str) -> Result<ExternalIdentity, OidcError> {
        let state = self.state_for(token).ok_or(OidcError::NotExternal)?;
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(OidcError::Malformed);
        };
        let kid = key_id(&decode_json(header)?)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| OidcError::Malformed)?;
        let key = self.key(state, &kid).await?;
        let signing_input = &token[..header.len() + 1 + payload.len()];
        key.verify(
            &RSA_PKCS1_2048_8192_SHA256,
            signing_input.as_bytes(),
            &signature,
        )
        .map_err(|_| OidcError::Signature)?;
        let claims = decode_json(payload)?;
        identity(
            &state.provider,
            &self.settings,
            &claims,
            crate::unix_seconds(),
        )
    }

    /// The key `kid` of a provider, fetching the keys when it is unknown.
    async fn key(
        &self,
        state: &ProviderState,
        kid: &str,
    ) -> Result<RsaPublicKeyComponents<Vec<u8>>, OidcError> {
        if let Some(key) = state.key(kid) {
            return Ok(key);
        }
        let mut refresh = state.refresh.lock().await;
        // Another verification may have fetched the keys while this one waited.
        if let Some(key) = state.key(kid) {
            return Ok(key);
        }
        let now = Instant::now();
        if refresh.not_before.is_some_and(|t| now < t) {
            return Err(if refresh.loaded {
                OidcError::UnknownKey
            } else {
                OidcError::Fetch("the last fetch failed; retrying later".into())
            });
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let issuer = &state.provider.issuer;
        match self.fetch_keys(issuer, &mut refresh.jwks_uri).await {
            Ok(keys) => {
                // The first load is free; refetches for unknown kids are throttled.
                if refresh.loaded {
                    refresh.not_before = Some(now + REFETCH_INTERVAL);
                }
                refresh.loaded = true;
                tracing::info!(%issuer, keys = keys.len(), "fetched the OpenID Connect provider's keys");
                *state.keys.lock().unwrap_or_else(PoisonError::into_inner) = keys;
            }
            Err(e) => {
                refresh.jwks_uri = None;
                refresh.not_before = Some(now + REFETCH_INTERVAL);
                tracing::warn!(%issuer, error = %e, "cannot fetch the OpenID Connect provider's keys");
                return Err(OidcError::Fetch(e));
            }
        }
        state.key(kid).ok_or(OidcError::UnknownKey)
    }

    async fn fetch_keys(
        &self,
        issuer: &str,
        jwks_uri: &mut Option<String>,
    ) -> Result<Keys, String> {
        let uri = match jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let base = issuer.trim_end_matches('/');
                let discovery = self
                    .get_json(&format!("{base}/.well-known/openid-configuration"))
                    .await?;
                let named = discovery.get("issuer").and_then(Value::as_str);
                if named.map(|n| n.trim_end_matches('/')) != Some(base) {
                    let named = named.unwrap_or("(none)");
                    return Err(format!("the discovery document names the issuer {named}"));
                }
                let uri = discovery.get("jwks_uri").and_then(Value::as_str);
                let uri = uri.ok_or("the discovery document has no jwks_uri")?;
                jwks_uri.insert(uri.to_owned()).clone()
            }
        };
        parse_jwks(&self.get_json(&uri).await?)
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        let body = tokio::time::timeout(FETCH_TIMEOUT, self.get(url))
            .await
            .map_err(|_| format!("{url}: no answer within {FETCH_TIMEOUT:?}"))?
            .map_err(|e| format!("{url}: {e}"))?;
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))
    }

    async fn get(&self, url: &str) -> Result<Bytes, String> {
        let target = Target::parse(url)?;
        let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if !target.tls {
            return exchange(TokioIo::new(tcp), &target).await;
        }
        let name = ServerName::try_from(target.host.clone()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        exchange(TokioIo::new(tls), &target).await
    }
}

/// One GET on a fresh connection; the body of a 200 answer.
async fn exchange<T>(io: T, target: &Target) -> Result<Bytes, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let request = http::Request::get(target.path.as_str())
        .header(http::header::HOST, target.host_header())
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let answer = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if response.status() != http::StatusCode::OK {
            return Err(format!("answered {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_BODY).collect().await;
        Ok(body.map_err(|e| e.to_string())?.to_bytes())
    };
    tokio::pin!(connection);
    tokio::select! {
        answer = answer => answer,
        Err(e) = &mut connection => Err(e.to_string()),
    }
}

/// Where a fetch goes: `http(s)://host[:port][/path]`.
#[derive(Debug, PartialEq)]
struct Target {
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            _ => return Err("the URL must start with https://".into()),
        };
        let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
        let path = path.split('#').next().unwrap_or_default();
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (
                host,
                Some(port.parse::<u16>().map_err(|_| "bad port in the URL")?),
            ),
            _ => (authority, None),
        };
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(['@', '[', ']']) {
            return Err("the URL has no usable host".into());
        }
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !tls && !loopback {
            return Err("plain http:// is allowed only to loopback hosts".into());
        }
        let port = port.unwrap_or(if tls { 443 } else { 80 });
        Ok(Target {
            tls,
            host: host.to_owned(),
            port,
            path,
        })
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.tls { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

fn decode_json(part: &str) -> Result<Map<String, Value>, OidcError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .ok()
        // A claim given twice (`"alg"`, `"aud"`) is refused, not read last-wins.
        .and_then(|bytes| crate::json::from_slice(&bytes).ok())
        .ok_or(OidcError::Malformed)
}

/// The `kid` of a header that pins RS256.
fn key_id(header: &Map<String, Value>) -> Result<String, OidcError> {
    if header.get("alg").and_then(Value::as_str) != Some("RS256") {
        return Err(OidcError::Algorithm);
    }
    // Critical extensions must be understood, and none is.
    if header.contains_key("crit") {
        return Err(OidcError::Malformed);
    }
    let kid = header.get("kid").and_then(Value::as_str);
    Ok(kid
        .filter(|k| !k.is_empty())
        .ok_or(OidcError::Missing("kid"))?
        .to_owned())
}

/// The RS256 signing keys of a JWKS; the others are skipped.
fn parse_jwks(jwks: &Value) -> Result<Keys, String> {
    let listed = jwks.get("keys").and_then(Value::as_array);
    let listed = listed.ok_or("the JWKS has no keys array")?;
    let mut keys = Keys::new();
    for key in listed {
        let field = |name| key.get(name).and_then(Value::as_str);
        let usable = field("kty") == Some("RSA")
            && field("use").is_none_or(|u| u == "sig")
            && field("alg").is_none_or(|a| a == "RS256");
        let component = |name| {
            let bytes = URL_SAFE_NO_PAD.decode(field(name)?).ok()?;
            let start = bytes.iter().position(|b| *b != 0)?;
            Some(bytes[start..].to_vec())
        };
        if let (true, Some(kid), Some(n), Some(e)) =
            (usable, field("kid"), component("n"), component("e"))
        {
            keys.insert(kid.to_owned(), RsaPublicKeyComponents { n, e });
        }
    }
    if keys.is_empty() {
        return Err("the JWKS has no RS256 signing key".into());
    }
    Ok(keys)
}

/// The string values of a claim that is a string or an array.
fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(values)) => values
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

fn dedup(values: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut unique: Vec<String> = Vec::new();
    for value in values {
        if !unique.contains(&value) {
            unique.push(value);
        }
    }
    unique
}

fn seconds(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| value.as_f64().map(|f| f as i64))
}

/// Checks the claims of a token whose signature was verified.
fn identity(
    provider: &Provider,
    settings: &OidcSettings,
    claims: &Map<String, Value>,
    now: i64,
) -> Result<ExternalIdentity, OidcError> {
    let text = |name: &str| {
        claims
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    if text("iss") != Some(provider.issuer.as_str()) {
        return Err(OidcError::NotExternal);
    }
    let normalize = |aud: &str| aud.trim_end_matches('/').to_ascii_lowercase();
    let audience = normalize(&provider.audience);
    if !strings(claims.get("aud"))
        .iter()
        .any(|a| normalize(a) == audience)
    {
        return Err(OidcError::Audience);
    }
    let exp = claims.get("exp").ok_or(OidcError::Missing("exp"))?;
    if now - CLOCK_SKEW_SECONDS > seconds(exp).ok_or(OidcError::Malformed)? {
        return Err(OidcError::Expired);
    }
    let nbf = claims
        .get("nbf")
        .map(|nbf| seconds(nbf).ok_or(OidcError::Malformed));
    if nbf
        .transpose()?
        .is_some_and(|nbf| nbf > now + CLOCK_SKEW_SECONDS)
    {
        return Err(OidcError::NotYetValid);
    }
    let subject = text("oid")
        .or(text("sub"))
        .ok_or(OidcError::Missing("subject"))?;
    let upn = ["upn", "preferred_username", "email", "sub"]
        .into_iter()
        .find_map(text)
        .unwrap_or(subject);
    let name = text("name").or(text("app_displayname")).unwrap_or(upn);
    // With a role map, only mapped values grant roles (a provider role that
    // happens to be called "Administrator" grants nothing unless mapped);
    // without one, values name Cordon roles directly.
    let roles = strings(claims.get(&settings.role_claim))
        .into_iter()
        .filter_map(|role| {
            if settings.role_map.is_empty() {
                return Some(role);
            }
            settings
                .role_map
                .iter()
                .find(|(value, _)| *value == role)
                .map(|(_, cordon)| cordon.clone())
        });
    let scopes = claims.get("scp").or(claims.get("scope")).map(|value| {
        let values = strings(Some(value));
        dedup(
            values
                .iter()
                .flat_map(|s| s.split_whitespace())
                .map(str::to_owned),
        )
    });
    let names_client = ["appid", "azp", "client_id"]
        .into_iter()
        .any(|c| text(c).is_some());
    let names_user = ["upn", "preferred_username", "email"]
        .into_iter()
        .any(|c| text(c).is_some());
    let application =
        text("idtyp") == Some("app") || (names_client && !names_user && scopes.is_none());
    let application_roles = application.then(|| dedup(strings(claims.get("roles"))));
    Ok(ExternalIdentity {
        issuer: provider.issuer.clone(),
        subject: subject.to_owned(),
        upn: upn.to_owned(),
        name: name.to_owned(),
        roles: dedup(roles),
        user_groups: dedup(strings(claims.get(&settings.group_claim))),
        scopes,
        application_roles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ISSUER: &str = "https://login.example.com/t/v2.0";
    const NOW: i64 = 1_000_000;

    /// The identity of minimal valid claims changed by `extra` (a null
    /// value removes the claim), or the error's name.
    fn check(extra: Value) -> Result<ExternalIdentity, String> {
        let mut settings = OidcSettings::new(vec![Provider {
            issuer: ISSUER.into(),
            audience: "api://Cordon/".into(),
        }]);
        settings.role_map = vec![("Isolators".into(), "Machine.Isolate".into())];
        let mut claims =
            json!({"iss": ISSUER, "aud": "api://cordon", "exp": NOW + 100, "sub": "s"});
        let claims = claims.as_object_mut().unwrap();
        for (name, value) in extra.as_object().unwrap() {
            match value {
                Value::Null => claims.remove(name),
                value => claims.insert(name.clone(), value.clone()),
            };
        }
        identity(&settings.providers[0], &settings, claims, NOW).map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn issuer_audience_and_lifetime_are_checked() {
        for (extra, expected) in [
            (json!({"aud": ["other", "API://cordon/"]}), "ok"),
            (json!({"aud": "other"}), "Audience"),
            (json!({"aud": ["other", 5]}), "Audience"),
            (json!({"aud": null}), "Audience"),
            (json!({"iss": format!("{ISSUER}/")}), "NotExternal"),
            (json!({"exp": NOW - 300}), "ok"),
            (json!({"exp": NOW - 301}), "Expired"),
            (json!({"exp": u64::MAX}), "ok"),
            (json!({"exp": "soon"}), "Malformed"),
            (json!({"exp": null}), "Missing(\"exp\")"),
            (json!({"nbf": NOW + 300}), "ok"),
            (json!({"nbf": NOW + 301}), "NotYetValid"),
            (json!({"sub": null}), "Missing(\"subject\")"),
        ] {
            let outcome = check(extra.clone()).map(|_| "ok".to_owned());
            assert_eq!(outcome.unwrap_or_else(|e| e), expected, "{extra}");
        }
    }

    #[test]
    fn identity_roles_groups_and_scopes() {
        let user = check(json!({
            "oid": "o", "preferred_username": "ann@example.com", "email": "a@example.com",
            "roles": ["Isolators", "Machine.Read.All", 7, "Machine.Isolate"],
            "groups": "responders", "scp": "Machine.Read  Machine.Isolate",
        }));
        let expected = ExternalIdentity {
            issuer: ISSUER.into(),
            subject: "o".into(),
            upn: "ann@example.com".into(),
            name: "ann@example.com".into(),
            // Mapped values only: the map is there.
            roles: vec!["Machine.Isolate".into()],
            user_groups: vec!["responders".into()],
            scopes: Some(vec!["Machine.Read".into(), "Machine.Isolate".into()]),
            application_roles: None,
        };
        assert_eq!(user.unwrap(), expected);
        let app = check(json!({"app_displayname": "SOAR", "scope": ["a b", "c"]})).unwrap();
        assert_eq!([app.subject, app.upn, app.name], ["s", "s", "SOAR"]);
        assert_eq!(app.scopes.unwrap(), ["a", "b", "c"]);
        assert!(app.roles.is_empty() && app.user_groups.is_empty());
        assert_eq!(check(json!({})).unwrap().scopes, None);
        // An application's own token (client credentials) keeps its roles as
        // application permissions; a user's token is never one.
        for (extra, expected) in [
            (
                json!({"appid": "a", "roles": ["Machine.Isolate", "Machine.Isolate"]}),
                Some(vec!["Machine.Isolate".to_owned()]),
            ),
            (json!({"idtyp": "app", "upn": "x@y"}), Some(vec![])),
            (json!({"azp": "a", "scp": "Machine.Read"}), None),
            (json!({"azp": "a", "preferred_username": "ann"}), None),
            (json!({"roles": ["Machine.Isolate"]}), None),
        ] {
            assert_eq!(
                check(extra.clone()).unwrap().application_roles,
                expected,
                "{extra}"
            );
        }
    }

    #[test]
    fn only_rs256_with_a_kid_is_accepted() {
        for (header, expected) in [
            (json!({"alg": "RS256", "kid": "k"}), "Ok(\"k\")"),
            (json!({"alg": "none", "kid": "k"}), "Err(Algorithm)"),
            (json!({"alg": "HS256", "kid": "k"}), "Err(Algorithm)"),
            (json!({"alg": "ES256", "kid": "k"}), "Err(Algorithm)"),
            (json!({"alg": "rs256", "kid": "k"}), "Err(Algorithm)"),
            (json!({"kid": "k"}), "Err(Algorithm)"),
            (json!({"alg": "RS256"}), "Err(Missing(\"kid\"))"),
            (
                json!({"alg": "RS256", "kid": "k", "crit": ["b64"]}),
                "Err(Malformed)",
            ),
        ] {
            let outcome = key_id(header.as_object().unwrap());
            assert_eq!(format!("{outcome:?}"), expected, "{header}");
        }
    }

    #[test]
    fn only_rsa_signing_keys_are_kept() {
        let n = URL_SAFE_NO_PAD.encode([0, 0xc1, 2]);
        let e = URL_SAFE_NO_PAD.encode([1, 0, 1]);
        let keys = parse_jwks(&json!({"keys": [
            {"kty": "RSA", "kid": "a", "n": n, "e": e},
            {"kty": "RSA", "kid": "b", "use": "sig", "alg": "RS256", "n": n, "e": e},
            {"kty": "RSA", "kid": "c", "use": "enc", "n": n, "e": e},
            {"kty": "RSA", "kid": "d", "alg": "RS512", "n": n, "e": e},
            {"kty": "EC", "kid": "e", "crv": "P-256", "x": n, "y": e},
            {"kty": "RSA", "n": n, "e": e},
            {"kty": "RSA", "kid": "f", "n": "!", "e": e},
        ]}));
        let keys = keys.unwrap();
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["a", "b"]);
        assert_eq!(keys["a"].n, [0xc1, 2]);
        assert!(parse_jwks(&json!({"keys": []})).is_err());
        assert!(parse_jwks(&json!({})).is_err());
    }

    #[test]
    fn urls_are_https_or_loopback_http() {
        for (url, expected) in [
            (
                "https://login.example.com/t/v2.0",
                "login.example.com 443 /t/v2.0",
            ),
            (
                "https://login.example.com:8443",
                "login.example.com:8443 8443 /",
            ),
            ("http://[::1]:8080?x=1#f", "[::1]:8080 8080 /?x=1"),
            ("http://localhost/", "localhost 80 /"),
            ("http://127.0.0.2:1/a", "127.0.0.2:1 1 /a"),
            (
                "http://example.com/",
                "plain http:// is allowed only to loopback hosts",
            ),
            ("ftp://example.com", "the URL must start with https://"),
            ("https://", "the URL has no usable host"),
            ("https://:443/", "the URL has no usable host"),
            ("https://u@h/", "the URL has no usable host"),
            ("https://a:b/", "bad port in the URL"),
        ] {
            let target = Target::parse(url);
            let outcome = target.map(|t| format!("{} {} {}", t.host_header(), t.port, t.path));
            assert_eq!(outcome.unwrap_or_else(|e| e), expected, "{url}");
        }
    }
}
