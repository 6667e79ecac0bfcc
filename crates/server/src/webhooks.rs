//! Webhooks (a Cordon extension, `docs/soar.md`): the events of the log,
//! pushed to HTTPS receivers, signed as Standard Webhooks sign them.
//!
//! The outbox is the store's: every event of a subscribed type gets one
//! delivery row per webhook in the transaction of its change
//! (`store::events`). This module checks what a webhook may be (shared by
//! `POST /api/webhooks` and `cordon webhook create`, so both refuse the same
//! input with the same message), serves the endpoints, and runs the sender:
//! one task per webhook, at most [`IN_FLIGHT`] deliveries at once over
//! kept-alive connections, each attempt bounded by a deadline and recorded
//! with its outcome. A receiver that fails is probed with one delivery at a
//! time, backing off, until it answers again, so a dead receiver costs one
//! connection attempt per backoff step rather than one per event; each
//! delivery also keeps its own backoff and is given up 24 hours (by
//! default) after its event. Nothing here runs in the path of an isolation:
//! the action's write only adds the rows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use proto::time::format_utc;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Map, Value};
use store::{AfterAttempt, AttemptRecord, DeliveryRecord, Store, StoreError, WebhookRecord};

use crate::api::{IdParam, context_url, parse_body, require_json, shorten};
use crate::auth::{Permission, Principal};
use crate::error::{ApiError, json_response};
use crate::{AppState, crypto, nanos, now_nanos};

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Longest URL, in bytes.
pub const MAX_URL: usize = 2048;
/// Longest `Description`, in characters.
pub const MAX_DESCRIPTION: usize = 1000;
/// Largest CA certificate text, in bytes.
pub const MAX_CA_PEM: usize = 64 * 1024;
/// Deliveries in flight to one receiver at once (each on its own connection).
pub const IN_FLIGHT: usize = 16;
/// The longest wait between two attempts of one delivery.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Deliveries taken from the outbox at once for one receiver (sent
/// [`IN_FLIGHT`] at a time; their outcomes recorded in one write).
const BATCH: usize = 128;
/// How long finished deliveries stay listed before they are pruned.
pub const HISTORY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most deliveries one listing returns.
pub const MAX_LISTED: usize = 100;
/// How often the sender looks for webhooks and deliveries written by another
/// process (admin commands), and for retries that came due.
const POLL: Duration = Duration::from_secs(1);
/// The longest error text an attempt records, in characters.
const MAX_ERROR: usize = 300;
/// How much of a receiver's answer is read (and thrown away).
const MAX_ANSWER: usize = 64 * 1024;
/// Where the system's CA certificates are (Debian, Ubuntu, Alpine, Arch).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How the sender retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// The wait after a delivery's first failed attempt; it doubles with each
    /// attempt, up to [`MAX_BACKOFF`], and is jittered.
    pub retry_base: Duration,
    /// How long after its event a delivery is retried before it is given up.
    pub retry_for: Duration,
    /// An attempt's deadline, from connecting to the end of the answer.
    pub attempt_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            retry_base: Duration::from_secs(1),
            retry_for: Duration::from_secs(24 * 3600),
            attempt_timeout: Duration::from_secs(10),
        }
    }
}

// ---- what a webhook may be -------------------------------------------------

/// A webhook as asked for, before its checks.
#[derive(Debug, Clone, Default)]
pub struct WebhookInput {
    pub url: String,
    /// Event types; an entry may be a comma-separated list.
    pub events: Vec<String>,
    /// `None`: one is generated.
    pub secret: Option<String>,
    pub ca_pem: Option<String>,
    pub description: Option<String>,
}

/// Checks a webhook and makes its record (a new id, the secret given or a
/// new one). The error is a sentence naming the field.
pub fn new_webhook(input: WebhookInput, created_by: String) -> Result<WebhookRecord, String> {
    let url = check_url(input.url.trim())?;
    let events = check_events(&input.events)?;
    let secret = match input.secret {
        Some(secret) => check_secret(secret.trim())?,
        None => new_secret(),
    };
    let ca_pem = match input.ca_pem {
        Some(pem) => Some(check_ca(&pem)?),
        None => None,
    };
    let description = match input.description.map(|d| d.trim().to_owned()) {
        Some(d) if d.is_empty() => None,
        Some(d) if d.chars().count() > MAX_DESCRIPTION => {
            return Err(format!(
                "Description is longer than {MAX_DESCRIPTION} characters."
            ));
        }
        Some(d) if !crate::text::is_safe_to_show(&d) => {
            return Err(format!("Description {}", crate::text::UNSAFE_TEXT));
        }
        other => other,
    };
    Ok(WebhookRecord {
        id: crypto::new_guid(),
        url,
        events,
        secret,
        ca_pem,
        description,
        created_by,
        created_at: now_nanos(),
    })
}

fn check_url(url: &str) -> Result<String, String> {
    if url.len() > MAX_URL {
        return Err(format!("Url is longer than {MAX_URL} bytes."));
    }
    let parts = crate::urls::parse(url).map_err(|e| format!("Url {e}."))?;
    if parts.scheme != "https" {
        return Err("Url must be an https:// URL: deliveries go over TLS only.".into());
    }
    Ok(url.to_owned())
}

fn check_events(events: &[String]) -> Result<Vec<String>, String> {
    let mut unique: Vec<String> = Vec::new();
    for name in events.iter().flat_map(|e| e.split(',')) {
        let name = name.trim();
        if name.is_empty() {
            continue;
        }
        let Some(known) = store::EVENT_TYPES
            .iter()
            .find(|t| t.eq_ignore_ascii_case(name))
        else {
            return Err(format!(
                "'{}' is not an event type; use {}.",
                shorten(name),
                store::EVENT_TYPES.join(", ")
            ));
        };
        if !unique.iter().any(|u| u == known) {
            unique.push((*known).to_owned());
        }
    }
    if unique.is_empty() {
        return Err(format!(
            "Events names no event type; use one or more of {}.",
            store::EVENT_TYPES.join(", ")
        ));
    }
    Ok(unique)
}

/// Checks a secret in the Standard Webhooks form: `whsec_` and the base64
/// of 24 to 64 random bytes.
pub fn check_secret(secret: &str) -> Result<String, String> {
    let key = secret_key(secret).ok_or_else(|| {
        "Secret must be whsec_ followed by the base64 of 24 to 64 bytes.".to_owned()
    })?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!(
            "Secret holds {} bytes; use 24 to 64 (a whsec_ secret of 32 random bytes is usual).",
            key.len()
        ));
    }
    Ok(secret.to_owned())
}

/// The key bytes of a `whsec_` secret.
fn secret_key(secret: &str) -> Option<Vec<u8>> {
    let encoded = secret.strip_prefix(SECRET_PREFIX)?;
    if encoded.len() > 128 {
        return None;
    }
    STANDARD.decode(encoded).ok()
}

/// A new secret: `whsec_` and the base64 of 32 random bytes.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    aws_lc_rs::rand::fill(&mut key).expect("the system's random number generator");
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// Checks a PEM text of CA certificates: at most [`MAX_CA_PEM`] bytes, at
/// least one certificate, every one of them usable as a trust anchor.
fn check_ca(pem: &str) -> Result<String, String> {
    if pem.len() > MAX_CA_PEM {
        return Err(format!(
            "CaCertificate is larger than {} KiB.",
            MAX_CA_PEM / 1024
        ));
    }
    let roots = roots_from_pem(pem)?;
    if roots.is_empty() {
        return Err("CaCertificate holds no PEM certificate.".into());
    }
    Ok(pem.to_owned())
}

fn roots_from_pem(pem: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("CaCertificate is not PEM: {e}."))?;
        roots
            .add(cert)
            .map_err(|e| format!("CaCertificate holds an unusable certificate: {e}."))?;
    }
    Ok(roots)
}

// ---- signing ----------------------------------------------------------------

/// The `webhook-signature` header of a delivery: `v1,` and the base64 of
/// HMAC-SHA256, keyed with the secret's bytes, over `id.timestamp.body`.
pub fn signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let key_bytes = secret_key(secret).unwrap_or_default();
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key_bytes);
    let mut context = aws_lc_rs::hmac::Context::with_key(&key);
    context.update(id.as_bytes());
    context.update(b".");
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    format!("v1,{}", STANDARD.encode(context.sign().as_ref()))
}

// ---- what the API and the CLI show -------------------------------------------

/// A webhook as shown; the secret only when `with_secret`.
pub fn entity(webhook: &WebhookRecord, with_secret: bool) -> proto::api::Webhook {
    proto::api::Webhook {
        id: webhook.id.clone(),
        url: webhook.url.clone(),
        events: webhook.events.clone(),
        description: webhook.description.clone(),
        created_by: webhook.created_by.clone(),
        created_date_time_utc: format_utc(webhook.created_at),
        custom_ca: webhook.ca_pem.is_some(),
        secret: with_secret.then(|| webhook.secret.clone()),
    }
}

/// A delivery as shown, with its attempts.
pub fn delivery_entity(
    delivery: &DeliveryRecord,
    attempts: &[AttemptRecord],
) -> proto::api::WebhookDelivery {
    proto::api::WebhookDelivery {
        id: delivery.id.clone(),
        webhook_id: delivery.webhook_id.clone(),
        event_id: delivery.event_seq,
        event_type: delivery.event_type.clone(),
        status: match delivery.state.as_str() {
            "delivered" => "Delivered",
            "failed" => "Failed",
            _ => "Pending",
        }
        .to_owned(),
        created_date_time_utc: format_utc(delivery.created_at),
        attempts: attempts
            .iter()
            .map(|a| proto::api::WebhookAttempt {
                date_time_utc: format_utc(a.at),
                status_code: a.status,
                error: a.error.clone(),
                duration_ms: a.duration_ms,
            })
            .collect(),
        next_attempt_date_time_utc: delivery.next_attempt_at.map(format_utc),
        delivered_date_time_utc: delivery.delivered_at.map(format_utc),
    }
}

/// The deliveries, newest first (of one webhook, or of all), with their
/// attempts.
pub async fn deliveries(
    store: &Store,
    webhook_id: Option<&str>,
    limit: usize,
) -> Result<Vec<proto::api::WebhookDelivery>, StoreError> {
    let mut listed = Vec::new();
    for delivery in store.list_deliveries(webhook_id, limit).await? {
        let attempts = store.delivery_attempts(delivery.seq).await?;
        listed.push(delivery_entity(&delivery, &attempts));
    }
    Ok(listed)
}

/// Adds a checked webhook; refused past [`store::MAX_WEBHOOKS`].
pub async fn create(store: &Store, webhook: WebhookRecord) -> Result<WebhookRecord, ApiError> {
    match store.create_webhook(webhook).await {
        Ok(created) => Ok(created),
        Err(StoreError::TooMany(max)) => Err(ApiError::bad_request(format!(
            "There are {max} webhooks already, the most there may be; delete one first."
        ))),
        Err(e) => Err(e.into()),
    }
}

// ---- the endpoints ------------------------------------------------------------

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/webhooks", get(list).post(create_endpoint))
        .route("/webhooks/{id}", get(get_one).delete(delete))
        .route("/webhooks/{id}/deliveries", get(list_deliveries))
}

/// Webhooks carry the events of every machine group: managing them takes
/// the settings permission and reach over every group.
fn require_manager(principal: &Principal) -> Result<(), ApiError> {
    principal.require(Permission::Settings)?;
    if principal.machine_groups().is_some() {
        return Err(ApiError::forbidden(
            "Webhooks carry the events of every machine group; only callers who reach all of them may manage webhooks.",
        ));
    }
    Ok(())
}

fn webhook_id_param(id: &str) -> Result<String, ApiError> {
    crate::api::guid_param(id, "a webhook id")
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("Webhook {id} was not found."))
}

/// `$top` (1 to [`MAX_LISTED`]) on the deliveries; other `$` options are
/// refused, anything else ignored.
fn top_option(uri: &axum::http::Uri, allow_top: bool) -> Result<usize, ApiError> {
    let mut top = MAX_LISTED;
    for (key, value) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        if key == "$top" && allow_top {
            top = value
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LISTED).contains(n))
                .ok_or_else(|| {
                    ApiError::odata(format!(
                        "$top must be a whole number from 1 to {MAX_LISTED}."
                    ))
                })?;
        } else if key.starts_with('$') {
            return Err(ApiError::odata(format!(
                "The query option '{}' is not supported here.",
                shorten(&key)
            )));
        }
    }
    Ok(top)
}

fn value_response(state: &AppState, headers: &HeaderMap, set: &str, value: Value) -> Response {
    let body = serde_json::json!({
        "@odata.context": context_url(headers, state, set),
        "value": value,
    });
    json_response(
        StatusCode::OK,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Result<Response, ApiError> {
    require_manager(&principal)?;
    top_option(&uri, false)?;
    let webhooks: Vec<_> = state
        .store
        .list_webhooks()
        .await?
        .iter()
        .map(|w| entity(w, false))
        .collect();
    let value = serde_json::to_value(webhooks).map_err(ApiError::internal)?;
    Ok(value_response(&state, &headers, "Webhooks", value))
}

async fn get_one(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    IdParam(id): IdParam,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Result<Response, ApiError> {
    require_manager(&principal)?;
    top_option(&uri, false)?;
    let id = webhook_id_param(&id)?;
    let webhook = state
        .store
        .get_webhook(&id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(webhook_response(
        StatusCode::OK,
        &state,
        &headers,
        &webhook,
        false,
    ))
}

fn webhook_response(
    status: StatusCode,
    state: &AppState,
    headers: &HeaderMap,
    webhook: &WebhookRecord,
    with_secret: bool,
) -> Response {
    crate::api::entity_response(
        status,
        &context_url(headers, state, "Webhooks/$entity"),
        entity(webhook, with_secret),
        None,
    )
}

/// Reads `POST /api/webhooks`: `Url`, `Events` (an array of strings, or a
/// comma-separated string), and optionally `Secret`, `CaCertificate` and
/// `Description`.
fn parse_input(body: &[u8]) -> Result<WebhookInput, ApiError> {
    let object: Map<String, Value> = parse_body(body)?;
    let text = |name: &str| -> Result<Option<String>, ApiError> {
        match object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.clone())),
            Some(_) => Err(ApiError::invalid_body(format!(
                "Field {name} must be a string."
            ))),
        }
    };
    let url = text("Url")?.ok_or_else(|| ApiError::missing_parameter("Url"))?;
    let events = match object.get("Events") {
        None | Some(Value::Null) => return Err(ApiError::missing_parameter("Events")),
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) if items.len() <= 64 => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(text.clone()),
                _ => Err(ApiError::invalid_body(
                    "Field Events must be an array of strings.",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid_input(
                "Events lists more than 64 entries.",
            ));
        }
        Some(_) => {
            return Err(ApiError::invalid_body(
                "Field Events must be an array of strings.",
            ));
        }
    };
    Ok(WebhookInput {
        url,
        events,
        secret: text("Secret")?,
        ca_pem: text("CaCertificate")?,
        description: text("Description")?,
    })
}

async fn create_endpoint(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_manager(&principal)?;
    require_json(&headers)?;
    let input = parse_input(&body)?;
    let webhook =
        new_webhook(input, principal.display_name.clone()).map_err(ApiError::invalid_input)?;
    let webhook = create(&state.store, webhook).await?;
    tracing::info!(webhook_id = %webhook.id, url = %webhook.url, by = %principal.display_name, "webhook created");
    state.metrics.webhooks_changed.notify_one();
    let mut response = webhook_response(StatusCode::CREATED, &state, &headers, &webhook, true);
    response
        .extensions_mut()
        .insert(crate::audit::AuditDetail(format!(
            "webhook {} to {} for {}",
            webhook.id,
            webhook.url,
            webhook.events.join(", ")
        )));
    Ok(response)
}

async fn delete(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    IdParam(id): IdParam,
) -> Result<Response, ApiError> {
    require_manager(&principal)?;
    let id = webhook_id_param(&id)?;
    let url = state
        .store
        .get_webhook(&id)
        .await?
        .ok_or_else(|| not_found(&id))?
        .url;
    match state.store.delete_webhook(&id).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => return Err(not_found(&id)),
        Err(e) => return Err(e.into()),
    }
    tracing::info!(webhook_id = %id, by = %principal.display_name, "webhook deleted");
    state.metrics.webhooks_changed.notify_one();
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .extensions_mut()
        .insert(crate::audit::AuditDetail(format!("webhook {id} to {url}")));
    Ok(response)
}

async fn list_deliveries(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    IdParam(id): IdParam,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Result<Response, ApiError> {
    require_manager(&principal)?;
    let top = top_option(&uri, true)?;
    let id = webhook_id_param(&id)?;
    if state.store.get_webhook(&id).await?.is_none() {
        return Err(not_found(&id));
    }
    let listed = deliveries(&state.store, Some(&id), top).await?;
    let value = serde_json::to_value(listed).map_err(ApiError::internal)?;
    Ok(value_response(&state, &headers, "WebhookDeliveries", value))
}

// ---- the sender -----------------------------------------------------------------

/// Keeps one sending task per webhook, until the server stops: started for
/// new webhooks, stopped for deleted ones, and woken when a commit queued
/// deliveries (or every [`POLL`], for what another process wrote).
pub async fn run(state: Arc<AppState>) {
    let mut senders: HashMap<String, Sender> = HashMap::new();
    loop {
        match state.store.list_webhooks().await {
            Ok(webhooks) => {
                senders.retain(|id, _| webhooks.iter().any(|w| &w.id == id));
                for webhook in webhooks {
                    senders
                        .entry(webhook.id.clone())
                        .or_insert_with(|| Sender::start(state.clone(), webhook));
                }
            }
            Err(e) => tracing::warn!(error = %e, "webhooks: cannot read the webhooks"),
        }
        tokio::select! {
            _ = state.metrics.webhook_deliveries_queued.notified() => {}
            _ = state.metrics.webhooks_changed.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
        for sender in senders.values() {
            sender.wake.notify_one();
        }
    }
}

/// A webhook's sending task; stopped when dropped.
struct Sender {
    wake: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Sender {
    fn start(state: Arc<AppState>, webhook: WebhookRecord) -> Sender {
        let wake = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(send_loop(state, webhook, wake.clone()));
        Sender { wake, task }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn send_loop(state: Arc<AppState>, webhook: WebhookRecord, wake: Arc<tokio::sync::Notify>) {
    let span = tracing::info_span!("webhook", webhook_id = %webhook.id);
    let _ = tracing::Instrument::instrument(send_deliveries(state, webhook, wake), span).await;
}

async fn send_deliveries(
    state: Arc<AppState>,
    webhook: WebhookRecord,
    wake: Arc<tokio::sync::Notify>,
) {
    let settings = state.config.webhooks;
    let client = Client::new(&webhook);
    // Failed rounds in a row: while the receiver fails, one delivery at a
    // time probes it, after a wait that grows with each failed round.
    let mut failing: u32 = 0;
    loop {
        let batch = if failing > 0 { 1 } else { BATCH };
        let due = match state
            .store
            .due_deliveries(&webhook.id, now_nanos(), batch)
            .await
        {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "webhooks: cannot read the outbox");
                Vec::new()
            }
        };
        if due.is_empty() {
            let next = state
                .store
                .next_delivery_due(&webhook.id)
                .await
                .ok()
                .flatten();
            let wait = next.map_or(POLL, |at| {
                Duration::from_nanos(at.saturating_sub(now_nanos()).max(0) as u64).min(POLL)
            });
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        // Up to IN_FLIGHT at once; their outcomes recorded in one write.
        let attempts: Vec<(usize, AttemptRecord)> = {
            use futures_util::StreamExt;
            let (due, client, settings) = (&due, &client, &settings);
            futures_util::stream::iter(0..due.len())
                .map(move |i| async move { (i, client.attempt(&due[i], settings).await) })
                .buffer_unordered(IN_FLIGHT)
                .collect()
                .await
        };
        // The receiver, not one delivery, is failing: no answer, or a 5xx
        // or 429. (A 4xx for one delivery leaves the others going.)
        let mut receiver_failing = false;
        let mut outcomes = Vec::with_capacity(due.len());
        for (index, attempt) in attempts {
            let delivery = &due[index];
            let after = if attempt.error.is_none() {
                AfterAttempt::Delivered
            } else {
                receiver_failing |= attempt
                    .status
                    .is_none_or(|status| status >= 500 || status == 429);
                next_attempt(delivery, &settings, attempt.at)
            };
            let outcome = match after {
                AfterAttempt::Delivered => "delivered",
                AfterAttempt::RetryAt(_) => "retry",
                AfterAttempt::GiveUp => "failed",
            };
            state.metrics.webhook_attempt(outcome, attempt.duration_ms);
            match after {
                AfterAttempt::Delivered => tracing::debug!(
                    delivery = %delivery.id,
                    event_id = delivery.event_seq,
                    duration_ms = attempt.duration_ms,
                    "webhook delivered"
                ),
                AfterAttempt::RetryAt(at) => tracing::info!(
                    delivery = %delivery.id,
                    event_id = delivery.event_seq,
                    attempt = delivery.attempts + 1,
                    status = attempt.status,
                    error = attempt.error.as_deref().unwrap_or(""),
                    retry_at = %format_utc(at),
                    "webhook delivery failed; it will be retried"
                ),
                AfterAttempt::GiveUp => tracing::warn!(
                    delivery = %delivery.id,
                    event_id = delivery.event_seq,
                    attempts = delivery.attempts + 1,
                    error = attempt.error.as_deref().unwrap_or(""),
                    "webhook delivery given up: its retry window is over"
                ),
            }
            outcomes.push((delivery.seq, attempt, after));
        }
        // One write for the round's attempts. If it fails (a full disk, say)
        // the deliveries stay due: back off rather than send them again at
        // once.
        if let Err(e) = state.store.record_attempts(outcomes).await {
            tracing::warn!(error = %e, "webhooks: cannot record delivery attempts");
            receiver_failing = true;
        }
        if receiver_failing {
            failing = failing.saturating_add(1);
            tokio::time::sleep(backoff(settings.retry_base, failing)).await;
        } else {
            failing = 0;
        }
    }
}

/// The wait after the `n`th failure in a row (from 1): `base` doubled
/// `n - 1` times, at most [`MAX_BACKOFF`], then jittered to between half and
/// all of it so that receivers coming back aren't hit by every sender at
/// once.
pub fn backoff(base: Duration, n: u32) -> Duration {
    let full = base
        .saturating_mul(1u32 << n.saturating_sub(1).min(20))
        .min(MAX_BACKOFF);
    let mut random = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut random);
    let fraction = f64::from(u32::from_le_bytes(random)) / f64::from(u32::MAX);
    full.mul_f64(0.5 + fraction / 2.0)
}

/// What follows a failed attempt of `delivery` made at `at`: a retry after
/// its backoff, unless that falls past its retry window.
fn next_attempt(delivery: &DeliveryRecord, settings: &Settings, at: i64) -> AfterAttempt {
    let attempts = u32::try_from(delivery.attempts + 1).unwrap_or(u32::MAX);
    let retry_at = at.saturating_add(nanos(backoff(settings.retry_base, attempts)));
    if retry_at
        > delivery
            .created_at
            .saturating_add(nanos(settings.retry_for))
    {
        AfterAttempt::GiveUp
    } else {
        AfterAttempt::RetryAt(retry_at)
    }
}

/// Where a webhook's deliveries go, and the connections kept open to it.
struct Client {
    host: String,
    port: u16,
    /// The `Host` header.
    authority: String,
    path: String,
    /// `Err`: why the receiver can't be trusted (every attempt says it).
    tls: Result<Arc<rustls::ClientConfig>, String>,
    secret: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl Client {
    fn new(webhook: &WebhookRecord) -> Client {
        let uri: axum::http::Uri = webhook.url.parse().unwrap_or_default();
        let (host, port) = match crate::urls::parse(&webhook.url) {
            Ok(parts) => (parts.host, parts.port),
            Err(_) => (String::new(), 443),
        };
        Client {
            host,
            port,
            authority: uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default(),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            tls: tls_config(webhook.ca_pem.as_deref()),
            secret: webhook.secret.clone(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// One attempt of `delivery`, within the attempt deadline.
    async fn attempt(&self, delivery: &DeliveryRecord, settings: &Settings) -> AttemptRecord {
        let at = now_nanos();
        let started = Instant::now();
        let outcome = tokio::time::timeout(settings.attempt_timeout, self.post(delivery)).await;
        let (status, error) = match outcome {
            Ok(Ok(status)) if status.is_success() => (Some(status.as_u16()), None),
            Ok(Ok(status)) => (
                Some(status.as_u16()),
                Some(format!("the receiver answered {status}")),
            ),
            Ok(Err(e)) => (None, Some(shorten_error(e))),
            Err(_) => (
                None,
                Some(format!(
                    "no answer within {} s",
                    settings.attempt_timeout.as_secs_f64()
                )),
            ),
        };
        AttemptRecord {
            at,
            status: status.map(i64::from),
            error,
            duration_ms: started.elapsed().as_millis().min(i64::MAX as u128) as i64,
        }
    }

    async fn post(&self, delivery: &DeliveryRecord) -> Result<StatusCode, String> {
        if let Some(sender) = self.idle_connection() {
            match self.post_on(sender, delivery).await {
                Ok(status) => return Ok(status),
                // The receiver may have closed the kept-alive connection
                // just as it was taken: once more, on a new one.
                Err(e) => tracing::debug!(error = %e, "webhook: a kept-alive connection failed"),
            }
        }
        let sender = self.connect().await?;
        self.post_on(sender, delivery).await
    }

    async fn post_on(
        &self,
        mut sender: SendRequest<Full<Bytes>>,
        delivery: &DeliveryRecord,
    ) -> Result<StatusCode, String> {
        let timestamp = now_nanos() / 1_000_000_000;
        let body = Bytes::from(delivery.body.clone());
        let request = http::Request::post(self.path.as_str())
            .header(http::header::HOST, self.authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("Cordon-Webhooks/", env!("CARGO_PKG_VERSION")),
            )
            .header("webhook-id", delivery.id.as_str())
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature(&self.secret, &delivery.id, timestamp, &body),
            )
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("the request failed: {e}"))?;
        let status = response.status();
        // The answer is read (up to a bound) so the connection can carry
        // the next delivery; a longer one closes the connection.
        if Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .is_ok()
            && sender.is_ready()
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < IN_FLIGHT {
                idle.push(sender);
            }
        }
        Ok(status)
    }

    fn idle_connection(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(sender) = idle.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tls = self.tls.clone()?;
        if self.host.is_empty() {
            return Err("the URL has no usable host".into());
        }
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {} failed: {e}", self.host))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

/// An error as recorded and logged: at most [`MAX_ERROR`] characters (a
/// TLS error names every name of the receiver's certificate).
fn shorten_error(mut error: String) -> String {
    if let Some((cut, _)) = error.char_indices().nth(MAX_ERROR) {
        error.truncate(cut);
        error.push('…');
    }
    error
}

/// The TLS settings for a receiver: its own CA certificates, or the
/// system's roots.
fn tls_config(ca_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = match ca_pem {
        Some(pem) => roots_from_pem(pem)?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            if let Ok(certs) = CertificateDer::pem_file_iter(SYSTEM_ROOTS) {
                roots.add_parsable_certificates(certs.filter_map(Result::ok));
            }
            roots
        }
    };
    if roots.is_empty() {
        return Err(format!(
            "no CA certificate to check the receiver with: {SYSTEM_ROOTS} is missing and the webhook has no CA certificate"
        ));
    }
    let crypto = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(crypto)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Gives up the deliveries past their retry window that were never tried
/// (held back while their receiver failed), then removes finished
/// deliveries older than [`HISTORY`], in bounded batches; the number
/// removed.
pub async fn prune(store: &Store, settings: &Settings) -> Result<u64, StoreError> {
    const BATCH: usize = store::DELETE_BATCH;
    let now = now_nanos();
    let mut expired = 0;
    loop {
        let batch = store
            .expire_deliveries(now.saturating_sub(nanos(settings.retry_for)), now)
            .await?;
        expired += batch;
        if batch < BATCH as u64 {
            break;
        }
        tokio::task::yield_now().await;
    }
    if expired > 0 {
        tracing::warn!(
            expired,
            "webhook deliveries given up: their receiver failed throughout the retry window"
        );
    }
    let before = now.saturating_sub(nanos(HISTORY));
    let mut removed = 0;
    loop {
        let batch = store.prune_deliveries(before, BATCH).await?;
        removed += batch;
        if batch < BATCH as u64 {
            return Ok(removed);
        }
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks reference example: its secret, id, timestamp
    /// and payload give its signature.
    #[test]
    fn signs_as_the_standard_webhooks_reference_does() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_are_whsec_and_24_to_64_bytes() {
        let secret = new_secret();
        assert!(secret.starts_with(SECRET_PREFIX));
        assert_eq!(check_secret(&secret).as_deref(), Ok(secret.as_str()));
        assert!(check_secret("hunter2").is_err());
        assert!(check_secret("whsec_not base64!").is_err());
        assert!(check_secret(&format!("whsec_{}", STANDARD.encode([1u8; 16]))).is_err());
        assert!(check_secret(&format!("whsec_{}", STANDARD.encode([1u8; 65]))).is_err());
    }

    #[test]
    fn a_webhook_names_known_events_and_an_https_url() {
        let input = |url: &str, events: &[&str]| WebhookInput {
            url: url.into(),
            events: events.iter().map(|e| (*e).to_owned()).collect(),
            ..Default::default()
        };
        let made = new_webhook(
            input(
                "https://soar.example.com:8443/hooks/cordon?x=1",
                &[
                    "machineAction.completed,machine.isolationChanged",
                    "MACHINEACTION.COMPLETED",
                ],
            ),
            "me".into(),
        )
        .unwrap();
        assert_eq!(
            made.events,
            ["machineAction.completed", "machine.isolationChanged"]
        );
        assert!(made.secret.starts_with(SECRET_PREFIX));
        for (url, events, says) in [
            (
                "http://soar.example.com/",
                &["machineAction.created"][..],
                "https",
            ),
            ("https://a@b/", &["machineAction.created"][..], "user info"),
            (
                "https://soar/",
                &["machineAction.deleted"][..],
                "not an event type",
            ),
            ("https://soar/", &[" , "][..], "names no event type"),
            ("not a url", &["machineAction.created"][..], "Url"),
        ] {
            let error = new_webhook(input(url, events), "me".into()).unwrap_err();
            assert!(error.contains(says), "{url} {events:?}: {error}");
        }
        let bad_ca = WebhookInput {
            ca_pem: Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into()),
            ..input("https://soar/", &["machineAction.created"])
        };
        assert!(new_webhook(bad_ca, "me".into()).is_err());
        let no_ca = WebhookInput {
            ca_pem: Some("just text".into()),
            ..input("https://soar/", &["machineAction.created"])
        };
        assert!(
            new_webhook(no_ca, "me".into())
                .unwrap_err()
                .contains("no PEM certificate")
        );
    }

    #[test]
    fn backoff_doubles_up_to_an_hour_with_jitter() {
        let base = Duration::from_secs(1);
        for n in 1..=5 {
            let full = Duration::from_secs(1 << (n - 1));
            let wait = backoff(base, n);
            assert!(wait >= full / 2 && wait <= full, "{n}: {wait:?}");
        }
        assert!(backoff(base, 40) <= MAX_BACKOFF);
        assert!(backoff(base, 40) >= MAX_BACKOFF / 2);
    }

    #[test]
    fn a_delivery_is_given_up_past_its_retry_window() {
        let settings = Settings::default();
        let delivery = DeliveryRecord {
            seq: 1,
            id: "msg_1".into(),
            webhook_id: "w".into(),
            event_seq: 1,
            event_type: store::ACTION_CREATED.into(),
            body: "{}".into(),
            created_at: 0,
            state: "pending".into(),
            attempts: 3,
            next_attempt_at: Some(0),
            last_attempt_at: None,
            last_status: None,
            last_error: None,
            delivered_at: None,
        };
        assert!(matches!(
            next_attempt(&delivery, &settings, nanos(Duration::from_secs(60))),
            AfterAttempt::RetryAt(_)
        ));
        assert_eq!(
            next_attempt(&delivery, &settings, nanos(Duration::from_secs(24 * 3600))),
            AfterAttempt::GiveUp
        );
    }
}
