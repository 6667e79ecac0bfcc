//! The built-in OAuth 2.0 authority, shaped like the Microsoft identity
//! platform: OIDC discovery, the v2 and v1 token endpoints (client
//! credentials) and the JWKS.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use proto::auth::{Claims, Jwks, OpenIdConfiguration, TokenResponse};

use crate::audit::PrincipalSlot;
use crate::error::{OAuthFailure, oauth_error};
use crate::{AppState, ConnInfo, base_url, crypto, signin};

/// The `{tenant}` path segment as sent. Never rejects: a segment that isn't
/// valid UTF-8 simply isn't the tenant, and gets the OAuth error for that.
pub(crate) struct TenantParam(pub(crate) String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for TenantParam {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let raw = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .ok()
            .and_then(|params| {
                params
                    .iter()
                    .find(|(name, _)| *name == "tenant")
                    .map(|(_, value)| value.to_owned())
            })
            .unwrap_or_default();
        Ok(TenantParam(raw))
    }
}

/// Lifetime of an access token, in seconds.
pub const TOKEN_LIFETIME: i64 = 3599;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(discovery),
        )
        .route("/{tenant}/.well-known/openid-configuration", get(discovery))
        .route("/{tenant}/oauth2/v2.0/token", post(token_v2))
        .route("/{tenant}/oauth2/token", post(token_v1))
        .route("/{tenant}/discovery/v2.0/keys", get(keys))
        .route("/{tenant}/discovery/keys", get(keys))
}

fn check_tenant(state: &AppState, tenant: &str) -> Result<(), OAuthFailure> {
    if tenant.eq_ignore_ascii_case(&state.tenant_id) {
        Ok(())
    } else {
        Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "Tenant '{}' not found.",
                tenant
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(100)
                    .collect::<String>()
            ),
        ))
    }
}

async fn discovery(
    State(state): State<Arc<AppState>>,
    TenantParam(tenant): TenantParam,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = check_tenant(&state, &tenant) {
        return e.into_response();
    }
    let base = format!("{}/{}", base_url(&headers, &state), state.tenant_id);
    axum::Json(OpenIdConfiguration {
        issuer: state.issuer.clone(),
        authorization_endpoint: format!("{base}/oauth2/v2.0/authorize"),
        token_endpoint: format!("{base}/oauth2/v2.0/token"),
        jwks_uri: format!("{base}/discovery/v2.0/keys"),
        response_types_supported: vec!["code".into(), "token".into()],
        subject_types_supported: vec!["pairwise".into()],
        id_token_signing_alg_values_supported: vec!["RS256".into()],
        token_endpoint_auth_methods_supported: vec![
            "client_secret_post".into(),
            "client_secret_basic".into(),
        ],
        grant_types_supported: vec![
            "client_credentials".into(),
            "authorization_code".into(),
            "password".into(),
        ],
        scopes_supported: vec!["openid".into()],
        code_challenge_methods_supported: vec!["S256".into()],
        tenant_region_scope: None,
    })
    .into_response()
}

async fn keys(State(state): State<Arc<AppState>>, TenantParam(tenant): TenantParam) -> Response {
    if let Err(e) = check_tenant(&state, &tenant) {
        return e.into_response();
    }
    axum::Json(Jwks {
        keys: state.key_ring().jwks(crate::now_nanos()),
    })
    .into_response()
}

/// Who is asking for a token: the source address (for sign-in throttling)
/// and where to name the account tried (for the audit trail).
struct Caller {
    source: String,
    slot: Option<PrincipalSlot>,
}

impl Caller {
    fn new(conn: Option<Extension<ConnInfo>>, slot: Option<Extension<PrincipalSlot>>) -> Caller {
        Caller {
            source: conn
                .map(|Extension(c)| c.peer.ip().to_string())
                .unwrap_or_default(),
            slot: slot.map(|Extension(s)| s),
        }
    }
}

async fn token_v2(
    State(state): State<Arc<AppState>>,
    TenantParam(tenant): TenantParam,
    headers: HeaderMap,
    conn: Option<Extension<ConnInfo>>,
    slot: Option<Extension<PrincipalSlot>>,
    body: Bytes,
) -> Response {
    let caller = Caller::new(conn, slot);
    token(state, tenant, headers, caller, body, Version::V2).await
}

async fn token_v1(
    State(state): State<Arc<AppState>>,
    TenantParam(tenant): TenantParam,
    headers: HeaderMap,
    conn: Option<Extension<ConnInfo>>,
    slot: Option<Extension<PrincipalSlot>>,
    body: Bytes,
) -> Response {
    let caller = Caller::new(conn, slot);
    token(state, tenant, headers, caller, body, Version::V1).await
}

#[derive(Clone, Copy, PartialEq)]
enum Version {
    V1,
    V2,
}

async fn token(
    state: Arc<AppState>,
    tenant: String,
    headers: HeaderMap,
    caller: Caller,
    body: Bytes,
    version: Version,
) -> Response {
    match issue_token(&state, &tenant, &headers, &caller, &body, version).await {
        Ok(response) => response,
        Err(failure) => failure.into_response(),
    }
}

async fn issue_token(
    state: &AppState,
    tenant: &str,
    headers: &HeaderMap,
    caller: &Caller,
    body: &[u8],
    version: Version,
) -> Result<Response, OAuthFailure> {
    let bad = |error: &'static str, description: &str| {
        Err(oauth_error(StatusCode::BAD_REQUEST, error, description))
    };
    check_tenant(state, tenant)?;
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    if !form_type {
        return bad(
            "invalid_request",
            "The request body must be application/x-www-form-urlencoded.",
        );
    }
    let mut fields: Vec<(String, String)> = Vec::new();
    for (name, value) in form_urlencoded::parse(body) {
        if fields.iter().any(|(n, _)| *n == name) {
            return bad(
                "invalid_request",
                &format!("The parameter '{name}' is repeated."),
            );
        }
        fields.push((name.into_owned(), value.into_owned()));
    }
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let Some(grant_type) = field("grant_type") else {
        return bad("invalid_request", "The parameter 'grant_type' is missing.");
    };
    match grant_type {
        "client_credentials" => {}
        "password" => return password_grant(state, headers, caller, &fields, version).await,
        "authorization_code" => return code_grant(state, headers, caller, &fields, version).await,
        _ => {
            return bad(
                "unsupported_grant_type",
                &format!(
                    "The grant type '{}' is not supported; use client_credentials, \
                     authorization_code or password.",
                    grant_type.chars().take(50).collect::<String>()
                ),
            );
        }
    }
    let basic = client_from_basic(headers);
    let (client_id, client_secret) = match (basic, field("client_id"), field("client_secret")) {
        (Some((id, secret)), form_id, None) if form_id.is_none_or(|f| f == id) => (id, secret),
        (None, Some(id), Some(secret)) => (id.to_owned(), secret.to_owned()),
        (None, Some(_), None) | (Some(_), _, None) => {
            return Err(oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "The client secret is missing.",
            ));
        }
        (None, None, _) => return bad("invalid_request", "The parameter 'client_id' is missing."),
        (Some(_), _, Some(_)) => {
            return bad(
                "invalid_request",
                "Use either HTTP Basic or client_secret, not both.",
            );
        }
    };
    let resource = match version {
        Version::V2 => {
            let Some(scope) = field("scope") else {
                return bad("invalid_request", "The parameter 'scope' is missing.");
            };
            let Some(resource) = scope
                .strip_suffix("/.default")
                .filter(|_| !scope.contains(' '))
            else {
                return bad(
                    "invalid_scope",
                    "The scope must be '<resource>/.default' for the client credentials grant.",
                );
            };
            resource.to_owned()
        }
        Version::V1 => match field("resource") {
            Some(resource) => resource.to_owned(),
            None => return bad("invalid_request", "The parameter 'resource' is missing."),
        },
    };
    let app = authenticate_client(state, &client_id, client_secret, &caller.source).await?;
    if !state.accepts_resource(&resource) {
        return bad(
            "invalid_scope",
            &format!("The resource '{resource}' is not served by this authority."),
        );
    }
    let claims = Claims {
        appid: Some(app.client_id.clone()),
        app_displayname: Some(app.name.clone()),
        oid: app.client_id.clone(),
        sub: Some(app.client_id.clone()),
        roles: Some(app.permissions.clone()),
        ..common_claims(state, &resource, version)
    };
    tracing::info!(client_id = %app.client_id, "token issued");
    Ok(token_response(state, &claims, None))
}

/// Checks an application's client id and secret, throttled per client id
/// and source address: a locked-out client or address is refused before
/// anything is looked up; an unknown client is refused at once, a wrong
/// secret after one SHA-256. An application whose secret is still stored as
/// a slow hash (created before secrets were hashed fast) gets that hash
/// checked within the server's bound on slow hashes, and replaced by the
/// fast one when it matches.
async fn authenticate_client(
    state: &AppState,
    client_id: &str,
    secret: String,
    source: &str,
) -> Result<store::App, OAuthFailure> {
    let logged_id = || {
        client_id
            .chars()
            .filter(|c| !c.is_control())
            .take(64)
            .collect::<String>()
    };
    // An IPv6 source counts by its /64, which one host usually holds.
    let source = source
        .parse()
        .map(|ip| crate::conns::source_key(ip).to_string())
        .unwrap_or_else(|_| source.to_owned());
    let source = source.as_str();
    let attempt = state
        .client_throttle
        .begin(client_id, source)
        .map_err(|wait| {
            // Refusals come in floods: a line every few seconds at most.
            if let Some(suppressed) = state.connections.log.allow("client authentication throttled")
            {
                tracing::info!(client_id = %logged_id(), source, suppressed, "client authentication throttled");
            }
            let mut refusal = oauth_error(
                StatusCode::TOO_MANY_REQUESTS,
                "invalid_client",
                format!("Too many failed client authentications. Try again in {wait} seconds."),
            );
            refusal.retry_after = Some(wait);
            refusal
        })?;
    let app = if crypto::is_guid(client_id) {
        state.store.get_app(client_id).await.map_err(|e| {
            crate::error::ApiError::internal(e);
            server_error()
        })?
    } else {
        None
    };
    let matches = match &app {
        None => false,
        Some(app) => match crypto::check_client_secret(&secret, &app.secret_hash) {
            crypto::ClientSecretCheck::Done(matches) => matches,
            crypto::ClientSecretCheck::Upgrade => {
                let old = app.secret_hash.clone();
                let Some(matches) = state.verify_slow_hash(secret.clone(), old.clone()).await
                else {
                    return Err(server_error());
                };
                if matches {
                    let new = crypto::hash_client_secret(&secret);
                    match state
                        .store
                        .replace_app_secret_hash(client_id, &old, new)
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(client_id = %app.client_id, "client secret rehashed with SHA-256");
                        }
                        Err(e) => {
                            tracing::warn!(client_id = %app.client_id, error = %e, "could not rehash the client secret");
                        }
                    }
                }
                matches
            }
        },
    };
    match app.filter(|_| matches) {
        Some(app) => {
            attempt.succeeded();
            Ok(app)
        }
        None => {
            attempt.failed();
            tracing::info!(client_id = %logged_id(), source, "client authentication failed");
            Err(oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "The client id or secret is wrong.",
            ))
        }
    }
}

/// The claims every token carries (audience, issuer, times, tenant,
/// version, id), the caller's own left empty.
fn common_claims(state: &AppState, resource: &str, version: Version) -> Claims {
    let now = crate::unix_seconds();
    Claims {
        aud: resource.trim_end_matches('/').to_owned(),
        iss: state.issuer.clone(),
        iat: now,
        nbf: now,
        exp: now + TOKEN_LIFETIME,
        tid: state.tenant_id.clone(),
        appid: None,
        app_displayname: None,
        oid: String::new(),
        sub: None,
        ver: if version == Version::V1 { "1.0" } else { "2.0" }.into(),
        roles: None,
        scp: None,
        upn: None,
        name: None,
        groups: None,
        jti: Some(crypto::new_guid()),
    }
}

/// The token endpoint's answer: the signed token, never cached.
fn token_response(state: &AppState, claims: &Claims, scope: Option<String>) -> Response {
    let mut response = axum::Json(TokenResponse {
        token_type: "Bearer".into(),
        expires_in: TOKEN_LIFETIME,
        ext_expires_in: TOKEN_LIFETIME,
        access_token: state.signing_key().sign(claims),
        scope,
    })
    .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, "no-store".parse().expect("header"));
    response
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn server_error() -> OAuthFailure {
    oauth_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "Try again later.",
    )
}

/// The client of a user grant: the console or a registered application,
/// named by `client_id` or HTTP Basic. A secret, if sent, must be right.
/// Returns the client id and display name.
async fn user_client(
    state: &AppState,
    headers: &HeaderMap,
    fields: &[(String, String)],
    source: &str,
) -> Result<(String, String), OAuthFailure> {
    let basic = client_from_basic(headers);
    let (client_id, secret) = match (&basic, field(fields, "client_id")) {
        (Some((id, secret)), form) if form.is_none_or(|f| f == id) => {
            (id.clone(), Some(secret.clone()))
        }
        (Some(_), _) => {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "The client_id differs from the HTTP Basic client.",
            ));
        }
        (None, Some(id)) => (
            id.to_owned(),
            field(fields, "client_secret").map(str::to_owned),
        ),
        (None, None) => {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "The parameter 'client_id' is missing.",
            ));
        }
    };
    let unknown = || {
        oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "The client is not registered here, or its secret is wrong.",
        )
    };
    let Some(name) = signin::client_name(state, &client_id).await else {
        return Err(unknown());
    };
    if let Some(secret) = secret {
        authenticate_client(state, &client_id, secret, source).await?;
    }
    Ok((client_id, name))
}

/// The resource and delegated permissions a user grant asks for.
fn user_resource(
    state: &AppState,
    fields: &[(String, String)],
    version: Version,
) -> Result<(String, Vec<String>), OAuthFailure> {
    let bad = |error, why: String| oauth_error(StatusCode::BAD_REQUEST, error, why);
    match (field(fields, "scope"), field(fields, "resource"), version) {
        (Some(scope), _, Version::V2) | (Some(scope), None, Version::V1) => {
            signin::parse_scope(state, scope).map_err(|why| bad("invalid_scope", why))
        }
        (_, Some(resource), Version::V1) => {
            signin::parse_resource(state, resource).ok_or_else(|| {
                bad(
                    "invalid_resource",
                    format!("The resource '{resource}' is not served by this authority."),
                )
            })
        }
        (None, _, Version::V2) => Err(bad(
            "invalid_request",
            "The parameter 'scope' is missing.".into(),
        )),
        (None, None, Version::V1) => Err(bad(
            "invalid_request",
            "The parameter 'resource' is missing.".into(),
        )),
    }
}

/// `grant_type=password` (the resource-owner password grant the reference
/// service's native-app sample uses): throttled, audited, and as slow for
/// an unknown account as for a wrong password.
async fn password_grant(
    state: &AppState,
    headers: &HeaderMap,
    caller: &Caller,
    fields: &[(String, String)],
    version: Version,
) -> Result<Response, OAuthFailure> {
    let (client_id, client_name) = user_client(state, headers, fields, &caller.source).await?;
    let (resource, scopes) = user_resource(state, fields, version)?;
    let (Some(username), Some(password)) = (field(fields, "username"), field(fields, "password"))
    else {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The parameters 'username' and 'password' are required.",
        ));
    };
    if let Some(slot) = &caller.slot {
        slot.set_text(signin::attempt_label(username));
    }
    let user = signin::check_password(state, username, password, &caller.source)
        .await
        .map_err(|failure| {
            let (status, error) = match failure {
                signin::SignInFailure::Throttled(_) => {
                    (StatusCode::TOO_MANY_REQUESTS, "invalid_grant")
                }
                signin::SignInFailure::Invalid => (StatusCode::BAD_REQUEST, "invalid_grant"),
                signin::SignInFailure::Unavailable => {
                    (StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable")
                }
            };
            let mut refusal = oauth_error(status, error, failure.message());
            if let signin::SignInFailure::Throttled(wait) = failure {
                refusal.retry_after = Some(wait);
            }
            refusal
        })?;
    Ok(user_token(
        state,
        &client_id,
        &client_name,
        &user,
        &resource,
        &scopes,
        version,
    ))
}

/// `grant_type=authorization_code`: exchanges a code from the sign-in page,
/// with the PKCE verifier, once.
async fn code_grant(
    state: &AppState,
    headers: &HeaderMap,
    caller: &Caller,
    fields: &[(String, String)],
    version: Version,
) -> Result<Response, OAuthFailure> {
    let (client_id, client_name) = user_client(state, headers, fields, &caller.source).await?;
    let invalid = |why: &str| oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", why);
    let (Some(code), Some(redirect_uri)) = (field(fields, "code"), field(fields, "redirect_uri"))
    else {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The parameters 'code' and 'redirect_uri' are required.",
        ));
    };
    let Some(verifier) = field(fields, "code_verifier") else {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The parameter 'code_verifier' is required (PKCE).",
        ));
    };
    // Taken out first: a code tried once, rightly or wrongly, is spent.
    let Some(pending) = state.codes.take(code) else {
        return Err(invalid("The code is invalid, expired or already used."));
    };
    if pending.client_id != client_id || pending.redirect_uri != redirect_uri {
        return Err(invalid(
            "The code was issued to another client or redirect URI.",
        ));
    }
    if !signin::pkce_matches(verifier, &pending.challenge) {
        return Err(invalid(
            "The code_verifier does not match the code_challenge.",
        ));
    }
    let user = state
        .store
        .get_user(&pending.user_id)
        .await
        .map_err(|_| server_error())?
        .filter(|u| !u.disabled)
        .ok_or_else(|| invalid("The user is disabled or no longer exists."))?;
    Ok(user_token(
        state,
        &client_id,
        &client_name,
        &user,
        &pending.resource,
        &pending.scopes,
        version,
    ))
}

/// A delegated access token: `scp`, `upn` and `name` instead of `roles`.
fn user_token(
    state: &AppState,
    client_id: &str,
    client_name: &str,
    user: &store::UserRecord,
    resource: &str,
    scopes: &[String],
    version: Version,
) -> Response {
    let claims = Claims {
        appid: Some(client_id.to_owned()),
        app_displayname: Some(client_name.to_owned()),
        oid: user.id.clone(),
        sub: Some(user.id.clone()),
        scp: Some(scopes.join(" ")),
        upn: Some(user.upn.clone()),
        name: Some(user.display_name.clone()),
        groups: (!user.user_groups.is_empty()).then(|| user.user_groups.clone()),
        ..common_claims(state, resource, version)
    };
    tracing::info!(user = %user.id, %client_id, "user token issued");
    let granted = scopes
        .iter()
        .map(|s| format!("{resource}/{s}"))
        .collect::<Vec<_>>()
        .join(" ");
    token_response(state, &claims, Some(granted))
}

/// `Authorization: Basic base64(urlencode(id):urlencode(secret))` (RFC 6749 2.3.1).
fn client_from_basic(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((unescape(id)?, unescape(secret)?))
}
