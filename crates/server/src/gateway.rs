//! The agent gateway: enrollment, and one long-lived session per agent over
//! which actions are pushed the moment they are created.
//!
//! A session is an HTTP/1.1 upgrade of `GET /agent/v1/session` on the API's
//! port, then one JSON message per line each way (`proto::agent`). The
//! agent proves it holds the key it enrolled with by signing the server's
//! nonce together with the TLS exporter value of this very connection.
//! Everything an agent sends is checked against its own machine id, so an
//! agent can never read or change another machine's actions.
//!
//! Every session gets the isolation exclusion rules right after `welcome`,
//! and again whenever their version changes ([`Gateway::push_exclusions`]);
//! the agent reports which version it runs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper_util::rt::TokioIo;
use proto::agent::{
    ActionOrder, AgentError, AgentMessage, Enforced, EnrollRequest, EnrollResponse, HostFacts,
    MAX_LINE, SESSION_PATH, SESSION_PROTOCOL, ServerMessage,
};
use store::{ActionRecord, Address, Facts, Outcome, StoreError};
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::{AppState, ConnInfo, crypto};

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(proto::agent::ENROLL_PATH, post(enroll))
        .route(SESSION_PATH, get(session))
        .route(proto::agent::HEALTH_PATH, get(health))
}

/// What an agent fetches over a fresh connection to prove that its
/// management channel works through newly applied rules.
async fn health() -> Response {
    (StatusCode::OK, "ok").into_response()
}

/// What is sent to a session's task. Kept small: a session's channel
/// allocates room for a block of these when it is made, and a fleet holds
/// one channel a session.
enum Outbound {
    Message(Box<ServerMessage>),
    /// An `exclusions` message, serialized once for every session.
    Exclusions {
        version: i64,
        line: Arc<Vec<u8>>,
    },
    Close {
        code: &'static str,
        reason: &'static str,
    },
}

/// The read buffer of a session: the agent sends short lines (a hello of
/// about 1 KiB at most with its addresses, then heartbeats, acks and
/// results of a few hundred bytes); a longer one is read in parts. A fleet
/// holds one per session, so it is small.
const SESSION_READ_BUFFER: usize = 1024;
/// A session's line buffer shrinks back to this after a longer message.
const SESSION_LINE_KEPT: usize = 1024;

struct SessionHandle {
    conn_id: u64,
    sender: mpsc::UnboundedSender<Outbound>,
}

/// Live sessions and liveness not yet written to the store.
#[derive(Default)]
pub struct Gateway {
    sessions: Mutex<HashMap<String, SessionHandle>>,
    /// The number of live sessions, for the metrics.
    live: prometheus_client::metrics::gauge::Gauge,
    seen: Mutex<HashMap<String, i64>>,
    flushed_seen: Mutex<HashMap<String, i64>>,
    next_conn_id: AtomicU64,
    /// The newest exclusion rule-set version pushed to the sessions.
    exclusions_pushed: Mutex<i64>,
}

impl Gateway {
    /// A gateway that keeps `live` at its number of sessions.
    pub fn new(live: prometheus_client::metrics::gauge::Gauge) -> Gateway {
        Gateway {
            live,
            ..Gateway::default()
        }
    }

    /// Sends a new action to its machine's live session, if there is one.
    /// Delivery is at-least-once: a session that opens later gets every
    /// undelivered action from the store.
    pub fn push(&self, action: &ActionRecord) {
        let sessions = self.sessions.lock().expect("sessions lock");
        if let Some(session) = sessions.get(&action.machine_id) {
            let _ = session
                .sender
                .send(Outbound::Message(Box::new(ServerMessage::Action(order(
                    action,
                )))));
        }
    }

    /// Sends an exclusion rule set to every live session, unless one as new
    /// was pushed already (so racing pushers never send an older set last).
    /// A session opened later reads the set itself after `welcome`.
    pub fn push_exclusions(&self, set: &store::ExclusionRuleSet) {
        let mut pushed = self.exclusions_pushed.lock().expect("exclusions lock");
        if set.version <= *pushed {
            return;
        }
        *pushed = set.version;
        let line = Arc::new(message_line(&crate::exclusions::message(set)));
        let sessions = self.sessions.lock().expect("sessions lock");
        tracing::info!(
            version = set.version,
            rules = set.rules.len(),
            sessions = sessions.len(),
            "pushing exclusion rules"
        );
        for session in sessions.values() {
            let _ = session.sender.send(Outbound::Exclusions {
                version: set.version,
                line: line.clone(),
            });
        }
    }

    /// The newest exclusion rule-set version pushed to the sessions.
    pub fn exclusions_pushed(&self) -> i64 {
        *self.exclusions_pushed.lock().expect("exclusions lock")
    }

    pub fn is_connected(&self, machine_id: &str) -> bool {
        self.sessions
            .lock()
            .expect("sessions lock")
            .contains_key(machine_id)
    }

    /// When the machine was last heard from, if newer than the store knows.
    pub fn last_seen(&self, machine_id: &str) -> Option<i64> {
        let pending = self
            .seen
            .lock()
            .expect("seen lock")
            .get(machine_id)
            .copied();
        let flushed = self
            .flushed_seen
            .lock()
            .expect("seen lock")
            .get(machine_id)
            .copied();
        pending.max(flushed)
    }

    fn register(&self, machine_id: &str) -> (u64, mpsc::UnboundedReceiver<Outbound>) {
        let conn_id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::unbounded_channel();
        let previous = {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            let previous =
                sessions.insert(machine_id.to_owned(), SessionHandle { conn_id, sender });
            self.live.set(sessions.len() as i64);
            previous
        };
        if let Some(previous) = previous {
            let _ = previous.sender.send(Outbound::Close {
                code: "Replaced",
                reason: "a newer session of this machine replaced this one",
            });
        }
        (conn_id, receiver)
    }

    fn unregister(&self, machine_id: &str, conn_id: u64) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if sessions
            .get(machine_id)
            .is_some_and(|s| s.conn_id == conn_id)
        {
            sessions.remove(machine_id);
            self.live.set(sessions.len() as i64);
        }
    }

    fn touch(&self, machine_id: &str) {
        self.seen
            .lock()
            .expect("seen lock")
            .insert(machine_id.to_owned(), crate::now_nanos());
    }

    /// Writes liveness to the store in one batch, and closes sessions of
    /// machines revoked meanwhile.
    pub async fn flush(&self, store: &store::Store) {
        let batch: Vec<(String, i64)> = std::mem::take(&mut *self.seen.lock().expect("seen lock"))
            .into_iter()
            .collect();
        if !batch.is_empty() {
            {
                let mut flushed = self.flushed_seen.lock().expect("seen lock");
                for (id, at) in &batch {
                    flushed.insert(id.clone(), *at);
                }
            }
            if let Err(e) = store.touch_machines(batch).await {
                tracing::warn!(error = %e, "could not record heartbeats");
            }
            self.flushed_seen.lock().expect("seen lock").clear();
        }
    }

    pub async fn close_revoked(&self, store: &store::Store) {
        if self.sessions.lock().expect("sessions lock").is_empty() {
            return;
        }
        // The revoked machines (an index of them alone), matched against
        // the sessions here: as many ids as are revoked, however many
        // agents are connected.
        match store.revoked_machines().await {
            Ok(revoked) => {
                let sessions = self.sessions.lock().expect("sessions lock");
                for id in revoked {
                    if let Some(session) = sessions.get(&id) {
                        let _ = session.sender.send(Outbound::Close {
                            code: "Revoked",
                            reason: "this machine's enrollment was revoked",
                        });
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not check revocations"),
        }
    }
}

fn order(action: &ActionRecord) -> ActionOrder {
    ActionOrder {
        action_id: action.id.clone(),
        machine_id: action.machine_id.clone(),
        action_type: action.action_type.clone(),
        scope: action.scope.clone(),
        created: proto::time::format_utc(action.created_at),
    }
}

fn agent_error(status: StatusCode, code: &str, reason: impl Into<String>) -> Response {
    let reason = reason.into();
    tracing::info!(code, %reason, "agent request refused");
    (
        status,
        axum::Json(AgentError {
            code: code.to_owned(),
            reason,
        }),
    )
        .into_response()
}

/// An enrollment turned away for the work in progress: 503 with
/// `Retry-After` and `ServerBusy` (logged by the gate, rate-limited).
fn server_busy(busy: crate::admission::Busy) -> Response {
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(AgentError {
            code: proto::agent::SERVER_BUSY.to_owned(),
            reason: format!(
                "the server has as many enrollments in progress as it takes; \
                 try again in {} seconds",
                busy.retry_after
            ),
        }),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(busy.retry_after));
    response
}

fn enforced_scope(enforced: Enforced) -> Option<String> {
    match enforced {
        Enforced::NotIsolated => None,
        Enforced::Full => Some("Full".into()),
        Enforced::Selective => Some("Selective".into()),
    }
}

/// Host facts from an agent, checked before they are stored: anything out
/// of bounds refuses the whole report, naming the field, so nothing of it
/// is stored.
fn facts_from(facts: HostFacts) -> Result<Facts, String> {
    use proto::agent::{MAX_ADDRESSES, MAX_FACT_LENGTH};
    let text = |field: &str, value: Option<String>| -> Result<Option<String>, String> {
        match value {
            Some(v) if v.chars().count() > MAX_FACT_LENGTH => Err(format!(
                "{field} is longer than {MAX_FACT_LENGTH} characters"
            )),
            Some(v) if !crate::text::is_safe_to_show(&v) => Err(format!(
                "{field} contains control or invisible formatting characters \
                 (such as escapes, new lines, bidirectional overrides or zero-width spaces)"
            )),
            Some(v) if v.trim().is_empty() => Ok(None),
            other => Ok(other),
        }
    };
    let name = facts.computer_dns_name.trim().to_ascii_lowercase();
    let valid_name = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !valid_name {
        return Err("computerDnsName must be 1 to 255 letters, digits, '.', '-' or '_'".into());
    }
    if facts.addresses.len() > MAX_ADDRESSES {
        return Err(format!(
            "addresses lists {} addresses; at most {MAX_ADDRESSES} are accepted",
            facts.addresses.len()
        ));
    }
    let mut addresses = Vec::with_capacity(facts.addresses.len());
    for (i, a) in facts.addresses.into_iter().enumerate() {
        let ip: std::net::IpAddr = a.ip_address.parse().map_err(|_| {
            let shown: String = a.ip_address.chars().take(64).collect();
            format!("addresses[{i}].ipAddress '{shown}' is not an IPv4 or IPv6 address")
        })?;
        addresses.push(Address {
            ip_address: ip.to_string(),
            mac_address: text(&format!("addresses[{i}].macAddress"), a.mac_address)?,
            interface_type: text(&format!("addresses[{i}].interfaceType"), a.interface_type)?,
            operational_status: text(
                &format!("addresses[{i}].operationalStatus"),
                a.operational_status,
            )?,
        });
    }
    let last_ip_address = addresses.iter().map(|a| a.ip_address.clone()).find(|ip| {
        ip.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| !ip.is_loopback())
    });
    Ok(Facts {
        computer_dns_name: name,
        os_platform: text("osPlatform", facts.os_platform)?,
        os_version: text("osVersion", facts.os_version)?,
        os_processor: text("osProcessor", facts.os_processor)?,
        os_architecture: text("osArchitecture", facts.os_architecture)?,
        os_build: facts.os_build,
        agent_version: text("agentVersion", facts.agent_version)?,
        last_ip_address,
        last_external_ip_address: None,
        addresses,
    })
}

fn verify_signature(public_key: &[u8], message: &[u8], signature_b64: &str) -> bool {
    let Ok(signature) = STANDARD.decode(signature_b64) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, &signature)
        .is_ok()
}

/// Counts one enrollment attempt from `peer`, per source address and in
/// total; a refusal says how many seconds to wait.
fn admit_enrollment(state: &AppState, peer: Option<std::net::IpAddr>) -> Result<(), u64> {
    let source = peer.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    state.enroll_per_source.check(&source, "enroll")?;
    state.enroll_total.check("all", "enroll")
}

async fn enroll(
    State(state): State<Arc<AppState>>,
    conn: Option<axum::Extension<ConnInfo>>,
    body: Bytes,
) -> Response {
    if let Err(wait) = admit_enrollment(&state, conn.map(|c| c.0.peer.ip())) {
        let mut response = agent_error(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            format!("too many enrollment attempts; try again in {wait} seconds"),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait));
        return response;
    }
    let request: EnrollRequest = match crate::json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return agent_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestBody",
                format!("the enrollment request is not valid: {e}"),
            );
        }
    };
    let public_key = match STANDARD.decode(&request.public_key) {
        Ok(key) if key.len() == 32 => key,
        _ => {
            return agent_error(
                StatusCode::BAD_REQUEST,
                "InvalidPublicKey",
                "publicKey must be a base64 Ed25519 public key (32 bytes)",
            );
        }
    };
    let message = proto::agent::enroll_proof_message(&request.token, &request.public_key);
    if !verify_signature(&public_key, &message, &request.proof) {
        return agent_error(
            StatusCode::BAD_REQUEST,
            "InvalidProof",
            "the proof is not a signature of the enrollment by the given key",
        );
    }
    let facts = match facts_from(request.facts) {
        Ok(f) => f,
        Err(reason) => return agent_error(StatusCode::BAD_REQUEST, "InvalidFacts", reason),
    };
    // The store's write, at most so many at once; the rest wait their turn
    // or are asked to come back.
    let _place = match state.admission.enrollments.enter().await {
        Ok(place) => place,
        Err(busy) => return server_busy(busy),
    };
    let machine_id = crypto::new_machine_id();
    match state
        .store
        .enroll_machine(
            crypto::sha256_hex(request.token.as_bytes()),
            machine_id,
            public_key,
            facts,
            crate::now_nanos(),
        )
        .await
    {
        Ok(machine) => {
            tracing::info!(machine_id = %machine.id, name = %machine.facts.computer_dns_name, "machine enrolled");
            (
                StatusCode::OK,
                axum::Json(EnrollResponse {
                    machine_id: machine.id,
                }),
            )
                .into_response()
        }
        Err(StoreError::TokenRejected(reason)) => {
            agent_error(StatusCode::FORBIDDEN, "EnrollTokenRejected", reason)
        }
        Err(StoreError::KeyEnrolled(machine_id)) => agent_error(
            StatusCode::CONFLICT,
            "KeyAlreadyEnrolled",
            format!(
                "this public key is already enrolled as machine {machine_id}; \
                 a key enrolls once (make a new key to enroll again)"
            ),
        ),
        Err(e) => {
            tracing::error!(error = %e, "enrollment failed");
            agent_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "try again later",
            )
        }
    }
}

async fn session(State(state): State<Arc<AppState>>, mut request: Request) -> Response {
    let upgrade_ok = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(SESSION_PROTOCOL));
    if !upgrade_ok {
        return agent_error(
            StatusCode::BAD_REQUEST,
            "UpgradeRequired",
            format!("a session needs 'Upgrade: {SESSION_PROTOCOL}'"),
        );
    }
    let Some(exporter) = request
        .extensions()
        .get::<ConnInfo>()
        .and_then(|info| info.exporter.clone())
    else {
        return agent_error(StatusCode::BAD_REQUEST, "NoTls", "sessions need TLS");
    };
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return agent_error(
            StatusCode::BAD_REQUEST,
            "UpgradeFailed",
            "the connection can't be upgraded",
        );
    };
    let slot = request
        .extensions()
        .get::<crate::conns::ConnSlot>()
        .map(|s| s.0.clone());
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => run_session(state, TokioIo::new(upgraded), exporter, slot).await,
            Err(e) => tracing::info!(error = %e, "session upgrade failed"),
        }
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    response
        .headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(SESSION_PROTOCOL));
    response
}

/// Reads one line of at most [`MAX_LINE`] bytes; `Ok(None)` at end of stream.
async fn read_line<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<Option<()>> {
    line.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(None);
        }
        if let Some(end) = available.iter().position(|b| *b == b'\n') {
            line.extend_from_slice(&available[..end]);
            reader.consume(end + 1);
            return Ok(Some(()));
        }
        let taken = available.len();
        line.extend_from_slice(available);
        reader.consume(taken);
        if line.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "message too long",
            ));
        }
    }
}

fn message_line(message: &ServerMessage) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("server message serializes");
    line.push(b'\n');
    line
}

async fn send<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &ServerMessage,
) -> std::io::Result<()> {
    send_line(writer, &message_line(message)).await
}

async fn send_line<W: AsyncWrite + Unpin>(writer: &mut W, line: &[u8]) -> std::io::Result<()> {
    writer.write_all(line).await?;
    writer.flush().await
}

async fn refuse<W: AsyncWrite + Unpin>(writer: &mut W, code: &str, reason: &str) {
    tracing::info!(code, reason, "session refused");
    send_refusal(writer, code, reason, None).await;
}

async fn send_refusal<W: AsyncWrite + Unpin>(
    writer: &mut W,
    code: &str,
    reason: &str,
    retry_after_seconds: Option<u64>,
) {
    let _ = send(
        writer,
        &ServerMessage::Refused {
            code: code.into(),
            reason: reason.into(),
            retry_after_seconds,
        },
    )
    .await;
    let _ = writer.shutdown().await;
}

/// Refuses a session with `Unavailable` and a time to come back. Not
/// logged here: a crowd gets these, and the gate (or the caller) logs them
/// rate-limited.
async fn refuse_busy<W: AsyncWrite + Unpin>(
    writer: &mut W,
    reason: &str,
    busy: crate::admission::Busy,
) {
    let reason = format!("{reason}; try again in {} seconds", busy.retry_after);
    send_refusal(
        writer,
        proto::agent::UNAVAILABLE,
        &reason,
        Some(busy.retry_after),
    )
    .await;
}

/// How long a session's set-up (welcome, exclusion rules, pending actions)
/// may take to be written to the agent.
const SET_UP_DEADLINE: Duration = Duration::from_secs(10);

/// `slot` is the connection's place among the open connections: it moves
/// to the agents' share once the agent proved its key, and is held until
/// the session ends.
async fn run_session<IO>(
    state: Arc<AppState>,
    io: IO,
    exporter: String,
    slot: Option<Arc<crate::conns::Slot>>,
) where
    IO: tokio::io::AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (read_half, mut writer) = tokio::io::split(io);
    let mut reader = BufReader::with_capacity(SESSION_READ_BUFFER, read_half);
    let mut line = Vec::new();
    let nonce = STANDARD.encode(crypto::random_bytes::<32>());
    if send(
        &mut writer,
        &ServerMessage::Challenge {
            nonce: nonce.clone(),
        },
    )
    .await
    .is_err()
    {
        return;
    }
    let hello =
        tokio::time::timeout(Duration::from_secs(10), read_line(&mut reader, &mut line)).await;
    let hello = match hello {
        Ok(Ok(Some(()))) => crate::json::from_slice::<AgentMessage>(&line),
        _ => {
            return refuse(
                &mut writer,
                "ProtocolError",
                "expected hello within 10 seconds",
            )
            .await;
        }
    };
    // The hello's buffer is not needed again: the session reads into its own.
    drop(line);
    let Ok(AgentMessage::Hello {
        machine_id,
        proof,
        facts,
        enforced,
    }) = hello
    else {
        return refuse(
            &mut writer,
            "ProtocolError",
            "the first message must be a valid hello",
        )
        .await;
    };
    if !crypto::is_machine_id(&machine_id) {
        return refuse(
            &mut writer,
            "UnknownMachine",
            "machineId is not a machine id",
        )
        .await;
    }
    // From here to the pending actions sent, the set-up holds a place
    // among the few in progress; the rest wait their turn or are asked to
    // come back (the gate logs it, rate-limited).
    let setup = match state.admission.sessions.enter().await {
        Ok(place) => place,
        Err(busy) => {
            return refuse_busy(
                &mut writer,
                "the server has as many sessions being set up as it takes",
                busy,
            )
            .await;
        }
    };
    let machine = match state.store.get_machine(&machine_id).await {
        Ok(Some(m)) if m.id == machine_id => m,
        Ok(_) => {
            return refuse(
                &mut writer,
                "UnknownMachine",
                "this machine is not enrolled",
            )
            .await;
        }
        Err(e) => {
            tracing::error!(error = %e, "session: store error");
            let busy = state.admission.sessions.retry_hint();
            return refuse_busy(&mut writer, "the server cannot read its store", busy).await;
        }
    };
    let message = proto::agent::session_proof_message(&machine_id, &nonce, &exporter);
    if !verify_signature(&machine.public_key, &message, &proof) {
        return refuse(
            &mut writer,
            "InvalidProof",
            "the proof does not match the enrolled key",
        )
        .await;
    }
    if machine.revoked {
        return refuse(
            &mut writer,
            "Revoked",
            "this machine's enrollment was revoked",
        )
        .await;
    }
    if let Some(slot) = &slot
        && let Err(refusal) = slot.become_agent()
    {
        if let Some(suppressed) = state.connections.log.allow(refusal.as_str()) {
            tracing::warn!(%machine_id, reason = refusal.as_str(), suppressed, "session refused");
        }
        let busy = state.admission.sessions.retry_hint();
        return refuse_busy(
            &mut writer,
            "the server is at its cap of agent sessions",
            busy,
        )
        .await;
    }
    let span = tracing::info_span!("session", machine_id = %machine_id);
    let _ = tracing::Instrument::instrument(
        serve_session(
            state,
            machine_id,
            Reported {
                scope: machine.isolation_scope,
                exclusion_version: machine.exclusion_version,
                tamper_recorded: None,
                tamper_folded: 0,
                tamper_detail: String::new(),
                heartbeat_recorded: None,
                heartbeat_pending: None,
            },
            // A reconnecting agent usually reports what is stored: nothing
            // to write then (a fleet reconnecting after a restart would make
            // one durable write per agent for nothing).
            match facts_from(facts) {
                Ok(facts) if facts == machine.facts => None,
                reported => Some(reported),
            },
            enforced,
            reader,
            writer,
            setup,
        ),
        span,
    )
    .await;
}

/// What the store knows of a machine's enforced state, as last recorded by
/// this session; a report that differs is written to the store.
struct Reported {
    scope: Option<String>,
    exclusion_version: Option<i64>,
    /// When this session last recorded a tamper report, and the reports
    /// folded since (at most one a [`TAMPER_FOLD`] is written: each is a
    /// durable write, an event and a webhook delivery).
    tamper_recorded: Option<std::time::Instant>,
    tamper_folded: u32,
    /// The last report's words.
    tamper_detail: String,
    /// When a heartbeat last changed what the store records, and a change
    /// reported since that waits for [`HEARTBEAT_FOLD`] to pass.
    heartbeat_recorded: Option<std::time::Instant>,
    heartbeat_pending: Option<(Enforced, Option<i64>)>,
}

/// The shortest time between two changes of the enforced state (or the
/// exclusion version) a session's heartbeats write: an agent's state moves
/// with actions, not every few seconds, and each change is a durable write
/// and an event.
const HEARTBEAT_FOLD: Duration = Duration::from_secs(5);

/// The shortest time between two tamper reports of one session written to
/// the store; the ones between are folded into one record, written when the
/// time is up.
const TAMPER_FOLD: Duration = Duration::from_secs(5);

/// Messages a session may send in a burst, and a second on average after
/// it: far above what an agent sends (a heartbeat every few seconds, an
/// acknowledgement and a result per action), far below what would load the
/// store. Past it, the session is closed.
const MESSAGE_BURST: f64 = 50.0;
const MESSAGES_PER_SECOND: f64 = 10.0;

/// A session's message budget (a token bucket).
struct MessageBudget {
    tokens: f64,
    at: std::time::Instant,
}

impl MessageBudget {
    fn new() -> MessageBudget {
        MessageBudget {
            tokens: MESSAGE_BURST,
            at: std::time::Instant::now(),
        }
    }

    /// Takes one message's place; `false` when the budget is spent.
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * MESSAGES_PER_SECOND;
        self.tokens = (self.tokens + refill).min(MESSAGE_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Reported {
    /// Whether a heartbeat reports something other than what is recorded.
    fn heartbeat_changes(&self, enforced: Enforced, exclusion_version: Option<i64>) -> bool {
        let scope = enforced_scope(enforced);
        scope != self.scope
            || (scope.as_deref() == Some("Selective")
                && exclusion_version != self.exclusion_version)
    }

    /// Records what a heartbeat reports in force.
    async fn apply_heartbeat(
        &mut self,
        state: &AppState,
        machine_id: &str,
        enforced: Enforced,
        exclusion_version: Option<i64>,
        exclusions_sent: i64,
    ) {
        if self.heartbeat_changes(enforced, exclusion_version) {
            self.heartbeat_recorded = Some(std::time::Instant::now());
        }
        self.record_scope(state, machine_id, enforced_scope(enforced))
            .await;
        // Only Selective isolation runs exclusion rules (record_scope
        // cleared the version otherwise), and only a version it was sent.
        if self.scope.as_deref() == Some("Selective") {
            match exclusion_version {
                Some(v) if !exclusion_version_in_range(v, exclusions_sent) => {
                    tracing::warn!(
                        version = v,
                        newest = exclusions_sent,
                        "heartbeat names an exclusion rule-set version never sent; not recorded"
                    );
                }
                version => {
                    self.record_exclusion_version(state, machine_id, version)
                        .await
                }
            }
        }
    }

    /// When the folded heartbeat change is to be written, if there is one.
    fn heartbeat_due(&self) -> Option<tokio::time::Instant> {
        self.heartbeat_pending.map(|_| {
            self.heartbeat_recorded
                .map_or_else(tokio::time::Instant::now, |at| (at + HEARTBEAT_FOLD).into())
        })
    }

    /// When the folded tamper reports are to be written, if there are any.
    fn tamper_due(&self) -> Option<tokio::time::Instant> {
        (self.tamper_folded > 0).then(|| {
            self.tamper_recorded
                .map_or_else(tokio::time::Instant::now, |at| (at + TAMPER_FOLD).into())
        })
    }

    /// Writes the tamper reports received since the last write, as one.
    async fn flush_tamper(&mut self, state: &AppState, machine_id: &str) {
        let count = std::mem::take(&mut self.tamper_folded);
        if count == 0 {
            return;
        }
        self.tamper_recorded = Some(std::time::Instant::now());
        let detail = match count {
            1 => self.tamper_detail.clone(),
            n => format!(
                "{} ({n} reports in {} s)",
                self.tamper_detail,
                TAMPER_FOLD.as_secs()
            ),
        };
        if let Err(e) = state
            .store
            .record_tamper(machine_id, detail, i64::from(count), crate::now_nanos())
            .await
        {
            tracing::warn!(error = %e, "could not record a tamper report");
        }
    }

    async fn record_scope(&mut self, state: &AppState, machine_id: &str, scope: Option<String>) {
        if scope == self.scope {
            return;
        }
        self.scope = scope.clone();
        if let Err(e) = state.store.set_enforced(machine_id, scope).await {
            tracing::warn!(error = %e, "could not record the enforced state");
        }
        // Only Selective isolation runs exclusion rules.
        if self.scope.as_deref() != Some("Selective") {
            self.record_exclusion_version(state, machine_id, None).await;
        }
    }

    async fn record_exclusion_version(
        &mut self,
        state: &AppState,
        machine_id: &str,
        version: Option<i64>,
    ) {
        if version == self.exclusion_version {
            return;
        }
        self.exclusion_version = version;
        if let Err(e) = state.store.set_exclusion_version(machine_id, version).await {
            tracing::warn!(error = %e, "could not record the exclusion rule version");
        }
    }
}

/// `setup` is the session's place among the set-ups in progress, given
/// back once its pending actions are sent.
#[allow(clippy::too_many_arguments)]
async fn serve_session<R, W>(
    state: Arc<AppState>,
    machine_id: String,
    mut reported: Reported,
    facts: Option<Result<Facts, String>>,
    enforced: Enforced,
    mut reader: BufReader<R>,
    mut writer: W,
    setup: crate::admission::Place,
) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Boxed, like `handle` below: done once, not kept in an idle session.
    Box::pin(async {
        match facts {
            None => {}
            Some(Ok(facts)) => {
                if let Err(e) = state.store.update_facts(&machine_id, facts).await {
                    tracing::warn!(error = %e, "could not record host facts");
                }
            }
            Some(Err(reason)) => tracing::info!(%reason, "host facts ignored"),
        }
        reported
            .record_scope(&state, &machine_id, enforced_scope(enforced))
            .await;
        if reported.scope.as_deref() != Some("Selective") {
            reported
                .record_exclusion_version(&state, &machine_id, None)
                .await;
        }
    })
    .await;
    let (conn_id, mut outbound) = state.gateway.register(&machine_id);
    let registration = Registration {
        gateway: &state.gateway,
        machine_id: &machine_id,
        conn_id,
    };
    state.gateway.touch(&machine_id);
    tracing::info!("session opened");
    let result = async {
        // The set-up's writes have a deadline: an agent that reads nothing
        // can't keep its place among the set-ups in progress.
        let set_up = async {
            // Registered first, then read: a change committed after this
            // read is pushed to this session too. Read before `welcome`,
            // so that a store that can't answer is a refusal the agent
            // sees at its session's start, with its time to come back.
            let set = match state.store.exclusion_rule_set().await {
                Ok(set) => set,
                Err(e) => {
                    tracing::error!(error = %e, "session: cannot read the exclusion rules");
                    let busy = state.admission.sessions.retry_hint();
                    refuse_busy(&mut writer, "the server cannot read its store", busy).await;
                    return Ok(None);
                }
            };
            send(
                &mut writer,
                &ServerMessage::Welcome {
                    machine_id: machine_id.clone(),
                    heartbeat_seconds: state.config.heartbeat_interval.as_secs().max(1),
                },
            )
            .await?;
            send(&mut writer, &crate::exclusions::message(&set)).await?;
            for action in state.store.undelivered_actions(&machine_id).await.unwrap_or_default() {
                send(&mut writer, &ServerMessage::Action(order(&action))).await?;
            }
            std::io::Result::Ok(Some(set.version))
        };
        let mut exclusions_sent = match tokio::time::timeout(SET_UP_DEADLINE, set_up).await {
            Ok(Ok(Some(version))) => version,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                tracing::info!("session closed: its set-up was not read within the deadline");
                return Ok(());
            }
        };
        // Set up: the place goes to the next in line.
        drop(setup);
        let idle_limit = state.config.heartbeat_interval * 3 + Duration::from_secs(5);
        let mut line = Vec::new();
        let mut budget = MessageBudget::new();
        loop {
            // The earlier of the folded writes' times, if any waits.
            let folded_due = match (reported.tamper_due(), reported.heartbeat_due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                _ = tokio::time::sleep_until(folded_due.unwrap_or_else(tokio::time::Instant::now)), if folded_due.is_some() => {
                    let now = tokio::time::Instant::now();
                    if reported.tamper_due().is_some_and(|at| at <= now) {
                        reported.flush_tamper(&state, &machine_id).await;
                    }
                    if reported.heartbeat_due().is_some_and(|at| at <= now)
                        && let Some((enforced, version)) = reported.heartbeat_pending.take()
                    {
                        reported
                            .apply_heartbeat(&state, &machine_id, enforced, version, exclusions_sent)
                            .await;
                    }
                }
                read = tokio::time::timeout(idle_limit, read_line(&mut reader, &mut line)) => {
                    match read {
                        Err(_) => {
                            refuse(&mut writer, "Timeout", "no message within three heartbeat intervals").await;
                            return Ok(());
                        }
                        Ok(Ok(None)) => return Ok(()),
                        Ok(Err(e)) => {
                            refuse(&mut writer, "ProtocolError", &e.to_string()).await;
                            return Ok(());
                        }
                        Ok(Ok(Some(()))) => {}
                    }
                    state.gateway.touch(&machine_id);
                    if !budget.take() {
                        tracing::warn!("agent sends messages faster than any agent does; closing the session");
                        refuse(&mut writer, "ProtocolError", "too many messages: at most 10 a second on average").await;
                        return Ok(());
                    }
                    let parsed = crate::json::from_slice::<AgentMessage>(&line);
                    line.clear();
                    if line.capacity() > SESSION_LINE_KEPT {
                        line.shrink_to(SESSION_LINE_KEPT);
                    }
                    let message = match parsed {
                        Ok(m) => m,
                        Err(e) => {
                            refuse(&mut writer, "ProtocolError", &format!("invalid message: {e}")).await;
                            return Ok(());
                        }
                    };
                    // Boxed: the store calls' state lives only while a
                    // message is handled, not in every idle session.
                    match Box::pin(handle(&state, &machine_id, &mut reported, exclusions_sent, message)).await {
                        Ok(Some(reply)) => send(&mut writer, &reply).await?,
                        Ok(None) => {}
                        Err(violation) => {
                            tracing::warn!(%violation, "agent protocol violation; closing the session");
                            refuse(&mut writer, "ProtocolError", &violation).await;
                            return Ok(());
                        }
                    }
                }
                out = outbound.recv() => match out {
                    Some(Outbound::Message(message)) => send(&mut writer, &message).await?,
                    Some(Outbound::Exclusions { version, line }) => {
                        if version > exclusions_sent {
                            exclusions_sent = version;
                            send_line(&mut writer, &line).await?;
                        }
                    }
                    Some(Outbound::Close { code, reason }) => {
                        refuse(&mut writer, code, reason).await;
                        return Ok(());
                    }
                    None => return Ok(()),
                },
            }
        }
    }
    .await;
    drop(registration);
    tracing::info!("session closed");
    result
}

/// A session among the live ones, taken out when dropped: at the session's
/// end, and also when its task panics or is dropped, so neither the map of
/// sessions nor the sessions gauge keeps it.
struct Registration<'a> {
    gateway: &'a Gateway,
    machine_id: &'a str,
    conn_id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.gateway.unregister(self.machine_id, self.conn_id);
    }
}

/// Whether an exclusion rule-set version an agent reports is one it can run:
/// from 0 to the newest this session sent it.
fn exclusion_version_in_range(version: i64, sent: i64) -> bool {
    (0..=sent).contains(&version)
}

/// Handles one message of an established session: `Ok` with the answer, if
/// any, or `Err` with a protocol violation, which closes the session.
async fn handle(
    state: &AppState,
    machine_id: &str,
    reported: &mut Reported,
    exclusions_sent: i64,
    message: AgentMessage,
) -> Result<Option<ServerMessage>, String> {
    let now = crate::now_nanos();
    Ok(match message {
        AgentMessage::Hello { .. } => None,
        AgentMessage::Heartbeat {
            enforced,
            exclusion_version,
        } => {
            // A change a heartbeat reports is written at most once a
            // HEARTBEAT_FOLD; one within it waits (the latest wins) for the
            // session's timer.
            let folding = reported
                .heartbeat_recorded
                .is_some_and(|at| at.elapsed() < HEARTBEAT_FOLD);
            if folding && reported.heartbeat_changes(enforced, exclusion_version) {
                reported.heartbeat_pending = Some((enforced, exclusion_version));
            } else {
                reported.heartbeat_pending = None;
                reported
                    .apply_heartbeat(
                        state,
                        machine_id,
                        enforced,
                        exclusion_version,
                        exclusions_sent,
                    )
                    .await;
            }
            None
        }
        AgentMessage::ExclusionsApplied {
            version,
            succeeded,
            reason,
        } => {
            if succeeded && !exclusion_version_in_range(version, exclusions_sent) {
                tracing::warn!(
                    version,
                    newest = exclusions_sent,
                    "agent applied an exclusion rule-set version never sent; not recorded"
                );
            } else if succeeded {
                tracing::info!(version, "agent applied the exclusion rules");
                if reported.scope.as_deref() == Some("Selective") {
                    reported
                        .record_exclusion_version(state, machine_id, Some(version))
                        .await;
                }
            } else {
                let reason: String = reason
                    .unwrap_or_default()
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(1000)
                    .collect();
                tracing::warn!(version, %reason, "agent could not apply the exclusion rules");
            }
            None
        }
        AgentMessage::Facts(facts) => {
            match facts_from(facts) {
                Ok(facts) => {
                    if let Err(e) = state.store.update_facts(machine_id, facts).await {
                        tracing::warn!(error = %e, "could not record host facts");
                    }
                }
                Err(reason) => tracing::info!(%reason, "host facts ignored"),
            }
            None
        }
        AgentMessage::Ack { action_id } => {
            match state.store.start_action(machine_id, &action_id, now).await {
                // The store's observer logs the change (monitoring.rs).
                Ok(action) if action.status == "InProgress" => {
                    Some(ServerMessage::Proceed { action_id })
                }
                Ok(action) => Some(ServerMessage::Withdrawn {
                    action_id,
                    status: action.status,
                }),
                Err(StoreError::NotFound) => {
                    tracing::warn!(%action_id, "agent acknowledged an action that is not its own");
                    Some(ServerMessage::Withdrawn {
                        action_id,
                        status: "NotFound".into(),
                    })
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not start an action");
                    None
                }
            }
        }
        AgentMessage::Tamper { detail, restored } => {
            let detail: String = detail
                .chars()
                .filter(|c| !c.is_control())
                .take(500)
                .collect();
            let due = reported
                .tamper_recorded
                .is_none_or(|at| at.elapsed() >= TAMPER_FOLD);
            reported.tamper_detail = detail;
            reported.tamper_folded = reported.tamper_folded.saturating_add(1);
            if due {
                tracing::warn!(detail = %reported.tamper_detail, restored, "agent reports its isolation rules were tampered with");
                reported.flush_tamper(state, machine_id).await;
            }
            None
        }
        AgentMessage::Result {
            action_id,
            succeeded,
            error_h_result,
            reason,
            enforced,
        } => {
            let enforced = enforced_scope(enforced);
            let outcome = Outcome {
                succeeded,
                error_hresult: error_h_result,
                reason: reason.map(|r| r.chars().take(1000).collect()),
                enforced_scope: enforced.clone(),
            };
            match state
                .store
                .finish_action(machine_id, &action_id, outcome, now)
                .await
            {
                // The store's observer logs the change (monitoring.rs).
                Ok(_) => {
                    // finish_action recorded the scope itself.
                    reported.scope = enforced.clone();
                    if enforced.as_deref() != Some("Selective") {
                        reported
                            .record_exclusion_version(state, machine_id, None)
                            .await;
                    }
                }
                Err(StoreError::NotFound) => {
                    tracing::warn!(%action_id, "agent reported an action that is not its own");
                }
                Err(StoreError::WrongStatus(status)) => {
                    return Err(format!(
                        "a result for action {action_id}, which is {status}: results are \
                         accepted only for actions the server sent proceed for"
                    ));
                }
                Err(e) => tracing::error!(error = %e, "could not record an action's outcome"),
            }
            None
        }
    })
}
