//! How users sign in to the built-in authority: the authorization-code flow
//! with PKCE behind a server-rendered sign-in page (what the web console
//! uses), and the password check shared with the v1 password grant.
//!
//! `GET /{tenant}/oauth2/v2.0/authorize` checks the request and shows the
//! sign-in form; posting the form checks the password and sends the browser
//! back to `redirect_uri` with a one-time code (in the query, or posted with
//! `response_mode=form_post`), which the client exchanges at
//! the token endpoint with its PKCE `code_verifier`. PKCE (`S256`) is
//! required. A redirect URI must be a loopback address (any port, as for
//! native apps) or lie under the server's own URL, so a link crafted by
//! someone else cannot send a user's code away. Codes live ten minutes in
//! memory and work once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use store::UserRecord;

use crate::audit::PrincipalSlot;
use crate::auth::DELEGATED_SCOPES;
use crate::{AppState, ConnInfo, crypto, urls};

/// The client id of Cordon's own web console, a public client.
pub const CONSOLE_CLIENT_ID: &str = "cordon-console";

const CODE_LIFETIME: Duration = Duration::from_secs(600);
const MAX_PENDING_CODES: usize = 10_000;
const MAX_CODES_PER_USER: usize = 10;
/// Longest sign-in name and password looked at.
const MAX_NAME: usize = 256;
const MAX_PASSWORD: usize = 1024;
/// Where a bare permission name (no resource) points.
const DEFAULT_RESOURCE: &str = "https://api.securitycenter.microsoft.com";

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/{tenant}/oauth2/v2.0/authorize",
            get(authorize_page).post(authorize_submit),
        )
        .route(
            "/{tenant}/oauth2/authorize",
            get(authorize_page).post(authorize_submit),
        )
}

// ---- the password check ---------------------------------------------------

/// Why a sign-in failed. The message never tells an unknown account from a
/// wrong password or a disabled account.
#[derive(Debug)]
pub enum SignInFailure {
    /// Locked out for this many seconds; the password was not checked.
    Throttled(u64),
    Invalid,
    Unavailable,
}

impl SignInFailure {
    pub fn message(&self) -> String {
        match self {
            SignInFailure::Throttled(wait) => {
                format!("Too many failed sign-in attempts. Try again in {wait} seconds.")
            }
            SignInFailure::Invalid => "The user name or password is incorrect.".to_owned(),
            SignInFailure::Unavailable => "Sign-in is unavailable; try again later.".to_owned(),
        }
    }
}

/// Checks a user's password, throttled per account and source address.
/// Exactly one slow hash is computed whether the account exists or not.
pub async fn check_password(
    state: &AppState,
    name: &str,
    password: &str,
    source: &str,
) -> Result<UserRecord, SignInFailure> {
    let name = name.trim();
    let attempt = state
        .throttle
        .begin(name, source)
        .map_err(SignInFailure::Throttled)?;
    let user = if name.is_empty() || name.len() > MAX_NAME {
        None
    } else {
        state
            .store
            .get_user_by_upn(name)
            .await
            .map_err(|_| SignInFailure::Unavailable)?
    };
    let hash = user
        .as_ref()
        .map_or_else(|| state.dummy_hash.clone(), |u| u.password_hash.clone());
    let too_long = password.len() > MAX_PASSWORD;
    // At most a few hashes at once, whatever the number of attempts.
    let matches = state
        .verify_slow_hash(password.to_owned(), hash)
        .await
        .ok_or(SignInFailure::Unavailable)?
        && !too_long;
    match user {
        Some(user) if matches && !user.disabled => {
            attempt.succeeded();
            Ok(user)
        }
        _ => {
            tracing::info!(source, "sign-in failed");
            attempt.failed();
            Err(SignInFailure::Invalid)
        }
    }
}

/// What the audit trail names as the caller of a sign-in attempt.
pub fn attempt_label(name: &str) -> String {
    let name: String = name
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect();
    format!("user {name}")
}

// ---- clients, scopes, redirect URIs ---------------------------------------

/// Whether `client_id` may obtain user tokens: the console or a registered
/// application. Returns the client's display name.
pub async fn client_name(state: &AppState, client_id: &str) -> Option<String> {
    if client_id == CONSOLE_CLIENT_ID {
        return Some("Cordon console".to_owned());
    }
    state
        .store
        .get_app(client_id)
        .await
        .ok()
        .flatten()
        .map(|app| app.name)
}

/// The resource and delegated permissions a v1 `resource` asks for: every
/// delegated permission; `None` for a resource not served here.
pub fn parse_resource(state: &AppState, resource: &str) -> Option<(String, Vec<String>)> {
    state.accepts_resource(resource).then(|| {
        (
            resource.trim_end_matches('/').to_owned(),
            DELEGATED_SCOPES.iter().map(|s| s.to_string()).collect(),
        )
    })
}

/// The resource and delegated permissions a v2 `scope` asks for. OpenID
/// scopes are accepted and ignored; `.default` means every delegated
/// permission; a bare permission name means this API.
pub fn parse_scope(state: &AppState, scope: &str) -> Result<(String, Vec<String>), String> {
    let mut resource: Option<String> = None;
    let mut scopes: Vec<String> = Vec::new();
    for item in scope.split_whitespace() {
        if matches!(item, "openid" | "profile" | "offline_access" | "email") {
            continue;
        }
        let (res, name) = match item.rsplit_once('/') {
            Some((res, name)) if res.contains("://") => (res.to_owned(), name),
            _ => (DEFAULT_RESOURCE.to_owned(), item),
        };
        if !state.accepts_resource(&res) {
            return Err(format!(
                "The resource '{res}' is not served by this authority."
            ));
        }
        let normalized = crate::auth::normalize_resource(&res);
        match &resource {
            Some(r) if crate::auth::normalize_resource(r) != normalized => {
                return Err("The scope names more than one resource.".to_owned());
            }
            _ => resource = Some(res.trim_end_matches('/').to_owned()),
        }
        if name == ".default" {
            for s in DELEGATED_SCOPES {
                if !scopes.iter().any(|have| have == s) {
                    scopes.push(s.to_owned());
                }
            }
            continue;
        }
        let Some(known) = DELEGATED_SCOPES
            .iter()
            .find(|s| s.eq_ignore_ascii_case(name))
        else {
            return Err(format!(
                "The permission '{}' is not one this API grants.",
                name.chars().take(100).collect::<String>()
            ));
        };
        if !scopes.iter().any(|have| have == known) {
            scopes.push((*known).to_owned());
        }
    }
    match resource {
        Some(resource) => Ok((resource, scopes)),
        None => Err(format!(
            "The scope must name a permission of this API, such as {DEFAULT_RESOURCE}/.default."
        )),
    }
}

/// Whether a browser may be sent back to `uri`: an absolute http(s) URI
/// that [`urls::parse`] accepts (no fragment, no user info, no `.` or `..`
/// path segment), on a loopback host (any port) or under this server's
/// public URL (`--public-url`).
pub fn redirect_allowed(state: &AppState, uri: &str) -> bool {
    // The canonical URL only: the `Host` header is not trusted here.
    redirect_allowed_under(&state.public_url, uri)
}

/// [`redirect_allowed`] against the public URL `base`: a loopback host
/// (`localhost`, `127.0.0.1`, `::1`; any port, as for native apps), or the
/// same scheme, host and port as `base` with a path at or under its path.
fn redirect_allowed_under(base: &str, uri: &str) -> bool {
    let Ok(target) = urls::parse(uri) else {
        return false;
    };
    if matches!(target.host.as_str(), "localhost" | "127.0.0.1" | "::1") {
        return true;
    }
    let Ok(base) = urls::parse(base) else {
        return false;
    };
    // Segment by segment, so that `/cordonx` is not under `/cordon`.
    let prefix: Vec<&str> = base.path.trim_end_matches('/').split('/').collect();
    let path: Vec<&str> = target.path.split('/').collect();
    target.scheme == base.scheme
        && target.host == base.host
        && target.port == base.port
        && path.starts_with(&prefix)
}

// ---- pending codes --------------------------------------------------------

/// What a code stands for until it is exchanged.
#[derive(Debug, Clone)]
pub struct PendingCode {
    pub client_id: String,
    pub redirect_uri: String,
    /// base64url SHA-256 of the code verifier.
    pub challenge: String,
    pub user_id: String,
    pub resource: String,
    pub scopes: Vec<String>,
    expires: Instant,
}

/// Codes issued and not yet exchanged, by the hash of the code.
#[derive(Default)]
pub struct Codes(Mutex<HashMap<String, PendingCode>>);

impl Codes {
    /// Issues a code; `None` when too many are pending.
    fn issue(&self, pending: PendingCode) -> Option<String> {
        let mut codes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        codes.retain(|_, c| c.expires > now);
        // One user signing in again and again only replaces their own oldest code.
        let mine: Vec<(&String, Instant)> = codes
            .iter()
            .filter(|(_, c)| c.user_id == pending.user_id)
            .map(|(k, c)| (k, c.expires))
            .collect();
        if mine.len() >= MAX_CODES_PER_USER
            && let Some(oldest) = mine
                .iter()
                .min_by_key(|(_, e)| *e)
                .map(|(k, _)| (*k).clone())
        {
            codes.remove(&oldest);
        }
        if codes.len() >= MAX_PENDING_CODES {
            return None;
        }
        let code = crypto::new_secret();
        codes.insert(crypto::sha256_hex(code.as_bytes()), pending);
        Some(code)
    }

    /// Takes the code's grant out: a code works once, and not after it expires.
    pub fn take(&self, code: &str) -> Option<PendingCode> {
        let mut codes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        codes
            .remove(&crypto::sha256_hex(code.as_bytes()))
            .filter(|c| c.expires > Instant::now())
    }
}

/// Whether `verifier` (RFC 7636: 43 to 128 unreserved characters) hashes to
/// `challenge`.
pub fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    let well_formed = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    if !well_formed {
        return false;
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
    let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref());
    aws_lc_rs::constant_time::verify_slices_are_equal(computed.as_bytes(), challenge.as_bytes())
        .is_ok()
}

// ---- the authorize endpoint -----------------------------------------------

/// The parameters of an authorization request, from the query string or
/// the posted form.
#[derive(Debug, Default, Clone)]
struct Params {
    fields: Vec<(String, String)>,
}

impl Params {
    fn parse(raw: &[u8]) -> Result<Params, String> {
        let mut fields: Vec<(String, String)> = Vec::new();
        for (name, value) in form_urlencoded::parse(raw) {
            if fields.iter().any(|(n, _)| *n == name) {
                return Err(format!(
                    "The parameter '{}' is repeated.",
                    name.chars().take(50).collect::<String>()
                ));
            }
            fields.push((name.into_owned(), value.into_owned()));
        }
        Ok(Params { fields })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// A checked authorization request.
struct Request {
    client_id: String,
    client_name: String,
    redirect_uri: String,
    state: Option<String>,
    resource: String,
    scopes: Vec<String>,
    challenge: String,
    /// `response_mode=form_post`: the answer is posted, not put in the query.
    form_post: bool,
}

/// Why a request can't proceed: shown on a page when the redirect URI
/// can't be trusted, else sent back to the client.
enum Refusal {
    Page(String),
    Redirect {
        redirect_uri: String,
        state: Option<String>,
        error: &'static str,
        description: String,
        form_post: bool,
    },
}

async fn check_request(
    state: &AppState,
    tenant: &str,
    params: &Params,
    v1: bool,
) -> Result<Request, Refusal> {
    if !tenant.eq_ignore_ascii_case(&state.tenant_id) {
        return Err(Refusal::Page("This tenant is not served here.".into()));
    }
    let Some(client_id) = params.get("client_id") else {
        return Err(Refusal::Page("The request names no client_id.".into()));
    };
    let Some(client_name) = client_name(state, client_id).await else {
        return Err(Refusal::Page(
            "The application asking you to sign in is not registered here.".into(),
        ));
    };
    let Some(redirect_uri) = params.get("redirect_uri") else {
        return Err(Refusal::Page("The request names no redirect_uri.".into()));
    };
    if !redirect_allowed(state, redirect_uri) {
        return Err(Refusal::Page(
            "The redirect_uri is not allowed: it must be a loopback address or under this server's URL."
                .into(),
        ));
    }
    let form_post = params.get("response_mode") == Some("form_post");
    let redirect = |error: &'static str, description: &str| Refusal::Redirect {
        redirect_uri: redirect_uri.to_owned(),
        state: params.get("state").map(str::to_owned),
        error,
        description: description.to_owned(),
        form_post,
    };
    if params.get("response_type") != Some("code") {
        return Err(redirect(
            "unsupported_response_type",
            "Only response_type=code is supported.",
        ));
    }
    if params
        .get("response_mode")
        .is_some_and(|m| m != "query" && m != "form_post")
    {
        return Err(redirect(
            "invalid_request",
            "The response_mode must be query or form_post.",
        ));
    }
    let Some(challenge) = params.get("code_challenge") else {
        return Err(redirect(
            "invalid_request",
            "PKCE is required: send code_challenge and code_challenge_method=S256.",
        ));
    };
    if params.get("code_challenge_method") != Some("S256")
        || challenge.len() != 43
        || !challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(redirect(
            "invalid_request",
            "The code_challenge must be an S256 challenge (code_challenge_method=S256).",
        ));
    }
    let (resource, scopes) = if v1 {
        match params.get("resource").map(|r| parse_resource(state, r)) {
            Some(Some(parsed)) => parsed,
            Some(None) => {
                return Err(redirect(
                    "invalid_resource",
                    "The resource is not served by this authority.",
                ));
            }
            None => {
                return Err(redirect(
                    "invalid_request",
                    "The parameter 'resource' is missing.",
                ));
            }
        }
    } else {
        match parse_scope(state, params.get("scope").unwrap_or_default()) {
            Ok(parsed) => parsed,
            Err(why) => return Err(redirect("invalid_scope", &why)),
        }
    };
    Ok(Request {
        client_id: client_id.to_owned(),
        client_name,
        redirect_uri: redirect_uri.to_owned(),
        state: params.get("state").map(str::to_owned),
        resource,
        scopes,
        challenge: challenge.to_owned(),
        form_post,
    })
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The sign-in pages' one style sheet, inline and allowed by its hash.
const STYLE: &str = "body{font-family:system-ui,sans-serif;background:#f3f4f6;margin:0}\
     main{max-width:22rem;margin:8vh auto;background:#fff;padding:2rem;border-radius:8px;\
     box-shadow:0 1px 4px #0002}h1{font-size:1.3rem;margin-top:0}\
     label{display:block;margin:.8rem 0 .3rem}input[type=text],input[type=password]\
     {width:100%;box-sizing:border-box;padding:.5rem;font-size:1rem}\
     button{margin-top:1.2rem;width:100%;padding:.6rem;font-size:1rem}\
     .error{color:#b91c1c}.muted{color:#555;font-size:.9rem}";

/// `'sha256-…'` of `text`, for a Content-Security-Policy.
fn csp_hash(text: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    )
}

/// The pages' policy: nothing but the inline style (and `script`, by its
/// hash, when given), no framing.
fn page_policy(script: Option<&str>) -> String {
    let scripts = script.map_or(String::new(), |s| format!(" script-src {};", csp_hash(s)));
    format!(
        "default-src 'none'; style-src {};{scripts} frame-ancestors 'none'; base-uri 'none'",
        csp_hash(STYLE)
    )
}

/// A complete page, with headers that keep it out of frames and caches.
fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} - Cordon</title><style>{STYLE}</style></head>\
         <body><main>{body}</main></body></html>",
        title = escape(title)
    );
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if let Ok(value) = HeaderValue::from_str(&page_policy(None)) {
        headers.insert(header::CONTENT_SECURITY_POLICY, value);
    }
    response
}

fn refusal_response(refusal: Refusal) -> Response {
    match refusal {
        Refusal::Page(message) => page(
            StatusCode::BAD_REQUEST,
            "Sign-in request refused",
            &format!(
                "<h1>Sign-in request refused</h1><p class=\"error\">{}</p>",
                escape(&message)
            ),
        ),
        Refusal::Redirect {
            redirect_uri,
            state,
            error,
            description,
            form_post,
        } => {
            let mut pairs = vec![
                ("error", error.to_owned()),
                ("error_description", description),
            ];
            if let Some(state) = state {
                pairs.push(("state", state));
            }
            answer(&redirect_uri, &pairs, form_post)
        }
    }
}

/// Hidden form fields carrying `pairs`, escaped.
fn hidden_inputs<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    pairs
        .map(|(n, v)| {
            format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                escape(n),
                escape(v)
            )
        })
        .collect()
}

/// Sends the answer of an authorization request to the client: in the
/// redirect's query, or (`form_post`) in a form the browser posts to it.
fn answer(redirect_uri: &str, pairs: &[(&str, String)], form_post: bool) -> Response {
    if !form_post {
        return redirect_to(redirect_uri, pairs);
    }
    let hidden = hidden_inputs(pairs.iter().map(|(n, v)| (*n, v.as_str())));
    let body = format!(
        "<h1>Signing you in</h1><form method=\"post\" action=\"{}\">{hidden}\
         <noscript><button type=\"submit\">Continue</button></noscript></form>\
         <script>{AUTO_SUBMIT}</script>",
        escape(redirect_uri)
    );
    let csp = page_policy(Some(AUTO_SUBMIT));
    let mut response = page(StatusCode::OK, "Signing in", &body);
    if let Ok(value) = HeaderValue::from_str(&csp) {
        response
            .headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, value);
    }
    response
}

/// The one script Cordon's pages run: posting a form_post answer.
const AUTO_SUBMIT: &str = "document.forms[0].submit()";

fn redirect_to(redirect_uri: &str, pairs: &[(&str, String)]) -> Response {
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())))
        .finish();
    let separator = if redirect_uri.contains('?') { '&' } else { '?' };
    let location = format!("{redirect_uri}{separator}{query}");
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The sign-in form, carrying the request's parameters as hidden fields.
fn form(
    status: StatusCode,
    params: &Params,
    request: &Request,
    name: &str,
    error: Option<&str>,
) -> Response {
    let hidden = hidden_inputs(
        params
            .fields
            .iter()
            .filter(|(n, _)| n != "login" && n != "passwd")
            .map(|(n, v)| (n.as_str(), v.as_str())),
    );
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default();
    let body = format!(
        "<h1>Sign in to Cordon</h1>\
         <p class=\"muted\">{client} asks to act for you: {scopes}.</p>{error}\
         <form method=\"post\">{hidden}\
         <label for=\"login\">User name</label>\
         <input type=\"text\" id=\"login\" name=\"login\" value=\"{name}\" autocomplete=\"username\" required autofocus>\
         <label for=\"passwd\">Password</label>\
         <input type=\"password\" id=\"passwd\" name=\"passwd\" autocomplete=\"current-password\" required>\
         <button type=\"submit\">Sign in</button></form>",
        client = escape(&request.client_name),
        scopes = escape(&request.scopes.join(", ")),
        name = escape(name),
    );
    page(status, "Sign in", &body)
}

async fn authorize_page(
    State(state): State<Arc<AppState>>,
    crate::authority::TenantParam(tenant): crate::authority::TenantParam,
    uri: axum::http::Uri,
    RawQuery(query): RawQuery,
) -> Response {
    let v1 = !uri.path().contains("/v2.0/");
    let params = match Params::parse(query.unwrap_or_default().as_bytes()) {
        Ok(params) => params,
        Err(why) => return refusal_response(Refusal::Page(why)),
    };
    match check_request(&state, &tenant, &params, v1).await {
        Ok(request) => {
            let hint = params.get("login_hint").unwrap_or_default().to_owned();
            form(StatusCode::OK, &params, &request, &hint, None)
        }
        Err(refusal) => refusal_response(refusal),
    }
}

async fn authorize_submit(
    State(state): State<Arc<AppState>>,
    crate::authority::TenantParam(tenant): crate::authority::TenantParam,
    uri: axum::http::Uri,
    conn: Option<Extension<ConnInfo>>,
    slot: Option<Extension<PrincipalSlot>>,
    body: Bytes,
) -> Response {
    let v1 = !uri.path().contains("/v2.0/");
    let params = match Params::parse(&body) {
        Ok(params) => params,
        Err(why) => return refusal_response(Refusal::Page(why)),
    };
    let request = match check_request(&state, &tenant, &params, v1).await {
        Ok(request) => request,
        Err(refusal) => return refusal_response(refusal),
    };
    let name = params.get("login").unwrap_or_default().to_owned();
    if let Some(Extension(slot)) = &slot {
        slot.set_text(attempt_label(&name));
    }
    let password = params.get("passwd").unwrap_or_default();
    let source = conn
        .map(|Extension(c)| c.peer.ip().to_string())
        .unwrap_or_default();
    let user = match check_password(&state, &name, password, &source).await {
        Ok(user) => user,
        Err(failure) => {
            let status = match failure {
                SignInFailure::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
                SignInFailure::Invalid => StatusCode::UNAUTHORIZED,
                SignInFailure::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            };
            let mut response = form(status, &params, &request, &name, Some(&failure.message()));
            if let SignInFailure::Throttled(wait) = failure
                && let Ok(value) = HeaderValue::from_str(&wait.to_string())
            {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            return response;
        }
    };
    let pending = PendingCode {
        client_id: request.client_id.clone(),
        redirect_uri: request.redirect_uri.clone(),
        challenge: request.challenge.clone(),
        user_id: user.id.clone(),
        resource: request.resource.clone(),
        scopes: request.scopes.clone(),
        expires: Instant::now() + CODE_LIFETIME,
    };
    let Some(code) = state.codes.issue(pending) else {
        return refusal_response(Refusal::Redirect {
            redirect_uri: request.redirect_uri,
            state: request.state,
            error: "temporarily_unavailable",
            description: "Too many sign-ins are pending; try again shortly.".into(),
            form_post: request.form_post,
        });
    };
    tracing::info!(user = %user.id, client_id = %request.client_id, "user signed in");
    let mut pairs = vec![("code", code)];
    if let Some(s) = request.state {
        pairs.push(("state", s));
    }
    answer(&request.redirect_uri, &pairs, request.form_post)
}

#[cfg(test)]
mod tests {
    #[test]
    fn redirect_uris_are_compared_as_urls() {
        let base = "https://cordon.example.com:8443";
        for ok in [
            "http://localhost:5555/cb",
            "http://127.0.0.1/cb",
            "http://[::1]:65535/",
            "https://LOCALHOST/x?y=1",
            "https://cordon.example.com:8443/console/",
            "https://Cordon.Example.com:8443",
        ] {
            assert!(redirect_allowed_under(base, ok), "{ok} refused");
        }
        for bad in [
            // Malformed ports: not loopback, not the server.
            "https://127.0.0.1:8443.evil.com/",
            "http://localhost:99999999/",
            "http://localhost:0/",
            "http://localhost:+80/",
            "http://localhost:/",
            "https://cordon.example.com:8443.evil.com/",
            // Other hosts, ports, schemes, user info, fragments.
            "https://cordon.example.com.evil.com:8443/",
            "https://cordon.example.com:8444/",
            "https://cordon.example.com/",
            "http://cordon.example.com:8443/",
            "https://evil.com@cordon.example.com:8443/",
            "https://localhost@evil.com/",
            "http://localhost/cb#frag",
            "ftp://localhost/",
            "/relative",
            "https://[::1/",
            "https://exa mple.com/",
        ] {
            assert!(!redirect_allowed_under(base, bad), "{bad} allowed");
        }
        // A public URL with a path: only what is under it.
        let base = "https://example.com/cordon";
        assert!(redirect_allowed_under(
            base,
            "https://example.com/cordon/cb"
        ));
        assert!(redirect_allowed_under(
            base,
            "https://example.com:443/cordon"
        ));
        assert!(!redirect_allowed_under(
            base,
            "https://example.com/cordonx/cb"
        ));
        assert!(!redirect_allowed_under(base, "https://example.com/other"));
    }

    /// A browser resolves `.` and `..` segments (`%2e` too, in any case)
    /// before it follows a redirect: a URI that names them, or hides a `/`
    /// as `%2f`, is not under the public URL's path whatever its text says.
    #[test]
    fn redirect_uris_cannot_climb_out_of_the_public_path() {
        let base = "https://cordon.example.com:28450/cordon";
        for ok in [
            "https://cordon.example.com:28450/cordon",
            "https://cordon.example.com:28450/cordon/",
            "https://cordon.example.com:28450/cordon/cb",
            "https://cordon.example.com:28450/cordon/a.b/...x/cb",
            "https://cordon.example.com:28450/cordon/cb?next=/../x",
            "http://localhost:5555/cb",
        ] {
            assert!(redirect_allowed_under(base, ok), "{ok} refused");
        }
        for bad in [
            "https://cordon.example.com:28450/cordon/../evil",
            "https://cordon.example.com:28450/cordon/..",
            "https://cordon.example.com:28450/cordon/./cb",
            "https://cordon.example.com:28450/cordon/.",
            "https://cordon.example.com:28450/cordon/%2e%2e/evil",
            "https://cordon.example.com:28450/cordon/%2E%2E/evil",
            "https://cordon.example.com:28450/cordon/.%2e/evil",
            "https://cordon.example.com:28450/cordon/%2E./evil",
            "https://cordon.example.com:28450/cordon/%2e/cb",
            "https://cordon.example.com:28450/cordon/cb/../../evil",
            "https://cordon.example.com:28450/cordon%2f..%2fevil",
            "https://cordon.example.com:28450/cordon/a%2Fb",
            "https://cordon.example.com:28450/cordon/..\\evil",
            "https://cordon.example.com:28450/cordonx",
            "https://cordon.example.com:28450/cordonx/cb",
            "https://cordon.example.com:28450/",
            // Loopback is no exception: dot segments are refused everywhere.
            "http://localhost:5555/cb/../x",
            "http://127.0.0.1/%2e%2e/x",
        ] {
            assert!(!redirect_allowed_under(base, bad), "{bad} allowed");
        }
        // Under a root public URL, too.
        let root = "https://cordon.example.com:28450";
        assert!(!redirect_allowed_under(
            root,
            "https://cordon.example.com:28450/a/../b"
        ));
    }

    use super::*;

    #[test]
    fn pkce_verifies_the_rfc_7636_example() {
        // RFC 7636, appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(pkce_matches(verifier, challenge));
        assert!(!pkce_matches(&verifier.replace('d', "e"), challenge));
        assert!(!pkce_matches("short", challenge));
    }

    #[test]
    fn pages_escape_what_they_show() {
        assert_eq!(
            escape("<script>\"x\"&'y'</script>"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;"
        );
    }

    #[tokio::test]
    async fn a_form_post_answer_posts_escaped_fields_with_only_its_own_script() {
        let response = answer(
            "http://localhost:5555/cb",
            &[("code", "c\"><x".into()), ("state", "s".into())],
            true,
        );
        assert_eq!(response.status(), StatusCode::OK);
        let csp = response.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .to_owned();
        // Only the auto-submit script runs: its hash, no 'unsafe-inline' script.
        assert!(
            csp.contains("script-src 'sha256-ePniVEkSivX/c7XWBGafqh8tSpiRrKiqYeqbG7N1TOE='"),
            "{csp}"
        );
        // And only the page's own style, by its hash; no <base> rewrite.
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(csp.contains("base-uri 'none'"), "{csp}");
        assert!(
            csp.contains(&format!("style-src {}", csp_hash(STYLE))),
            "{csp}"
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            body.contains("action=\"http://localhost:5555/cb\""),
            "{body}"
        );
        assert!(body.contains("value=\"c&quot;&gt;&lt;x\""), "{body}");
        assert!(!body.contains("c\"><x"), "{body}");

        let redirect = answer("http://localhost:5555/cb", &[("code", "c".into())], false);
        assert_eq!(redirect.status(), StatusCode::SEE_OTHER);
        assert_eq!(
            redirect.headers()[header::LOCATION],
            "http://localhost:5555/cb?code=c"
        );
    }

    #[test]
    fn a_user_holds_a_bounded_number_of_pending_codes() {
        let codes = Codes::default();
        let pending = |user: &str| PendingCode {
            client_id: "c".into(),
            redirect_uri: "http://localhost/cb".into(),
            challenge: "x".into(),
            user_id: user.into(),
            resource: "r".into(),
            scopes: vec![],
            expires: Instant::now() + CODE_LIFETIME,
        };
        let first = codes.issue(pending("u")).unwrap();
        for _ in 0..MAX_CODES_PER_USER {
            codes.issue(pending("u")).unwrap();
        }
        assert!(codes.take(&first).is_none(), "the oldest made room");
        let other = codes.issue(pending("v")).unwrap();
        assert_eq!(codes.take(&other).unwrap().user_id, "v");
    }

    #[test]
    fn codes_work_once() {
        let codes = Codes::default();
        let code = codes
            .issue(PendingCode {
                client_id: "c".into(),
                redirect_uri: "http://localhost/cb".into(),
                challenge: "x".into(),
                user_id: "u".into(),
                resource: "r".into(),
                scopes: vec![],
                expires: Instant::now() + CODE_LIFETIME,
            })
            .unwrap();
        assert!(codes.take("not the code").is_none());
        assert_eq!(codes.take(&code).unwrap().user_id, "u");
        assert!(codes.take(&code).is_none());
    }
}
