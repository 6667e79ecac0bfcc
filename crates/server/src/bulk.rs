//! **Cordon:** bulk isolation, `POST /api/machines/isolate` and
//! `POST /api/machines/unisolate` (see docs/api-extensions.md).
//!
//! The body is the single call's, checked by the same code
//! ([`api::action_request`]), plus exactly one of `MachineIds` (1 to
//! [`MAX_MACHINES`] ids) or `Filter` (a `$filter` of `GET /api/machines`
//! matching at most [`MAX_MACHINES`] machines in the caller's reach). Each
//! machine is then checked as the single call checks it (id form, scope,
//! existence, an action in flight) and every action is created in one store
//! write transaction with its audit record, before the answer: `200` with
//! one entry per machine, in order. The created actions are then pushed to
//! the agents connected.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use proto::api::{BulkActionResult, BulkTargets, ErrorDetail};
use serde_json::{Map, Value};
use store::{MachineField, NewAuditEvent, Query};

use crate::api::{self, ActionKind, ActionRequest};
use crate::auth::Principal;
use crate::error::{ApiError, RequestId, json_response};
use crate::{AppState, ConnInfo, crypto, odata};

/// The most machines one bulk call acts on.
pub const MAX_MACHINES: usize = 1_000;

/// Room the bulk call's own audit record gives to the list of the actions
/// it created (the store keeps 512 characters of a record's detail).
const DETAIL_BUDGET: usize = store::MAX_DETAIL_CHARS;

use crate::audit::AuditDetail;

/// `POST /api/machines/isolate`.
pub async fn isolate(
    state: State<Arc<AppState>>,
    principal: Principal,
    request_id: Extension<RequestId>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    bulk(
        ActionKind::Isolate,
        state,
        principal,
        request_id,
        conn,
        headers,
        body,
    )
    .await
}

/// `POST /api/machines/unisolate`.
pub async fn unisolate(
    state: State<Arc<AppState>>,
    principal: Principal,
    request_id: Extension<RequestId>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    bulk(
        ActionKind::Unisolate,
        state,
        principal,
        request_id,
        conn,
        headers,
        body,
    )
    .await
}

/// One machine the call names: its id as answered (lowercase when it is a
/// machine id, as given otherwise), and the single call's error when it is
/// not a machine id.
struct Target {
    machine_id: String,
    malformed: Option<ApiError>,
}

async fn bulk(
    kind: ActionKind,
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Extension(RequestId(request_id)): Extension<RequestId>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (request, targets): (ActionRequest, BulkTargets) =
        api::action_request(kind, &principal, &headers, &body)?;
    let groups = principal.machine_groups();
    let targets = match (targets.machine_ids, targets.filter) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_body(
                "Give either MachineIds or Filter, not both.",
            ));
        }
        (None, None) => return Err(ApiError::missing_parameter("MachineIds or Filter")),
        (Some(ids), None) => listed(ids)?,
        (None, Some(filter)) => filtered(&state, &filter, groups.clone()).await?,
    };

    // Each well-formed id gets its action and that action's audit record;
    // the store checks scope, existence and actions in flight.
    let principal_text = crate::audit::principal_text(&principal);
    let source_address = conn.map(|c| c.peer.ip().to_string()).unwrap_or_default();
    let batch: Vec<(store::NewAction, NewAuditEvent)> = targets
        .iter()
        .filter(|t| t.malformed.is_none())
        .map(|t| {
            let new = request.for_machine(t.machine_id.clone());
            let record = NewAuditEvent {
                id: crypto::new_guid(),
                at: new.now,
                principal: principal_text.clone(),
                source_address: source_address.clone(),
                request_id: request_id.clone(),
                method: "POST".to_owned(),
                target: format!("/api/machines/{}/{}", t.machine_id, kind.verb()),
                action: kind.verb().to_owned(),
                outcome: "Succeeded".to_owned(),
                status: 201,
                detail: Some(format!(
                    "machine action {}, created by a bulk {} call",
                    new.id,
                    kind.verb()
                )),
                count: 1,
            };
            (new, record)
        })
        .collect();
    let outcomes = if batch.is_empty() {
        Vec::new()
    } else {
        state.store.create_actions(batch, groups).await?
    };
    let mut outcomes = outcomes.into_iter();

    let mut results = Vec::with_capacity(targets.len());
    let mut created = Vec::new();
    for target in targets {
        let outcome = match target.malformed {
            Some(e) => Err(e),
            None => outcomes
                .next()
                .ok_or_else(|| ApiError::internal("the store answered fewer outcomes than asked"))?
                .map_err(|e| api::create_error(&target.machine_id, e)),
        };
        results.push(match outcome {
            Ok(action) => {
                let entity = api::action_entity(&action);
                created.push(action);
                BulkActionResult {
                    machine_id: target.machine_id,
                    status: StatusCode::CREATED.as_u16(),
                    machine_action: Some(entity),
                    error: None,
                }
            }
            Err(e) => BulkActionResult {
                machine_id: target.machine_id,
                status: e.status.as_u16(),
                machine_action: None,
                error: Some(ErrorDetail {
                    code: e.code.to_owned(),
                    message: e.message,
                    target: request_id.clone(),
                    active_action_id: e.active_action_id,
                }),
            },
        });
    }
    // Durable: now to the agents connected, all at once.
    for action in &created {
        state.gateway.push(action);
    }

    let detail = audit_detail(kind, &results, &created);
    let mut body = Map::new();
    body.insert(
        "@odata.context".into(),
        Value::String(api::context_url(
            &headers,
            &state,
            "BulkMachineActionResults",
        )),
    );
    body.insert(
        "value".into(),
        serde_json::to_value(&results).map_err(ApiError::internal)?,
    );
    let mut response = json_response(
        StatusCode::OK,
        serde_json::to_vec(&body).map_err(ApiError::internal)?,
    );
    response.extensions_mut().insert(AuditDetail(detail));
    Ok(response)
}

/// `MachineIds`: 1 to [`MAX_MACHINES`] entries, duplicates (ids in any
/// case) answered once, at their first place.
fn listed(ids: Vec<String>) -> Result<Vec<Target>, ApiError> {
    if ids.is_empty() || ids.len() > MAX_MACHINES {
        return Err(ApiError::invalid_input(format!(
            "MachineIds must hold 1 to {MAX_MACHINES} machine ids; it holds {}.",
            ids.len()
        )));
    }
    let mut seen = HashSet::new();
    let mut targets = Vec::with_capacity(ids.len());
    for id in ids {
        let (machine_id, malformed) = match api::machine_id_param(&id) {
            Ok(machine_id) => (machine_id, None),
            Err(e) => (id, Some(e)),
        };
        if seen.insert(machine_id.clone()) {
            targets.push(Target {
                machine_id,
                malformed,
            });
        }
    }
    Ok(targets)
}

/// `Filter`: the machines in reach it matches, in the list's order; more
/// than [`MAX_MACHINES`] is refused, naming the count.
async fn filtered(
    state: &AppState,
    filter: &str,
    groups: Option<Vec<i64>>,
) -> Result<Vec<Target>, ApiError> {
    let filter = odata::parse_filter(filter, odata::MACHINE_FIELDS)
        .map_err(|e| ApiError::odata(format!("Filter: {e}")))?;
    let mut query: Query<MachineField> = Query {
        filter: Some(filter),
        take: MAX_MACHINES as u64,
        count: true,
        groups,
        ..Query::default()
    };
    let mut targets = Vec::new();
    loop {
        let page = state
            .store
            .list_machines(query.clone(), state.sql_context())
            .await?;
        if let Some(count) = page.count
            && count > MAX_MACHINES as u64
        {
            return Err(ApiError::invalid_input(format!(
                "The Filter matches {count} machines; a bulk call acts on at most {MAX_MACHINES}. \
                 Nothing was changed."
            )));
        }
        targets.extend(page.items.into_iter().map(|m| Target {
            machine_id: m.id,
            malformed: None,
        }));
        // A page may end early at the store's page-size cap in bytes.
        match page.next {
            Some(cursor) if targets.len() < MAX_MACHINES => {
                query.after = Some(cursor);
                query.count = false;
                query.take = (MAX_MACHINES - targets.len()) as u64;
            }
            _ => return Ok(targets),
        }
    }
}

/// The bulk call's own audit detail: how many machines, how many actions
/// created and refused (by code), and the first created actions' ids (each
/// action also has a record of its own with the call's request id).
fn audit_detail(
    kind: ActionKind,
    results: &[BulkActionResult],
    created: &[store::ActionRecord],
) -> String {
    let mut refused: Vec<(String, usize)> = Vec::new();
    for error in results.iter().filter_map(|r| r.error.as_ref()) {
        match refused.iter_mut().find(|(code, _)| *code == error.code) {
            Some((_, n)) => *n += 1,
            None => refused.push((error.code.clone(), 1)),
        }
    }
    let mut text = format!(
        "bulk {}: {} machines, {} actions created, {} refused",
        kind.verb(),
        results.len(),
        created.len(),
        results.len() - created.len()
    );
    if !refused.is_empty() {
        let codes: Vec<String> = refused.iter().map(|(c, n)| format!("{c} {n}")).collect();
        text.push_str(&format!(" ({})", codes.join(", ")));
    }
    if created.is_empty() {
        return text;
    }
    let more = |n: usize| format!(" and {n} more, each with its own record");
    let mut named = Vec::new();
    let mut length = text.chars().count() + "; actions: ".len() + more(created.len()).len();
    for action in created {
        length += action.id.len() + 2;
        if length > DETAIL_BUDGET {
            break;
        }
        named.push(action.id.as_str());
    }
    text.push_str("; actions: ");
    text.push_str(&named.join(", "));
    if named.len() < created.len() {
        text.push_str(&more(created.len() - named.len()));
    }
    text
}
