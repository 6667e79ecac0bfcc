//! Live events: `GET /api/events`, a server-sent-events stream of what
//! changes (machine actions, machines' isolation, exclusion rules, the
//! audit trail), and `GET /api/me`, who the caller is and what it may do.
//! Both are Cordon extensions (docs/api-extensions.md).
//!
//! Where events come from: the store tells its observer (`monitoring.rs`)
//! of every committed action change and audit record, on its writer
//! thread; the observer hands them to a [`Feeder`], a bounded channel that
//! never blocks (when it is full the change is dropped and every stream is
//! told to `resync`). One task ([`run`]) takes them in commit order, reads
//! the machine each action is about (its group decides who may see the
//! event, and its entity rides in `machine.isolationChanged`), and
//! publishes them on the [`Hub`]: a broadcast channel plus the last
//! [`HISTORY`] events for resuming. Exclusion rule changes are published
//! by their endpoints (and by the watcher for changes made with the CLI).
//!
//! Each event body is the Standard Webhooks payload
//! `{"type","timestamp","data"}`, so that a durable log and webhooks can
//! send the same bodies. Event ids are `<process marker>-<sequence>`: a
//! `Last-Event-ID` from another server process, or older than the history
//! kept, is answered with `resync` (refetch, then follow).
//!
//! Every stream holds a slot (at most `--max-event-streams` in all and
//! `--max-event-streams-per-caller` per caller), sees only the events its
//! caller may see, re-checks its caller's access every minute, ends
//! when its token expires or its connection reaches its lifetime, and
//! sends `: keep-alive` comments so that an idle stream is never cut.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
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
use tokio::sync::{broadcast, mpsc};

use crate::auth::{Permission, Principal};
use crate::error::{ApiError, json_response};
use crate::{AppState, conns};

/// Events kept for resuming with `Last-Event-ID`.
pub const HISTORY: usize = 4096;
/// Events a stream may fall behind before it is told to `resync`.
const HUB_CAPACITY: usize = 1024;
/// Store changes waiting to become events; past it they are dropped and
/// every stream is told to `resync`.
const FEED_CAPACITY: usize = 4096;
/// How often a stream re-checks its caller's access (role, groups, the
/// user or application still there), by default.
pub const RECHECK: Duration = Duration::from_secs(60);
/// The longest gap between keep-alive comments.
const KEEP_ALIVE_MAX: Duration = Duration::from_secs(15);
/// Machines whose isolation state is remembered to tell a move from none.
const KNOWN_MACHINES: usize = 65_536;
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

/// Who may see an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Every stream (`resync`).
    All,
    /// Callers reaching the machine group (`None`: the machine is gone;
    /// only callers reaching every group).
    Machine(Option<i64>),
    /// Callers with [`Permission::Settings`].
    Settings,
    /// Callers who may read the audit trail ([`Principal::require_audit_trail`]).
    Audit,
}

/// One published event.
#[derive(Debug)]
pub struct Event {
    pub seq: u64,
    /// The SSE `event:` field.
    pub kind: &'static str,
    pub audience: Audience,
    /// The SSE `data:` line.
    pub body: String,
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

struct History {
    events: VecDeque<Arc<Event>>,
    /// The sequence number of the next event (the first is 1).
    next: u64,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_caller: HashMap<String, usize>,
}

/// Publishes events to the streams and keeps the last [`HISTORY`].
pub struct Hub {
    /// Marks this process's event ids.
    epoch: String,
    history: Mutex<History>,
    sender: broadcast::Sender<Arc<Event>>,
    open: Mutex<Open>,
    limits: Limits,
    metrics: Arc<crate::monitoring::Metrics>,
}

/// Where a new stream starts.
enum Start {
    /// From now on.
    Now,
    /// After these events (those it missed since its `Last-Event-ID`).
    Replay(Vec<Arc<Event>>),
    /// The id is unknown: `resync` first.
    Resync,
}

impl Hub {
    pub fn new(limits: Limits, metrics: Arc<crate::monitoring::Metrics>) -> Hub {
        let (sender, _) = broadcast::channel(HUB_CAPACITY);
        let epoch = crate::crypto::new_guid()
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(12)
            .collect();
        Hub {
            epoch,
            history: Mutex::new(History {
                events: VecDeque::with_capacity(HISTORY),
                next: 1,
            }),
            sender,
            open: Mutex::new(Open::default()),
            limits,
            metrics,
        }
    }

    fn id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.epoch)
    }

    /// Publishes an event of `kind` with `data` (the Standard Webhooks
    /// payload `{"type","timestamp","data"}`).
    pub fn publish<T: serde::Serialize>(&self, kind: &'static str, audience: Audience, data: T) {
        let payload = EventPayload {
            event_type: kind.to_owned(),
            timestamp: proto::time::format_utc(crate::now_nanos()),
            data,
        };
        match serde_json::to_string(&payload) {
            Ok(body) => self.publish_body(kind, audience, body),
            Err(e) => {
                tracing::error!(error = %e, kind, "live events: an event could not be written")
            }
        }
    }

    /// Tells every stream to refetch: events were lost on the way.
    pub fn resync_all(&self) {
        tracing::warn!("live events were dropped (the server fell behind); every stream resyncs");
        self.publish_body("resync", Audience::All, "{}".to_owned());
    }

    fn publish_body(&self, kind: &'static str, audience: Audience, body: String) {
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let event = Arc::new(Event {
            seq: history.next,
            kind,
            audience,
            body,
        });
        history.next += 1;
        if history.events.len() >= HISTORY {
            history.events.pop_front();
        }
        history.events.push_back(event.clone());
        // Sent under the lock: streams subscribe under it too, so each one
        // gets every event exactly once, from the history or the channel.
        let _ = self.sender.send(event);
        drop(history);
        self.metrics.events_published.inc();
    }

    /// Subscribes, and says where the stream starts given the client's
    /// `Last-Event-ID`; also the id of the last event published.
    fn subscribe(&self, last: Option<&str>) -> (broadcast::Receiver<Arc<Event>>, Start, String) {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = self.sender.subscribe();
        let position = self.id(history.next - 1);
        let Some(last) = last else {
            return (receiver, Start::Now, position);
        };
        let seq = last
            .split_once('-')
            .filter(|(epoch, _)| *epoch == self.epoch)
            .and_then(|(_, seq)| seq.parse::<u64>().ok());
        let oldest = history.events.front().map_or(history.next, |e| e.seq);
        let start = match seq {
            // Only events the history still holds can be replayed.
            Some(seq) if seq < history.next && seq + 1 >= oldest => Start::Replay(
                history
                    .events
                    .iter()
                    .filter(|e| e.seq > seq)
                    .cloned()
                    .collect(),
            ),
            _ => Start::Resync,
        };
        (receiver, start, position)
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

// ---- from the store to the hub ---------------------------------------------

/// A change on its way to becoming an event.
pub enum Feed {
    Action(store::ActionChange),
    Audit(store::AuditRecord),
}

/// The store observer's end of the way to the hub: never blocks.
pub struct Feeder {
    sender: mpsc::Sender<Feed>,
    dropped: Arc<AtomicBool>,
}

impl Feeder {
    /// A feeder and the receiving end for [`run`].
    pub fn new() -> (Feeder, FeedReceiver) {
        let (sender, receiver) = mpsc::channel(FEED_CAPACITY);
        let dropped = Arc::new(AtomicBool::new(false));
        (
            Feeder {
                sender,
                dropped: dropped.clone(),
            },
            FeedReceiver { receiver, dropped },
        )
    }

    /// Hands a change on; when the way is full the change is dropped and
    /// the streams will be told to `resync`.
    pub fn send(&self, feed: Feed) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.sender.try_send(feed) {
            self.dropped.store(true, Ordering::Relaxed);
        }
    }
}

/// The receiving end of a [`Feeder`].
pub struct FeedReceiver {
    receiver: mpsc::Receiver<Feed>,
    dropped: Arc<AtomicBool>,
}

/// Turns the store's changes into events, in commit order, until the
/// server stops.
pub async fn run(state: Arc<AppState>, mut feed: FeedReceiver) {
    // The isolation state and scope last seen of machines, to tell when an
    // action change moved them.
    let mut known: HashMap<String, (String, Option<String>)> = HashMap::new();
    while let Some(change) = feed.receiver.recv().await {
        match change {
            Feed::Action(change) => action_events(&state, &change, &mut known).await,
            Feed::Audit(record) => state.events.publish(
                "audit.appended",
                Audience::Audit,
                crate::audit::audit_entity(&record),
            ),
        }
        // Once what was queued before the loss is out.
        if feed.receiver.is_empty() && feed.dropped.swap(false, Ordering::Relaxed) {
            state.events.resync_all();
        }
    }
}

const FINAL_STATUSES: [&str; 4] = ["Succeeded", "Failed", "TimeOut", "Cancelled"];

async fn action_events(
    state: &AppState,
    change: &store::ActionChange,
    known: &mut HashMap<String, (String, Option<String>)>,
) {
    let action = &change.action;
    let is_final = FINAL_STATUSES.contains(&action.status.as_str());
    let kind = match (&change.from, is_final) {
        (None, _) => "machineAction.created",
        (Some(_), true) => "machineAction.completed",
        (Some(_), false) => "machineAction.updated",
    };
    let machine = match state.store.get_machine_in(&action.machine_id, None).await {
        Ok(machine) => machine,
        Err(e) => {
            tracing::warn!(error = %e, machine_id = %action.machine_id, "live events: could not read the machine of an action");
            None
        }
    };
    let group = machine.as_ref().map(|m| m.rbac_group_id);
    state.events.publish(
        kind,
        Audience::Machine(group),
        crate::api::action_entity(action),
    );
    let Some(machine) = machine else {
        return;
    };
    let now = (
        machine.isolation_state.clone(),
        machine.isolation_scope.clone(),
    );
    let moved = match known.get(&machine.id) {
        Some(before) => *before != now,
        // Not seen yet: creation and completion are what move it.
        None => change.from.is_none() || is_final,
    };
    if moved {
        state.events.publish(
            "machine.isolationChanged",
            Audience::Machine(group),
            crate::api::machine_entity(state, &machine),
        );
    }
    if known.len() >= KNOWN_MACHINES && !known.contains_key(&machine.id) {
        known.clear();
    }
    known.insert(machine.id, now);
}

/// Publishes an exclusion rule change: `change` is `created`, `updated`
/// or `deleted` with the rule's id (and the rule, unless deleted), or
/// `changed` without an id for changes made outside the API (the CLI).
pub fn exclusion_changed(
    state: &AppState,
    id: Option<&str>,
    change: &'static str,
    rule: Option<&store::ExclusionRuleRecord>,
) {
    state.events.publish(
        "exclusionRule.changed",
        Audience::Settings,
        ExclusionRuleChange {
            id: id.map(str::to_owned),
            change: change.to_owned(),
            rule: rule.map(crate::exclusions::entity),
        },
    );
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

    fn sees(&self, event: &Event) -> bool {
        match event.audience {
            Audience::All => true,
            Audience::Machine(Some(group)) => {
                self.groups.as_ref().is_none_or(|g| g.contains(&group))
            }
            Audience::Machine(None) => self.groups.is_none(),
            Audience::Settings => self.settings,
            Audience::Audit => self.audit,
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

fn resync_frame(id: Option<&str>) -> SseEvent {
    let event = SseEvent::default().event("resync").data("{}");
    match id {
        Some(id) => event.id(id),
        None => event,
    }
}

enum Queued {
    Frame(SseEvent),
    Event(Arc<Event>),
}

/// One stream's state.
struct Subscriber {
    state: Arc<AppState>,
    token: String,
    access: Access,
    receiver: broadcast::Receiver<Arc<Event>>,
    /// What to send before reading the channel: the start, then the
    /// replay (shared events, made into frames one at a time).
    queued: VecDeque<Queued>,
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
    fn frame(&self, event: &Event) -> SseEvent {
        let frame = SseEvent::default()
            .id(self.state.events.id(event.seq))
            .event(event.kind)
            .data(&event.body);
        if event.kind == "resync" {
            self.state.metrics.event_resyncs.inc();
        }
        frame
    }

    /// The next frame, or `None` when the stream ends.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            match self.queued.pop_front() {
                Some(Queued::Frame(frame)) => return Some(frame),
                Some(Queued::Event(event)) => return Some(self.frame(&event)),
                None => {}
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
                    Ok(event) if self.access.sees(&event) => return Some(self.frame(&event)),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(request_id = %self.request_id, missed, "a live-event stream fell behind; it resyncs");
                        self.state.metrics.event_resyncs.inc();
                        return Some(resync_frame(None));
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

/// `GET /api/events`: the live-event stream.
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
    let (receiver, start, position) = state.events.subscribe(last);
    let access = Access::of(&principal);
    let mut queued = VecDeque::new();
    match start {
        // An id-only frame: the client's `lastEventId` from the start, so
        // that it can resume even before its first event.
        Start::Now => queued.push_back(Queued::Frame(SseEvent::default().id(&position))),
        Start::Resync => {
            state.metrics.event_resyncs.inc();
            queued.push_back(Queued::Frame(resync_frame(Some(&position))));
        }
        Start::Replay(events) => {
            queued.extend(
                events
                    .into_iter()
                    .filter(|e| access.sees(e))
                    .map(Queued::Event),
            );
            if queued.is_empty() {
                queued.push_back(Queued::Frame(SseEvent::default().id(&position)));
            }
        }
    }
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
    let subscriber = Subscriber {
        state: state.clone(),
        token,
        access,
        receiver,
        queued,
        recheck: now + state.config.event_recheck,
        end,
        end_reason,
        request_id: request_id.map(|Extension(id)| id.0).unwrap_or_default(),
        opened: now,
        ended: None,
        _slot: slot,
    };
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
        ))
    }

    fn seqs(start: Start) -> Option<Vec<u64>> {
        match start {
            Start::Replay(events) => Some(events.iter().map(|e| e.seq).collect()),
            Start::Now => Some(Vec::new()),
            Start::Resync => None,
        }
    }

    #[test]
    fn a_known_id_replays_what_followed_and_anything_else_resyncs() {
        let hub = hub();
        for _ in 0..5 {
            hub.publish("machineAction.created", Audience::Machine(Some(0)), ());
        }
        let id = |seq| hub.id(seq);
        assert_eq!(seqs(hub.subscribe(Some(&id(2))).1), Some(vec![3, 4, 5]));
        assert_eq!(seqs(hub.subscribe(Some(&id(5))).1), Some(vec![]));
        assert_eq!(
            seqs(hub.subscribe(Some(&id(0))).1),
            Some(vec![1, 2, 3, 4, 5])
        );
        // From the future, another process, or not an id at all.
        assert_eq!(seqs(hub.subscribe(Some(&id(6))).1), None);
        assert_eq!(seqs(hub.subscribe(Some("0123456789ab-2")).1), None);
        assert_eq!(seqs(hub.subscribe(Some("nonsense")).1), None);
        let (_, start, position) = hub.subscribe(None);
        assert_eq!(seqs(start), Some(vec![]));
        assert_eq!(position, id(5));
    }

    #[test]
    fn an_id_older_than_the_history_resyncs() {
        let hub = hub();
        for _ in 0..HISTORY + 10 {
            hub.publish("audit.appended", Audience::Audit, ());
        }
        let id = |seq| hub.id(seq);
        assert_eq!(seqs(hub.subscribe(Some(&id(5))).1), None);
        // The oldest kept is 11: from 10 on nothing was lost.
        assert_eq!(
            seqs(hub.subscribe(Some(&id(10))).1).map(|s| s.len()),
            Some(HISTORY)
        );
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
        let event = |audience| Event {
            seq: 1,
            kind: "x",
            audience,
            body: String::new(),
        };
        let restricted = Access {
            groups: Some(vec![0, 2]),
            settings: false,
            audit: false,
        };
        assert!(restricted.sees(&event(Audience::Machine(Some(2)))));
        assert!(!restricted.sees(&event(Audience::Machine(Some(3)))));
        assert!(!restricted.sees(&event(Audience::Machine(None))));
        assert!(!restricted.sees(&event(Audience::Settings)));
        assert!(!restricted.sees(&event(Audience::Audit)));
        assert!(restricted.sees(&event(Audience::All)));
        let admin = Access {
            groups: None,
            settings: true,
            audit: true,
        };
        assert!(admin.sees(&event(Audience::Machine(None))));
        assert!(admin.sees(&event(Audience::Settings)));
        assert!(admin.sees(&event(Audience::Audit)));
    }

    #[test]
    fn a_full_feed_drops_and_marks_the_loss_without_blocking() {
        let (feeder, feed) = Feeder::new();
        let record = store::AuditRecord {
            seq: 1,
            event: store::NewAuditEvent {
                id: "a".into(),
                at: 0,
                principal: "p".into(),
                source_address: String::new(),
                request_id: String::new(),
                method: "POST".into(),
                target: "/api/x".into(),
                action: "x".into(),
                outcome: "Succeeded".into(),
                status: 200,
                detail: None,
                count: 1,
            },
            prev_hash: String::new(),
            hash: String::new(),
        };
        for _ in 0..FEED_CAPACITY {
            feeder.send(Feed::Audit(record.clone()));
        }
        assert!(!feed.dropped.load(Ordering::Relaxed));
        // Returns at once, although nobody reads.
        feeder.send(Feed::Audit(record));
        assert!(feed.dropped.load(Ordering::Relaxed));
        assert_eq!(feed.receiver.len(), FEED_CAPACITY);
    }
}
