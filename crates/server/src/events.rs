//! The event stream: `GET /api/events`, a server-sent-events stream of
//! what changes (machine actions, machines' isolation, exclusion rules, the
//! audit trail), and `GET /api/me`, who the caller is and what it may do.
//! Both are Cordon extensions (docs/api-extensions.md).
//!
//! Where events come from: the store's event log (`events`, migration 9).
//! Each change writes its event in its own transaction, its body rendered
//! then by this module's [`Renderer`] (the Standard Webhooks payload
//! `{"type","timestamp","data"}`, the entity as the API renders it at that
//! moment). One task ([`run`]) reads the log in order as it grows (woken by
//! the store's observer after each commit that wrote events, and every
//! [`POLL`] for other processes' writes) and publishes each event on the
//! [`Hub`], a broadcast channel to the open streams.
//!
//! Event ids are the log's sequence numbers: plain increasing integers,
//! the same across restarts. A stream opened with `Last-Event-ID` first
//! replays from the log, in pages, what followed that id and its caller
//! may see, then goes on live, skipping what it replayed. An id that is
//! not a number, in the future, whose next event is older than
//! `--event-retention` or already pruned, or more than
//! `Config::event_replay_max` events behind is answered with `resync`
//! (refetch, then follow).
//!
//! Every stream holds a slot (at most `--max-event-streams` in all and
//! `--max-event-streams-per-caller` per caller), sees only the events its
//! caller may see, re-checks its caller's access every minute, ends
//! when its token expires or its connection reaches its lifetime, and
//! sends `: keep-alive` comments so that an idle stream is never cut.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use proto::api::{Caller, CallerPermissions, EventPayload, ExclusionRuleChange, MachineGroupRef};
use store::{EventAudience, EventSubject};
use tokio::sync::broadcast;

use crate::auth::{Permission, Principal};
use crate::error::{ApiError, json_response};
use crate::{AppState, conns};

/// Events a stream may fall behind live before it catches up from the log.
const HUB_CAPACITY: usize = 1024;
/// Events the hub's task reads from the log at a time.
const PAGE: usize = 256;
/// Events a replay reads from the log at a time.
const REPLAY_PAGE: usize = 256;
/// How often the hub's task looks for events other processes wrote.
const POLL: Duration = Duration::from_secs(1);
/// Events a `Last-Event-ID` may be behind, by default: further behind, the
/// stream gets `resync` instead of a replay.
pub const REPLAY_MAX: usize = 10_000;
/// How long events are kept in the log, by default (`--event-retention`).
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How often a stream re-checks its caller's access (role, groups, the
/// user or application still there), by default.
pub const RECHECK: Duration = Duration::from_secs(60);
/// The longest gap between keep-alive comments.
const KEEP_ALIVE_MAX: Duration = Duration::from_secs(15);
/// Longest `Last-Event-ID` read; a longer one is unknown.
const MAX_EVENT_ID: usize = 64;
/// Seconds a caller over a stream limit is asked to wait.
const RETRY_AFTER_FULL: u64 = 10;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/me", get(me))
        .route("/events", get(stream))
}

// ---- GET /api/me ------------------------------------------------------------

/// `GET /api/me`: who the caller is and what it may do. Any valid token.
async fn me(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> Result<Response, ApiError> {
    let allowed = |p| principal.require(p).is_ok();
    let permissions = CallerPermissions {
        read: allowed(Permission::Read),
        isolate: allowed(Permission::Isolate),
        settings: allowed(Permission::Settings),
        audit: principal.require_audit_trail().is_ok(),
    };
    let reach = principal.machine_groups();
    let groups = state.store.list_groups().await?;
    // The default group first, then the others by name.
    let mut all: Vec<MachineGroupRef> = groups
        .iter()
        .map(|g| MachineGroupRef {
            id: g.id,
            name: g.name.clone(),
        })
        .collect();
    all.sort_by_key(|g| g.name.to_lowercase());
    all.insert(
        0,
        MachineGroupRef {
            id: store::DEFAULT_GROUP_ID,
            name: store::DEFAULT_GROUP_NAME.to_owned(),
        },
    );
    let reached = |g: &&MachineGroupRef| reach.as_ref().is_none_or(|ids| ids.contains(&g.id));
    // The caller's own groups by name; every group it sees, for a filter,
    // only to a caller who may read machines.
    let machine_groups = reach
        .as_ref()
        .map(|_| all.iter().filter(reached).cloned().collect());
    let visible = if permissions.read {
        all.iter().filter(reached).cloned().collect()
    } else {
        Vec::new()
    };
    let user = principal.user.as_ref();
    let body = Caller {
        id: principal.id.clone(),
        display_name: principal.name.clone(),
        kind: if user.is_some() {
            "user"
        } else {
            "application"
        }
        .to_owned(),
        upn: user.map(|_| principal.display_name.clone()),
        role: user.and_then(|u| u.role.as_ref()).map(|r| r.name.clone()),
        permissions,
        machine_groups,
        visible_machine_groups: visible,
    };
    let mut response = json_response(
        StatusCode::OK,
        serde_json::to_vec(&body).map_err(ApiError::internal)?,
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

// ---- the hub ----------------------------------------------------------------

/// One event of the log, as the streams send it.
#[derive(Debug)]
pub struct Event {
    /// Its durable id (`events.seq`).
    pub seq: i64,
    /// The SSE `event:` field.
    pub kind: String,
    pub audience: EventAudience,
    /// The SSE `data:` line.
    pub body: String,
}

impl From<store::StoredEvent> for Event {
    fn from(e: store::StoredEvent) -> Event {
        Event {
            seq: e.seq,
            kind: e.event_type,
            audience: e.audience,
            body: e.body,
        }
    }
}

/// The limits on streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Streams open at once, in all.
    pub total: usize,
    /// Streams open at once by one caller (principal id).
    pub per_caller: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            total: 1024,
            per_caller: 8,
        }
    }
}

#[derive(Default)]
struct Open {
    total: usize,
    per_caller: HashMap<String, usize>,
}

/// Publishes the log's events to the open streams as they are written.
pub struct Hub {
    /// The id of the last event published.
    position: Mutex<i64>,
    sender: broadcast::Sender<Arc<Event>>,
    open: Mutex<Open>,
    limits: Limits,
    metrics: Arc<crate::monitoring::Metrics>,
}

impl Hub {
    /// A hub whose last published event is `position` (the log's last
    /// event when the server starts).
    pub fn new(limits: Limits, metrics: Arc<crate::monitoring::Metrics>, position: i64) -> Hub {
        let (sender, _) = broadcast::channel(HUB_CAPACITY);
        Hub {
            position: Mutex::new(position),
            sender,
            open: Mutex::new(Open::default()),
            limits,
            metrics,
        }
    }

    /// The id of the last event published.
    pub fn position(&self) -> i64 {
        *self.position.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the next event of the log (one at or before the position
    /// is ignored).
    fn publish(&self, event: Arc<Event>) {
        let mut position = self.position.lock().unwrap_or_else(|p| p.into_inner());
        if event.seq <= *position {
            return;
        }
        *position = event.seq;
        // Sent under the lock: streams subscribe under it too, so each one
        // gets every event after the position it subscribed at.
        let _ = self.sender.send(event);
        drop(position);
        self.metrics.events_published.inc();
    }

    /// Subscribes: every event after the returned position comes through
    /// the receiver (unless it falls behind).
    fn subscribe(&self) -> (broadcast::Receiver<Arc<Event>>, i64) {
        let position = self.position.lock().unwrap_or_else(|p| p.into_inner());
        (self.sender.subscribe(), *position)
    }

    /// Takes a stream slot for `caller`, or refuses with 429.
    fn open(self: &Arc<Self>, caller: &str) -> Result<StreamSlot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = open.per_caller.get(caller).copied().unwrap_or(0);
        let refusal = if open.total >= self.limits.total {
            Some(format!(
                "The server has {} live-event streams open, its limit; try again later.",
                self.limits.total
            ))
        } else if mine >= self.limits.per_caller {
            Some(format!(
                "This caller has {} live-event streams open, its limit; close one first.",
                self.limits.per_caller
            ))
        } else {
            None
        };
        if let Some(message) = refusal {
            drop(open);
            tracing::debug!(caller, "live-event stream refused: over its limit");
            return Err(ApiError {
                retry_after: Some(RETRY_AFTER_FULL),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", message)
            });
        }
        open.total += 1;
        *open.per_caller.entry(caller.to_owned()).or_default() += 1;
        drop(open);
        self.metrics.event_streams.inc();
        Ok(StreamSlot {
            hub: self.clone(),
            caller: caller.to_owned(),
        })
    }

    /// Streams open now, in all and by `caller`.
    pub fn open_streams(&self, caller: &str) -> (usize, usize) {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        (
            open.total,
            open.per_caller.get(caller).copied().unwrap_or(0),
        )
    }
}

/// A stream's place within the limits, given back when the stream ends
/// (the client went away, or the server ended it).
struct StreamSlot {
    hub: Arc<Hub>,
    caller: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.hub.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(mine) = open.per_caller.get_mut(&self.caller) {
            *mine -= 1;
            if *mine == 0 {
                open.per_caller.remove(&self.caller);
            }
        }
        drop(open);
        self.hub.metrics.event_streams.dec();
    }
}

// ---- from the log to the hub -------------------------------------------------

/// Publishes the log's events in order as they are written, until the
/// server stops. The store's observer wakes it after each commit that
/// wrote events; it also looks every [`POLL`] for events written by
/// another process on the same database (admin commands).
pub async fn run(state: Arc<AppState>) {
    let mut position = state.events.position();
    loop {
        tokio::select! {
            _ = state.metrics.events_written.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
        loop {
            match state.store.events_after(position, i64::MAX, PAGE).await {
                Ok(page) => {
                    let full = page.len() == PAGE;
                    for event in page {
                        position = event.seq;
                        state.events.publish(Arc::new(event.into()));
                    }
                    if !full {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "live events: could not read the event log");
                    break;
                }
            }
        }
    }
}

/// Renders the bodies of the log's events: the Standard Webhooks payload
/// `{"type","timestamp","data"}` whose `data` is the entity as the API
/// renders it at the event's time.
pub struct Renderer {
    /// The agents' heartbeat interval: the machine's health at the event.
    pub heartbeat_interval: Duration,
}

fn payload<T: serde::Serialize>(kind: &str, at: i64, data: T) -> Result<String, String> {
    serde_json::to_string(&EventPayload {
        event_type: kind.to_owned(),
        timestamp: proto::time::format_utc(at),
        data,
    })
    .map_err(|e| e.to_string())
}

impl store::EventRenderer for Renderer {
    fn render(
        &self,
        event_type: &str,
        at: i64,
        subject: &EventSubject<'_>,
    ) -> Result<String, String> {
        match subject {
            EventSubject::Action(action) => {
                payload(event_type, at, crate::api::action_entity(action))
            }
            EventSubject::Machine(machine) => payload(
                event_type,
                at,
                crate::api::machine_entity_seen(
                    machine,
                    machine.last_seen,
                    &crate::health_context(self.heartbeat_interval, at),
                ),
            ),
            EventSubject::ExclusionRule { id, change, rule } => payload(
                event_type,
                at,
                ExclusionRuleChange {
                    id: Some((*id).to_owned()),
                    change: (*change).to_owned(),
                    rule: rule.map(crate::exclusions::entity),
                },
            ),
            EventSubject::Audit(record) => {
                payload(event_type, at, crate::audit::audit_entity(record))
            }
            EventSubject::Tamper { machine, detail } => payload(
                event_type,
                at,
                proto::api::TamperReport {
                    machine: crate::api::machine_entity_seen(
                        machine,
                        machine.last_seen,
                        &crate::health_context(self.heartbeat_interval, at),
                    ),
                    detail: (*detail).to_owned(),
                    tamper_count: machine.tamper_count,
                },
            ),
        }
    }
}

/// Has `store` record its events, rendered by a [`Renderer`].
pub fn install_renderer(store: &store::Store, heartbeat_interval: Duration) {
    store.set_event_renderer(Arc::new(Renderer { heartbeat_interval }));
}

// ---- GET /api/events --------------------------------------------------------

/// What a stream's caller may see, as of its last check.
struct Access {
    groups: Option<Vec<i64>>,
    settings: bool,
    audit: bool,
}

impl Access {
    fn of(principal: &Principal) -> Access {
        Access {
            groups: principal.machine_groups(),
            settings: principal.require(Permission::Settings).is_ok(),
            audit: principal.require_audit_trail().is_ok(),
        }
    }

    fn sees(&self, audience: EventAudience) -> bool {
        match audience {
            EventAudience::Machine(Some(group)) => {
                self.groups.as_ref().is_none_or(|g| g.contains(&group))
            }
            EventAudience::Machine(None) => self.groups.is_none(),
            EventAudience::Settings => self.settings,
            EventAudience::Audit => self.audit,
        }
    }
}

/// The bearer token of a request the [`Principal`] extractor accepted.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (_, token) = value.split_once(' ')?;
    Some(token.trim().to_owned())
}

/// The `exp` of a token already verified (Unix seconds).
fn expiry(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["exp"].as_i64()
}

/// A `Last-Event-ID` as an event id: digits only.
fn parse_id(last: &str) -> Option<i64> {
    if last.is_empty() || last.len() > 18 || !last.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    last.parse().ok()
}

/// Where a stream starts.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// From `position` on (no `Last-Event-ID`).
    Now,
    /// After the `Last-Event-ID`, replaying the log up to `upto`.
    Replay { after: i64, upto: i64 },
    /// `resync` at `position`: the id is unknown, in the future, older than
    /// the retention, or too far behind.
    Resync,
}

/// Where a stream whose hub position is `position` starts, given its
/// `Last-Event-ID`.
async fn start_of(
    state: &AppState,
    last: Option<&str>,
    position: i64,
) -> Result<(Start, i64), ApiError> {
    let Some(last) = last else {
        return Ok((Start::Now, position));
    };
    let upto = state.store.event_bounds().await?.last.max(position);
    let Some(after) = parse_id(last) else {
        return Ok((Start::Resync, upto));
    };
    if after > upto || upto - after > state.config.event_replay_max as i64 {
        return Ok((Start::Resync, upto));
    }
    if after == upto {
        return Ok((Start::Replay { after, upto }, upto));
    }
    // The first event missed must still be there, and within the retention.
    let cutoff = crate::now_nanos().saturating_sub(crate::nanos(state.config.event_retention));
    let first = state.store.events_after(after, upto, 1).await?;
    match first.first() {
        Some(e) if e.seq == after + 1 && e.at >= cutoff => {
            Ok((Start::Replay { after, upto }, upto))
        }
        _ => Ok((Start::Resync, upto)),
    }
}

fn resync_frame(id: i64) -> SseEvent {
    SseEvent::default()
        .event("resync")
        .data("{}")
        .id(id.to_string())
}

/// One stream's state.
struct Subscriber {
    state: Arc<AppState>,
    token: String,
    access: Access,
    receiver: broadcast::Receiver<Arc<Event>>,
    /// Frames to send before anything else.
    queued: VecDeque<SseEvent>,
    /// The id of the last event sent or passed over: live events at or
    /// before it are not sent again.
    sent: i64,
    /// Replaying the log from `sent` up to this id.
    replay_to: i64,
    /// The id the client last received.
    client_id: i64,
    recheck: tokio::time::Instant,
    /// The token's expiry or the connection's lifetime, whichever is first.
    end: tokio::time::Instant,
    end_reason: &'static str,
    /// For the log line when the stream closes.
    request_id: String,
    opened: tokio::time::Instant,
    /// Why the server ended the stream (none: the client went away).
    ended: Option<&'static str>,
    _slot: StreamSlot,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        tracing::info!(
            target: "cordon::request",
            request_id = %self.request_id,
            caller = %self._slot.caller,
            duration_s = self.opened.elapsed().as_secs(),
            reason = self.ended.unwrap_or("the client went away"),
            "live-event stream closed"
        );
    }
}

impl Subscriber {
    fn frame(&mut self, event: &Event) -> SseEvent {
        self.client_id = event.seq;
        SseEvent::default()
            .id(event.seq.to_string())
            .event(&event.kind)
            .data(&event.body)
    }

    /// `resync` at `id`: what came before it is not sent.
    fn resync(&mut self, id: i64) -> SseEvent {
        self.state.metrics.event_resyncs.inc();
        self.sent = self.sent.max(id);
        self.replay_to = self.sent;
        self.client_id = id;
        resync_frame(id)
    }

    /// Queues the next page of the replay.
    async fn replay_page(&mut self) {
        let page = match self
            .state
            .store
            .events_after(self.sent, self.replay_to, REPLAY_PAGE)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(request_id = %self.request_id, error = %e, "live events: could not read the event log; the stream resyncs");
                let frame = self.resync(self.replay_to);
                self.queued.push_back(frame);
                return;
            }
        };
        if page.is_empty() {
            self.sent = self.replay_to;
        }
        for event in page {
            self.sent = event.seq;
            if self.access.sees(event.audience) {
                let frame = self.frame(&event.into());
                self.queued.push_back(frame);
            }
        }
        // Done: the client's id moves past what it may not see.
        if self.sent >= self.replay_to && self.client_id < self.replay_to {
            self.client_id = self.replay_to;
            self.queued
                .push_back(SseEvent::default().id(self.replay_to.to_string()));
        }
    }

    /// The next frame, or `None` when the stream ends.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(frame) = self.queued.pop_front() {
                return Some(frame);
            }
            // A replay goes on while the stream's end and its access
            // check are not due (else they come first, below).
            let now = tokio::time::Instant::now();
            if self.sent < self.replay_to && now < self.end && now < self.recheck {
                self.replay_page().await;
                continue;
            }
            // The end and the access check first: an event waiting in the
            // channel is never let through on access that has lapsed.
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(self.end) => {
                    self.ended = Some(self.end_reason);
                    return None;
                }
                _ = tokio::time::sleep_until(self.recheck) => {
                    let principal = match self.state.authenticate(&self.token).await {
                        Ok(principal) if principal.require(Permission::Read).is_ok() => principal,
                        _ => {
                            self.ended = Some("the caller lost access");
                            return None;
                        }
                    };
                    self.access = Access::of(&principal);
                    self.recheck = tokio::time::Instant::now() + self.state.config.event_recheck;
                }
                received = self.receiver.recv() => match received {
                    Ok(event) if event.seq <= self.sent => {}
                    Ok(event) => {
                        self.sent = event.seq;
                        if self.access.sees(event.audience) {
                            return Some(self.frame(&event));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // What it missed is in the log: replayed from
                        // there, unless that is too much.
                        let last = match self.state.store.event_bounds().await {
                            Ok(bounds) => bounds.last,
                            Err(_) => self.state.events.position(),
                        };
                        tracing::debug!(request_id = %self.request_id, missed, "a live-event stream fell behind; it catches up from the log");
                        if last - self.sent > self.state.config.event_replay_max as i64 {
                            return Some(self.resync(last));
                        }
                        self.state.metrics.event_catchups.inc();
                        self.replay_to = last;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        self.ended = Some("the server is stopping");
                        return None;
                    }
                },
            }
        }
    }
}

/// `GET /api/events`: the event stream.
async fn stream(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    connection: Option<Extension<conns::ConnSlot>>,
    request_id: Option<Extension<crate::error::RequestId>>,
) -> Result<Response, ApiError> {
    principal.require(Permission::Read)?;
    let token = bearer(&headers)
        .ok_or_else(|| ApiError::unauthorized("The Authorization header is missing."))?;
    let slot = state.events.open(&principal.id)?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|v| if v.len() > MAX_EVENT_ID { "" } else { v });
    // Subscribed before the log is read: nothing falls between the two.
    let (receiver, position) = state.events.subscribe();
    let (start, at) = start_of(&state, last, position).await?;
    let now = tokio::time::Instant::now();
    let mut end = now + Duration::from_secs(365 * 24 * 3600);
    let mut end_reason = "the server ended it";
    if let Some(exp) = expiry(&token) {
        let left = exp.saturating_sub(crate::unix_seconds()).max(0);
        end = end.min(now + Duration::from_secs(left as u64));
        end_reason = "the token expired";
    }
    if let Some(Extension(connection)) = connection {
        // Ended by the server before the connection's lifetime closes it,
        // so that the client resumes on a new connection at once.
        let left = state
            .config
            .max_connection_lifetime
            .saturating_sub(connection.0.age())
            .saturating_sub(Duration::from_secs(1));
        if now + left < end {
            end = now + left;
            end_reason = "the connection reached its lifetime";
        }
    }
    let keep_alive = (state.config.idle_timeout / 2)
        .min(KEEP_ALIVE_MAX)
        .max(Duration::from_millis(50));
    let mut subscriber = Subscriber {
        state: state.clone(),
        token,
        access: Access::of(&principal),
        receiver,
        queued: VecDeque::new(),
        sent: at,
        replay_to: at,
        client_id: at,
        recheck: now + state.config.event_recheck,
        end,
        end_reason,
        request_id: request_id.map(|Extension(id)| id.0).unwrap_or_default(),
        opened: now,
        ended: None,
        _slot: slot,
    };
    match start {
        // An id-only frame: the client's `lastEventId` from the start, so
        // that it can resume even before its first event.
        Start::Now => subscriber
            .queued
            .push_back(SseEvent::default().id(at.to_string())),
        Start::Resync => {
            let frame = subscriber.resync(at);
            subscriber.queued.push_back(frame);
        }
        Start::Replay { after, upto } => {
            subscriber.sent = after;
            subscriber.client_id = after;
            subscriber.replay_to = upto;
            if after == upto {
                subscriber
                    .queued
                    .push_back(SseEvent::default().id(at.to_string()));
            }
        }
    }
    let frames = futures_util::stream::unfold(subscriber, |mut subscriber| async move {
        let frame = subscriber.next().await?;
        Some((Ok::<_, Infallible>(frame), subscriber))
    });
    let mut response = Sse::new(frames)
        .keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Arc<Hub> {
        Arc::new(Hub::new(
            Limits {
                total: 3,
                per_caller: 2,
            },
            Arc::new(crate::monitoring::Metrics::new()),
            0,
        ))
    }

    fn event(seq: i64) -> Arc<Event> {
        Arc::new(Event {
            seq,
            kind: "audit.appended".into(),
            audience: EventAudience::Audit,
            body: "{}".into(),
        })
    }

    #[test]
    fn the_hub_publishes_in_order_once_and_subscribers_start_at_its_position() {
        let hub = hub();
        hub.publish(event(1));
        let (mut receiver, position) = hub.subscribe();
        assert_eq!(position, 1);
        hub.publish(event(2));
        // Read again from the log: not published twice.
        hub.publish(event(2));
        hub.publish(event(1));
        hub.publish(event(3));
        assert_eq!(receiver.try_recv().unwrap().seq, 2);
        assert_eq!(receiver.try_recv().unwrap().seq, 3);
        assert!(receiver.try_recv().is_err());
        assert_eq!(hub.position(), 3);
    }

    #[test]
    fn only_digits_are_event_ids() {
        assert_eq!(parse_id("0"), Some(0));
        assert_eq!(parse_id("42"), Some(42));
        for bad in [
            "",
            "-1",
            "+1",
            "0123456789ab-3",
            "1.5",
            " 1",
            "9999999999999999999",
        ] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn slots_are_bounded_per_caller_and_in_all_and_given_back() {
        let hub = hub();
        let a1 = hub.open("a").unwrap();
        let _a2 = hub.open("a").unwrap();
        assert_eq!(
            hub.open("a").err().expect("refused").status,
            StatusCode::TOO_MANY_REQUESTS
        );
        let _b1 = hub.open("b").unwrap();
        let full = hub.open("c").err().expect("refused");
        assert_eq!(full.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(full.retry_after, Some(RETRY_AFTER_FULL));
        drop(a1);
        assert_eq!(hub.open_streams("a"), (2, 1));
        let _c1 = hub.open("c").unwrap();
    }

    #[test]
    fn access_filters_by_group_and_permission() {
        let restricted = Access {
            groups: Some(vec![0, 2]),
            settings: false,
            audit: false,
        };
        assert!(restricted.sees(EventAudience::Machine(Some(2))));
        assert!(!restricted.sees(EventAudience::Machine(Some(3))));
        assert!(!restricted.sees(EventAudience::Machine(None)));
        assert!(!restricted.sees(EventAudience::Settings));
        assert!(!restricted.sees(EventAudience::Audit));
        let admin = Access {
            groups: None,
            settings: true,
            audit: true,
        };
        assert!(admin.sees(EventAudience::Machine(None)));
        assert!(admin.sees(EventAudience::Settings));
        assert!(admin.sees(EventAudience::Audit));
    }
}
