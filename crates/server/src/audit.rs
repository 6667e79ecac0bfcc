//! The audit trail: which calls are recorded, the middleware that records
//! them, and `GET /api/auditEvents`.
//!
//! Recorded: every state-changing call under `/api` (POST, PUT, PATCH,
//! DELETE), whatever its outcome; every refused call (401, 403, 429) under
//! `/api`; every enrollment; and every failed token request. A successful
//! read is never recorded, so reads add no durable write. The store chains
//! the records by hash (see `store::audit`); a record that cannot be written
//! is logged and the response goes out unchanged.
//!
//! Repeated refusals that cost an attacker nothing (unauthenticated calls
//! that fail, and rate-limited ones) are folded ([`Folding`]): the first of
//! a kind from one source in a window is written at once, the rest are
//! counted in memory and written as one record with their `count` when the
//! window ends. So a flood of bad requests adds a few records a minute, not
//! one per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{OriginalUri, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use proto::api::AuditEvent;
use proto::time::format_utc;
use store::{AuditRecord, NewAuditEvent};

use crate::auth::Principal;
use crate::error::{ApiError, ErrorSummary};
use crate::{AppState, ConnInfo, crypto, odata};

/// What the audit middleware writes as a call's `detail` when the handler
/// leaves it on its response: what a bulk call created and refused, which
/// webhook a call created or deleted.
#[derive(Debug, Clone)]
pub struct AuditDetail(pub String);

/// Where the [`Principal`] extractor leaves the caller's name for the
/// middleware (a request extension shared with it).
#[derive(Debug, Clone, Default)]
pub struct PrincipalSlot(Arc<Mutex<SlotState>>);

#[derive(Debug, Default)]
struct SlotState {
    name: Option<String>,
    /// The name comes from a verified token.
    authenticated: bool,
}

impl PrincipalSlot {
    pub fn set(&self, principal: &Principal) {
        let text = principal_text(principal);
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.name = Some(text);
        slot.authenticated = true;
    }

    /// Names the caller when there is no token, such as the account a
    /// sign-in attempt names.
    pub fn set_text(&self, text: String) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).name = Some(text);
    }

    fn get(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .name
            .clone()
    }

    fn authenticated(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .authenticated
    }
}

/// How a caller is named in its records: `<client id> (<display name>)`
/// for an application, `<user id> (<upn>)` for a user.
pub fn principal_text(principal: &Principal) -> String {
    format!("{} ({})", principal.id, principal.display_name)
}

/// How many kinds of refusal (source, principal, action, status) are
/// counted at once; beyond, refusals of new kinds are counted together in
/// one record. So a flood, even from many addresses or naming many
/// accounts, writes at most about twice this many records per window.
const MAX_FOLDS: usize = 256;

/// The source part of a fold's key: the address, or for IPv6 its /64 (one
/// host can hold a whole /64).
fn source_key(address: &str) -> String {
    match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        _ => address.to_owned(),
    }
}

/// Repeated refusals counted in memory (see the module documentation).
pub struct Folding {
    window: Duration,
    state: Mutex<FoldState>,
}

#[derive(Default)]
struct FoldState {
    open: HashMap<(String, String, String, i64), Fold>,
    /// Refusals of new kinds while `open` is full.
    overflow: Option<Fold>,
}

struct Fold {
    opened: Instant,
    /// Calls counted but not written yet, the first one's time, the last one.
    extra: i64,
    first_at: i64,
    last: Option<NewAuditEvent>,
}

impl Folding {
    pub fn new(window: Duration) -> Folding {
        Folding {
            window,
            state: Mutex::new(FoldState::default()),
        }
    }

    /// Whether `event` is to be written now; otherwise it was counted.
    /// The principal (for a sign-in, the name tried) is part of the kind,
    /// so each account tried is named at least once a window.
    fn note(&self, event: &NewAuditEvent, now: Instant) -> bool {
        let key = (
            source_key(&event.source_address),
            event.principal.clone(),
            event.action.clone(),
            event.status,
        );
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let count = |fold: &mut Fold| {
            if fold.extra == 0 {
                fold.first_at = event.at;
            }
            fold.extra += 1;
            fold.last = Some(event.clone());
        };
        if let Some(fold) = state.open.get_mut(&key) {
            count(fold);
            return false;
        }
        if state.open.len() >= MAX_FOLDS {
            let fold = state.overflow.get_or_insert(Fold {
                opened: now,
                extra: 0,
                first_at: event.at,
                last: None,
            });
            count(fold);
            return false;
        }
        state.open.insert(
            key,
            Fold {
                opened: now,
                extra: 0,
                first_at: event.at,
                last: None,
            },
        );
        true
    }

    /// The records of the calls counted in windows that ended by `now`
    /// (every window, with `all`); those windows close.
    pub fn due(&self, now: Instant, all: bool) -> Vec<NewAuditEvent> {
        let ended = |fold: &Fold| all || now.duration_since(fold.opened) >= self.window;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = Vec::new();
        state.open.retain(|_, fold| {
            if ended(fold) {
                closed.push((fold.extra, fold.first_at, fold.last.take(), false));
                false
            } else {
                true
            }
        });
        if state.overflow.as_ref().is_some_and(ended)
            && let Some(mut fold) = state.overflow.take()
        {
            closed.push((fold.extra, fold.first_at, fold.last.take(), true));
        }
        drop(state);
        // Oldest first, whatever the map's order.
        closed.sort_by_key(|(_, first_at, _, _)| *first_at);
        closed
            .into_iter()
            .filter_map(|(extra, first_at, last, overflow)| {
                let mut event = last.filter(|_| extra > 0)?;
                let folded = format!(
                    "{extra} calls like this from {} to {}",
                    format_utc(first_at),
                    format_utc(event.at)
                );
                event.detail = Some(match event.detail.take() {
                    Some(detail) => format!("{folded}; the last: {detail}"),
                    None => folded,
                });
                if overflow {
                    event.source_address = "various".to_owned();
                    event.principal = "various".to_owned();
                }
                event.id = crypto::new_guid();
                event.count = extra;
                Some(event)
            })
            .collect()
    }
}

/// Writes the records of folding windows that ended (all of them with
/// `all`, when the server stops).
pub async fn flush_folds(state: &AppState, all: bool) {
    for event in state.audit_folds.due(Instant::now(), all) {
        if let Err(e) = state.store.append_audit(event).await {
            tracing::error!(error = %e, "could not write a folded audit record");
        }
    }
}

/// What kind of endpoint a request is for, as far as auditing goes.
enum Kind {
    /// Under `/api`: the action's name.
    Api(String),
    Enroll,
    Token,
    /// A posted sign-in form: always recorded.
    SignIn,
}

fn classify(method: &Method, path: &str) -> Option<Kind> {
    if method == Method::POST && path == proto::agent::ENROLL_PATH {
        return Some(Kind::Enroll);
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if method == Method::POST
        && matches!(
            segments.as_slice(),
            [_, "oauth2", "token"] | [_, "oauth2", "v2.0", "token"]
        )
    {
        return Some(Kind::Token);
    }
    if method == Method::POST
        && matches!(
            segments.as_slice(),
            [_, "oauth2", "authorize"] | [_, "oauth2", "v2.0", "authorize"]
        )
    {
        return Some(Kind::SignIn);
    }
    let rest = match segments.as_slice() {
        ["api", "v1.0", rest @ ..] | ["api", rest @ ..] => rest,
        _ => return None,
    };
    let name = match (method.as_str(), rest) {
        ("POST", ["machines", _, "isolate"]) => "isolate".to_owned(),
        ("POST", ["machines", _, "unisolate"]) => "unisolate".to_owned(),
        ("POST", ["machines", _, "tags"]) => "machine.tag".to_owned(),
        ("POST", ["machines", "isolate"]) => "bulk.isolate".to_owned(),
        ("POST", ["machines", "unisolate"]) => "bulk.unisolate".to_owned(),
        ("POST", ["machineactions", _, "cancel"]) => "cancel".to_owned(),
        ("POST", ["isolationExclusionRules"]) => "exclusion.create".to_owned(),
        ("PATCH", ["isolationExclusionRules", _]) => "exclusion.update".to_owned(),
        ("DELETE", ["isolationExclusionRules", _]) => "exclusion.delete".to_owned(),
        ("GET", ["machines"]) => "machine.list".to_owned(),
        ("GET", ["machines", _]) => "machine.read".to_owned(),
        ("GET", ["machineactions"]) => "action.list".to_owned(),
        ("GET", ["machineactions", _]) => "action.read".to_owned(),
        ("GET", ["isolationExclusionRules"]) => "exclusion.list".to_owned(),
        ("GET", ["isolationExclusionRules", _]) => "exclusion.read".to_owned(),
        ("GET", ["auditEvents"]) => "audit.list".to_owned(),
        ("POST", ["webhooks"]) => "webhook.create".to_owned(),
        ("DELETE", ["webhooks", _]) => "webhook.delete".to_owned(),
        ("GET", ["webhooks"]) => "webhook.list".to_owned(),
        ("GET", ["webhooks", _]) => "webhook.read".to_owned(),
        ("GET", ["webhooks", _, "deliveries"]) => "webhook.deliveries".to_owned(),
        (method, rest) => format!(
            "{}.{}",
            rest.first().copied().unwrap_or("api"),
            method.to_ascii_lowercase()
        ),
    };
    Some(Kind::Api(name))
}

fn changes_state(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

fn outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 | 303 => "Succeeded",
        401 | 403 | 429 => "Refused",
        _ => "Failed",
    }
}

/// The outermost middleware: records the calls the module documentation
/// lists once their response is known.
pub async fn record(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let Some(kind) = classify(&method, &path) else {
        return next.run(request).await;
    };
    let slot = PrincipalSlot::default();
    request.extensions_mut().insert(slot.clone());
    let source_address = request
        .extensions()
        .get::<ConnInfo>()
        .map(|c| c.peer.ip().to_string())
        .unwrap_or_default();

    let response = next.run(request).await;

    let status = response.status();
    let refused = matches!(status.as_u16(), 401 | 403 | 429);
    let (action, wanted) = match kind {
        Kind::Api(name) => (name, changes_state(&method) || refused),
        Kind::Enroll => ("enroll".to_owned(), true),
        Kind::Token => ("token".to_owned(), !status.is_success()),
        Kind::SignIn => ("signin".to_owned(), true),
    };
    if !wanted {
        return response;
    }
    let request_id = response
        .headers()
        .get("request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let detail = match response.extensions().get::<ErrorSummary>() {
        Some(e) => Some(format!("{}: {}", e.code, e.message)),
        // What the handler said the call did (a bulk call: what it created
        // and refused; a webhook: which one, to where).
        None => response
            .extensions()
            .get::<AuditDetail>()
            .map(|d| d.0.clone()),
    };
    let outcome = outcome(status);
    let event = NewAuditEvent {
        id: crypto::new_guid(),
        at: crate::now_nanos(),
        principal: slot.get().unwrap_or_else(|| "anonymous".to_owned()),
        source_address,
        request_id,
        method: method.to_string(),
        target: path,
        action,
        outcome: outcome.to_owned(),
        status: i64::from(status.as_u16()),
        detail,
        count: 1,
    }
    .capped();
    // Unauthenticated calls that fail, and rate-limited ones: folded.
    let authenticated = slot.authenticated();
    let foldable = (outcome != "Succeeded" && !authenticated) || status.as_u16() == 429;
    if foldable && !state.audit_folds.note(&event, Instant::now()) {
        return response;
    }
    if let Err(e) = state.store.append_audit(event.clone()).await {
        tracing::error!(
            error = %e,
            request_id = %event.request_id,
            action = %event.action,
            "could not write the audit record"
        );
    }
    response
}

/// Records an admin command that changed something (`cordon user create`,
/// `cordon app delete`, …): method `CLI`, principal `cli <login name>`,
/// source address `local`, status 0. `target` names what changed (never a
/// secret).
pub async fn record_command(
    store: &store::Store,
    action: &str,
    target: &str,
) -> Result<(), store::StoreError> {
    store
        .append_audit(NewAuditEvent {
            id: crypto::new_guid(),
            at: crate::now_nanos(),
            principal: cli_principal(),
            source_address: "local".to_owned(),
            request_id: crypto::new_guid(),
            method: "CLI".to_owned(),
            target: target.to_owned(),
            action: action.to_owned(),
            outcome: "Succeeded".to_owned(),
            status: 0,
            detail: None,
            count: 1,
        })
        .await
        .map(|_| ())
}

/// `cli <login name>`: the principal of admin commands.
pub fn cli_principal() -> String {
    // The login name the environment gives (printable characters only), or
    // else the user id, which root shells and services always have.
    let who = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| {
            let name: String = std::env::var(v)
                .ok()?
                .chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect();
            (!name.trim().is_empty()).then_some(name)
        })
        // SAFETY: getuid has no preconditions and cannot fail.
        .unwrap_or_else(|| format!("uid {}", unsafe { libc::getuid() }));
    format!("cli {who}")
}

/// Prunes the audit trail before `before` (nanoseconds), signing the new
/// checkpoint with the server's key, and records the prune (`audit.prune`,
/// by `principal`, method `method`) when it removed something. The number
/// removed and the checkpoint.
pub async fn prune(
    store: &store::Store,
    key: Arc<crate::jwt::SigningKey>,
    before: i64,
    principal: String,
    method: &str,
) -> Result<(u64, Option<store::AuditCheckpoint>), store::StoreError> {
    let sign: Arc<dyn Fn(&store::AuditCheckpoint) -> String + Send + Sync> =
        Arc::new(move |c: &store::AuditCheckpoint| key.sign_text(&c.signed_text()));
    let removed = store.prune_audit(before, crate::now_nanos(), sign).await?;
    let checkpoint = store.audit_checkpoint().await?;
    if removed > 0
        && let Some(c) = &checkpoint
    {
        store
            .append_audit(NewAuditEvent {
                id: crypto::new_guid(),
                at: crate::now_nanos(),
                principal,
                source_address: "local".to_owned(),
                request_id: crypto::new_guid(),
                method: method.to_owned(),
                target: format!("records through {}", c.seq),
                action: "audit.prune".to_owned(),
                outcome: "Succeeded".to_owned(),
                status: 0,
                detail: Some(format!(
                    "removed {removed} records before {}; the chain now starts after record {} (hash {})",
                    format_utc(before),
                    c.seq,
                    c.hash
                )),
                count: 1,
            })
            .await?;
    }
    Ok((removed, checkpoint))
}

pub fn audit_entity(r: &AuditRecord) -> AuditEvent {
    let e = &r.event;
    AuditEvent {
        id: e.id.clone(),
        date_time_utc: format_utc(e.at),
        principal: e.principal.clone(),
        source_address: e.source_address.clone(),
        request_id: e.request_id.clone(),
        method: e.method.clone(),
        target: e.target.clone(),
        action: e.action.clone(),
        outcome: e.outcome.clone(),
        status: e.status,
        detail: e.detail.clone(),
        count: e.count,
        hash: r.hash.clone(),
        previous_hash: r.prev_hash.clone(),
    }
}

/// `GET /api/auditEvents`: administrators only.
pub async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Result<Response, ApiError> {
    principal.require_audit_trail()?;
    let options = odata::parse(uri.query(), odata::AUDIT_FIELDS, odata::AUDIT_PROPERTIES)
        .map_err(ApiError::odata)?;
    let page = state.store.list_audit(options.query.clone()).await?;
    let items = page.items.iter().map(audit_entity).collect();
    Ok(crate::api::collection_response(
        &state,
        &headers,
        &uri,
        "AuditEvents",
        items,
        &options,
        page.next,
        page.count,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(method: Method, path: &str) -> Option<String> {
        match classify(&method, path)? {
            Kind::Api(name) => Some(name),
            Kind::Enroll => Some("enroll".into()),
            Kind::Token => Some("token".into()),
            Kind::SignIn => Some("signin".into()),
        }
    }

    #[test]
    fn calls_are_classified() {
        let m = "0123456789012345678901234567890123456789";
        assert_eq!(
            name(Method::POST, &format!("/api/machines/{m}/isolate")).as_deref(),
            Some("isolate")
        );
        assert_eq!(
            name(Method::POST, "/api/v1.0/machineactions/x/cancel").as_deref(),
            Some("cancel")
        );
        assert_eq!(
            name(Method::POST, "/api/v1.0/machines/isolate").as_deref(),
            Some("bulk.isolate")
        );
        assert_eq!(
            name(Method::POST, "/api/machines/unisolate").as_deref(),
            Some("bulk.unisolate")
        );
        assert_eq!(
            name(Method::DELETE, "/api/isolationExclusionRules/x").as_deref(),
            Some("exclusion.delete")
        );
        assert_eq!(
            name(Method::POST, "/t/oauth2/v2.0/token").as_deref(),
            Some("token")
        );
        assert_eq!(name(Method::GET, "/t/oauth2/v2.0/token"), None);
        assert_eq!(name(Method::GET, "/agent/v1/health"), None);
        assert_eq!(name(Method::GET, "/apix"), None);
    }

    fn refusal(source: &str, principal: &str, at: i64) -> NewAuditEvent {
        NewAuditEvent {
            id: crypto::new_guid(),
            at,
            principal: principal.into(),
            source_address: source.into(),
            request_id: format!("r{at}"),
            method: "POST".into(),
            target: "/t/oauth2/v2.0/authorize".into(),
            action: "signin".into(),
            outcome: "Refused".into(),
            status: 401,
            detail: Some("Unauthorized: wrong".into()),
            count: 1,
        }
    }

    #[test]
    fn refusals_fold_per_source_within_bounded_memory() {
        let folds = Folding::new(Duration::from_secs(60));
        let start = Instant::now();
        // The first of a kind from a source is written; the rest are
        // counted. Another name tried is another kind.
        assert!(folds.note(&refusal("198.18.0.1", "user a", 1), start));
        assert!(!folds.note(&refusal("198.18.0.1", "user a", 2), start));
        assert!(!folds.note(&refusal("198.18.0.1", "user a", 3), start));
        assert!(folds.note(&refusal("198.18.0.1", "user b", 3), start));
        // Addresses of one IPv6 /64 are one source.
        assert!(folds.note(&refusal("fd00::1", "anonymous", 4), start));
        assert!(!folds.note(&refusal("fd00::2", "anonymous", 5), start));
        assert!(folds.due(start, false).is_empty(), "the window is open");
        let due = folds.due(start + Duration::from_secs(60), false);
        assert_eq!(due.len(), 2);
        assert_eq!((due[0].count, due[1].count), (2, 1));
        let first = due.iter().find(|e| e.count == 2).unwrap();
        assert_eq!(first.principal, "user a");
        assert_eq!(first.request_id, "r3");
        assert!(
            first
                .detail
                .as_deref()
                .unwrap()
                .ends_with("; the last: Unauthorized: wrong")
        );
        // A new window writes the first one again.
        assert!(folds.note(&refusal("198.18.0.1", "user a", 6), start));

        // Many sources: at most MAX_FOLDS kinds are held; the rest are
        // counted together.
        let folds = Folding::new(Duration::from_secs(60));
        let written = (0..10_000)
            .filter(|n| {
                let source = format!("198.18.{}.{}", n / 256, n % 256);
                folds.note(&refusal(&source, "anonymous", *n), start)
            })
            .count();
        assert_eq!(written, MAX_FOLDS);
        let due = folds.due(start, true);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, 10_000 - MAX_FOLDS as i64);
        assert_eq!(due[0].source_address, "various");
    }
}
