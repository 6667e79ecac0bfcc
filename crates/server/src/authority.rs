//! The built-in OAuth 2.0 authority, shaped like the Microsoft identity
//! platform: OIDC discovery, the v2 and v1 token endpoints (client
//! credentials) and the JWKS.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use proto::auth::{Claims, Jwks, OAuthError, OpenIdConfiguration, TokenResponse};

use crate::{AppState, base_url, crypto};

/// The `{tenant}` path segment as sent. Never rejects: a segment that isn't
/// valid UTF-8 simply isn't the tenant, and gets the OAuth error for that.
struct TenantParam(String);

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

/// An RFC 6749 error answer.
struct OAuthFailure {
    status: StatusCode,
    error: &'static str,
    description: String,
}

fn oauth_error(
    status: StatusCode,
    error: &'static str,
    description: impl Into<String>,
) -> OAuthFailure {
    OAuthFailure {
        status,
        error,
        description: description.into(),
    }
}

impl IntoResponse for OAuthFailure {
    fn into_response(self) -> Response {
        let body = OAuthError {
            error: self.error.to_owned(),
            error_description: self.description,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, "no-store".parse().expect("header"));
        response
    }
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
        grant_types_supported: vec!["client_credentials".into()],
        scopes_supported: vec!["openid".into()],
        tenant_region_scope: None,
    })
    .into_response()
}

async fn keys(State(state): State<Arc<AppState>>, TenantParam(tenant): TenantParam) -> Response {
    if let Err(e) = check_tenant(&state, &tenant) {
        return e.into_response();
    }
    axum::Json(Jwks {
        keys: vec![state.signing_key.jwk()],
    })
    .into_response()
}

async fn token_v2(
    State(state): State<Arc<AppState>>,
    TenantParam(tenant): TenantParam,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    token(state, tenant, headers, body, Version::V2).await
}

async fn token_v1(
    State(state): State<Arc<AppState>>,
    TenantParam(tenant): TenantParam,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    token(state, tenant, headers, body, Version::V1).await
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
    body: Bytes,
    version: Version,
) -> Response {
    match issue_token(&state, &tenant, &headers, &body, version).await {
        Ok(response) => response,
        Err(failure) => failure.into_response(),
    }
}

async fn issue_token(
    state: &AppState,
    tenant: &str,
    headers: &HeaderMap,
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
    if grant_type != "client_credentials" {
        return bad(
            "unsupported_grant_type",
            &format!("The grant type '{grant_type}' is not supported; use client_credentials."),
        );
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
    let app = state.store.get_app(&client_id).await.map_err(|e| {
        crate::error::ApiError::internal(e);
        oauth_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "Try again later.",
        )
    })?;
    // The hash is computed even for an unknown client, so timing tells nothing.
    let known_hash = app.as_ref().map(|a| a.secret_hash.clone());
    let secret = client_secret.clone();
    let dummy_hash = state.dummy_hash.clone();
    let valid = tokio::task::spawn_blocking(move || match known_hash {
        Some(hash) => crypto::verify_secret(&secret, &hash),
        None => {
            let _ = crypto::verify_secret(&secret, &dummy_hash);
            false
        }
    })
    .await
    .unwrap_or(false);
    let Some(app) = app.filter(|_| valid) else {
        tracing::info!(client_id = %client_id.chars().take(64).collect::<String>(), "client authentication failed");
        return Err(oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "The client id or secret is wrong.",
        ));
    };
    if !state.accepts_resource(&resource) {
        return bad(
            "invalid_scope",
            &format!("The resource '{resource}' is not served by this authority."),
        );
    }
    let now = crate::unix_seconds();
    let claims = Claims {
        aud: resource.trim_end_matches('/').to_owned(),
        iss: state.issuer.clone(),
        iat: now,
        nbf: now,
        exp: now + TOKEN_LIFETIME,
        tid: state.tenant_id.clone(),
        appid: Some(app.client_id.clone()),
        app_displayname: Some(app.name.clone()),
        oid: app.client_id.clone(),
        sub: Some(app.client_id.clone()),
        ver: if version == Version::V1 { "1.0" } else { "2.0" }.into(),
        roles: Some(app.permissions.clone()),
        scp: None,
        upn: None,
        name: None,
        jti: Some(crypto::new_guid()),
    };
    tracing::info!(client_id = %app.client_id, "token issued");
    let mut response = axum::Json(TokenResponse {
        token_type: "Bearer".into(),
        expires_in: TOKEN_LIFETIME,
        ext_expires_in: TOKEN_LIFETIME,
        access_token: state.signing_key.sign(&claims),
    })
    .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, "no-store".parse().expect("header"));
    Ok(response)
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
