//! The one application error type, and the middleware that gives every
//! response its request id.
//!
//! Handlers return [`ApiError`]; its response carries the error's parts as an
//! extension and an empty body. [`request_context`] then writes the body in
//! the contract's format with the request id as `target`, so an error never
//! needs to know which request it belongs to.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use proto::api::{ErrorBody, ErrorDetail};
use tracing::Instrument;

use crate::monitoring::UNMATCHED;
use crate::{AppState, crypto};

/// Largest request body accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// The id of the request being served (a GUID).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The code and message of an error response, left on the rendered
/// response for the audit trail.
#[derive(Debug, Clone)]
pub struct ErrorSummary {
    pub code: &'static str,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub active_action_id: Option<String>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            active_action_id: None,
            retry_after: None,
        }
    }
    pub fn invalid_body(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "InvalidRequestBody", message)
    }
    pub fn missing_parameter(name: &str) -> ApiError {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MissingRequiredParameter",
            format!("Parameter {name} is missing."),
        )
    }
    pub fn invalid_input(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "InvalidInput", message)
    }
    pub fn odata(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "ODataError", message)
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }
    pub fn active_request(active_action_id: String) -> ApiError {
        ApiError {
            active_action_id: Some(active_action_id),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "ActiveRequestAlreadyExists",
                "Action is already in progress",
            )
        }
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::FORBIDDEN, "Forbidden", message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "ResourceNotFound", message)
    }
    /// Cordon: the request would break a uniqueness rule (an exclusion
    /// rule's name).
    /// A value that clashes with stored data (a duplicate name): a 400
    /// `InvalidInput`, the contract's code for a value that isn't acceptable.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "InvalidInput", message)
    }
    pub fn unsupported_media_type() -> ApiError {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "The request's Content-Type must be application/json.",
        )
    }
    pub fn too_large() -> ApiError {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("The request body is larger than {} KiB.", MAX_BODY / 1024),
        )
    }
    pub fn too_many_requests(retry_after: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                format!("Rate limit is exceeded. Try again in {retry_after} seconds."),
            )
        }
    }
    /// A 500; the cause is logged here and never shown to the client.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "An unexpected error occurred. Quote the request id when reporting it.",
        )
    }
}

impl From<store::StoreError> for ApiError {
    fn from(e: store::StoreError) -> ApiError {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response.extensions_mut().insert(self);
        response
    }
}

/// Content type of every JSON response.
pub const JSON_CONTENT_TYPE: &str =
    "application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8";

/// A JSON response with the contract's headers.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(JSON_CONTENT_TYPE),
    );
    headers.insert("OData-Version", HeaderValue::from_static("4.0"));
    response
}

/// The middleware just inside the audit layer (`audit::record`): request
/// id, tracing span, access log, request metrics, the error body, panic
/// containment and the body size limit.
///
/// Requests are known by their route template (`/api/machines/{id}`, or
/// `unmatched`), never by their path or query: those may hold ids and
/// secrets, and would make the metrics' labels unbounded.
pub async fn request_context(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let request_id = crypto::new_guid();
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_owned(), |p| p.as_str().to_owned());
    // Under a target of its own (not this module's), so that `CORDON_LOG`
    // can select the access log: `cordon::request=info`.
    let span = tracing::info_span!(target: "cordon::request", "request", request_id = %request_id, %method, %route);
    request
        .extensions_mut()
        .insert(RequestId(request_id.clone()));

    // The authority's endpoints answer in OAuth's error format (RFC 6749).
    let oauth = path.contains("/oauth2/");
    let response = async move {
        let request = match buffer_body(request).await {
            Ok(request) => request,
            Err(e) if oauth => {
                return oauth_error(e.status, "invalid_request", e.message).into_response();
            }
            Err(e) => return e.into_response(),
        };
        match std::panic::AssertUnwindSafe(next.run(request))
            .catch_unwind()
            .await
        {
            Ok(response) => response,
            Err(_) => ApiError::internal("a request handler panicked").into_response(),
        }
    }
    .instrument(span.clone())
    .await;

    let mut response = render_error(response, &request_id);
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("request-id", value);
    }
    let elapsed = started.elapsed();
    let _entered = span.enter();
    tracing::info!(
        target: "cordon::request",
        status = response.status().as_u16(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "served"
    );
    state
        .metrics
        .observe_request(&method, &route, response.status(), elapsed);
    response
}

fn render_error(mut response: Response, request_id: &str) -> Response {
    let Some(error) = response.extensions_mut().remove::<ApiError>() else {
        return response;
    };
    let summary = ErrorSummary {
        code: error.code,
        message: error.message.clone(),
    };
    let body = ErrorBody {
        error: ErrorDetail {
            code: error.code.to_owned(),
            message: error.message,
            target: request_id.to_owned(),
            active_action_id: error.active_action_id,
        },
    };
    let mut rendered = json_response(
        error.status,
        serde_json::to_vec(&body).expect("error body serializes"),
    );
    for (name, value) in response.headers() {
        rendered.headers_mut().insert(name.clone(), value.clone());
    }
    rendered.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(JSON_CONTENT_TYPE),
    );
    rendered.extensions_mut().insert(summary);
    rendered
}

/// A body over the limit is still read (and discarded) up to this size, so
/// that the client, still sending, gets to read the 413 instead of a reset.
const MAX_DRAIN: usize = 64 * 1024 * 1024;

/// Reads the whole body up to [`MAX_BODY`] before anything else looks at the
/// request, so that an oversized body is refused first (413 before 401).
async fn buffer_body(request: Request) -> Result<Request, ApiError> {
    // An agent's session upgrade has no body to read, and reading would
    // wait forever; every other request is buffered.
    if request.method() == axum::http::Method::GET
        && request.uri().path() == proto::agent::SESSION_PATH
        && request.headers().contains_key(header::UPGRADE)
    {
        return Ok(request);
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_DRAIN as u64) {
        return Err(ApiError::too_large());
    }
    let (parts, mut body) = request.into_parts();
    let mut kept = Vec::new();
    let mut total = 0usize;
    let read_all = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Err(ApiError::invalid_body(
                    "The request body could not be read.",
                ));
            };
            if let Ok(data) = frame.into_data() {
                total += data.len();
                if total <= MAX_BODY {
                    kept.extend_from_slice(&data);
                } else if total > MAX_DRAIN {
                    break;
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(30), read_all).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(ApiError::invalid_body(
                "The request body was not sent in time.",
            ));
        }
    }
    if total > MAX_BODY {
        return Err(ApiError::too_large());
    }
    Ok(Request::from_parts(parts, Body::from(kept)))
}

/// An RFC 6749 error answer.
pub(crate) struct OAuthFailure {
    pub(crate) status: StatusCode,
    pub(crate) error: &'static str,
    pub(crate) description: String,
    /// Seconds for `Retry-After` (a throttled sign-in).
    pub(crate) retry_after: Option<u64>,
}

pub(crate) fn oauth_error(
    status: StatusCode,
    error: &'static str,
    description: impl Into<String>,
) -> OAuthFailure {
    OAuthFailure {
        status,
        error,
        description: description.into(),
        retry_after: None,
    }
}

impl IntoResponse for OAuthFailure {
    fn into_response(self) -> Response {
        let body = proto::auth::OAuthError {
            error: self.error.to_owned(),
            error_description: self.description,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, "no-store".parse().expect("header"));
        if let Some(wait) = self.retry_after {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                wait.to_string().parse().expect("header"),
            );
        }
        response
    }
}
