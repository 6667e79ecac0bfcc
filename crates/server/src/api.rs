//! The public REST API: machines and machine actions (the isolation
//! exclusion rules are in `exclusions.rs`).
//!
//! Each handler checks a request in the contract's order: body size and
//! authentication happen before it runs (middleware and the [`Principal`]
//! extractor), then permission (403), media type (415), body (400), the
//! target's existence (404) and its state (400).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, OriginalUri, RawPathParams, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use proto::api::{IpAddress, Machine, MachineAction};
use proto::time::format_utc;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::{Map, Value};
use store::{ActionRecord, MachineRecord, NewAction, StoreError};

use crate::auth::{Permission, Principal};
use crate::error::{ApiError, json_response};
use crate::{AppState, base_url, crypto, odata};

/// Longest `Comment` accepted, in characters.
const MAX_COMMENT: usize = 4000;
/// Longest `Title` or `ExternalId` accepted, in characters.
const MAX_SHORT_TEXT: usize = 1000;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/machines", get(list_machines))
        .route("/machines/{id}", get(get_machine))
        // Cordon's bulk calls; a machine named `isolate` or `unisolate` is
        // still found by `GET /machines/{name}`.
        .route(
            "/machines/isolate",
            post(crate::bulk::isolate).get(
                |state: State<Arc<AppState>>, principal: Principal, headers: HeaderMap| {
                    machine_by_key(state, principal, "isolate".to_owned(), headers)
                },
            ),
        )
        .route(
            "/machines/unisolate",
            post(crate::bulk::unisolate).get(
                |state: State<Arc<AppState>>, principal: Principal, headers: HeaderMap| {
                    machine_by_key(state, principal, "unisolate".to_owned(), headers)
                },
            ),
        )
        .route("/machines/{id}/isolate", post(isolate))
        .route("/machines/{id}/unisolate", post(unisolate))
        .route("/machines/{id}/tags", post(tags))
        .route("/machineactions", get(list_actions))
        .route("/machineactions/{id}", get(get_action))
        .route("/machineactions/{id}/cancel", post(cancel))
        .route("/auditEvents", get(crate::audit::list))
        .route("/openapi.json", get(openapi))
        .merge(crate::exclusions::routes())
}

/// A path id that must be a GUID, in lower case; `InvalidInput` naming
/// `what` it should have been otherwise.
pub(crate) fn guid_param(id: &str, what: &str) -> Result<String, ApiError> {
    if crate::crypto::is_guid(id) {
        Ok(id.to_ascii_lowercase())
    } else {
        Err(ApiError::invalid_input(format!(
            "'{}' is not {what} (a GUID).",
            shorten(id)
        )))
    }
}

/// The `{id}` of the path, decoded; a path that is not UTF-8 is an
/// `InvalidInput` instead of axum's plain-text rejection.
pub struct IdParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::invalid_input("The id in the path is malformed."))?;
        let raw = params
            .iter()
            .find(|(name, _)| *name == "id")
            .map(|(_, value)| value.to_owned())
            .ok_or_else(|| ApiError::invalid_input("The id in the path is missing."))?;
        Ok(IdParam(raw))
    }
}

pub(crate) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if is_json {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type())
    }
}

/// Parses a JSON object body into `T`; anything else is `InvalidRequestBody`.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    typed(&parse_object(body)?)
}

/// The body as a JSON object; anything else is `InvalidRequestBody`.
pub(crate) fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = crate::json::value_from_slice(body)
        .map_err(|e| ApiError::invalid_body(format!("The request body is not valid JSON: {e}.")))?;
    if !value.is_object() {
        return Err(ApiError::invalid_body(
            "The request body must be a JSON object.",
        ));
    }
    Ok(value)
}

/// The fields of a parsed body that `T` knows; a field of the wrong type
/// is `InvalidRequestBody`.
pub(crate) fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    T::deserialize(value).map_err(|e| {
        ApiError::invalid_body(format!(
            "The request body has a field of the wrong type: {e}."
        ))
    })
}

fn required_comment(comment: Option<String>) -> Result<String, ApiError> {
    let comment = comment.filter(|c| !c.trim().is_empty());
    let comment = comment.ok_or_else(|| ApiError::missing_parameter("Comment"))?;
    check_length("Comment", Some(&comment), MAX_COMMENT)?;
    Ok(comment)
}

fn check_length(name: &str, value: Option<&String>, max: usize) -> Result<(), ApiError> {
    match value {
        Some(v) if v.chars().count() > max => Err(ApiError::invalid_input(format!(
            "{name} is longer than {max} characters."
        ))),
        _ => Ok(()),
    }
}

/// A machine id from the path: 40 hex characters, any case.
pub(crate) fn machine_id_param(id: &str) -> Result<String, ApiError> {
    if crypto::is_machine_id(id) {
        Ok(id.to_ascii_lowercase())
    } else {
        Err(ApiError::invalid_input(format!(
            "'{}' is not a machine id (40 hexadecimal characters).",
            shorten(id)
        )))
    }
}

fn action_id_param(id: &str) -> Result<String, ApiError> {
    if crypto::is_guid(id) {
        Ok(id.to_ascii_lowercase())
    } else {
        Err(ApiError::invalid_input(format!(
            "'{}' is not a machine action id (a GUID).",
            shorten(id)
        )))
    }
}

/// Echoes client text in messages only in short, printable form.
pub(crate) fn shorten(text: &str) -> String {
    let mut out: String = text.chars().filter(|c| !c.is_control()).take(64).collect();
    if text.chars().count() > 64 {
        out.push('…');
    }
    out
}

async fn isolate(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    IdParam(id): IdParam,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (request, IgnoredAny) = action_request(ActionKind::Isolate, &principal, &headers, &body)?;
    let new = request.for_machine(machine_id_param(&id)?);
    create(&state, new, principal.machine_groups(), &headers).await
}

async fn unisolate(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    IdParam(id): IdParam,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (request, IgnoredAny) = action_request(ActionKind::Unisolate, &principal, &headers, &body)?;
    let new = request.for_machine(machine_id_param(&id)?);
    create(&state, new, principal.machine_groups(), &headers).await
}

/// An isolation-family action type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActionKind {
    Isolate,
    Unisolate,
}

impl ActionKind {
    /// The action's `type`.
    pub(crate) fn action_type(self) -> &'static str {
        match self {
            ActionKind::Isolate => "Isolate",
            ActionKind::Unisolate => "Unisolate",
        }
    }

    /// The last segment of the call's path, and its audit action.
    pub(crate) fn verb(self) -> &'static str {
        match self {
            ActionKind::Isolate => "isolate",
            ActionKind::Unisolate => "unisolate",
        }
    }
}

/// What an isolate or unisolate request asks for, its body checked: the
/// action to create for each machine named.
#[derive(Debug, Clone)]
pub(crate) struct ActionRequest {
    kind: ActionKind,
    scope: Option<&'static str>,
    requestor: String,
    comment: String,
    title: Option<String>,
    external_id: Option<String>,
    request_source: &'static str,
}

/// Checks an isolate or unisolate request up to its target, in the
/// contract's order: permission (403), media type (415), the body's form
/// and field types (400 `InvalidRequestBody`; `X` is the call's own extra
/// fields, typed with the rest), then `Comment`, `IsolationType`, `Title`
/// and `ExternalId`. The single and the bulk calls share it.
pub(crate) fn action_request<X: DeserializeOwned>(
    kind: ActionKind,
    principal: &Principal,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(ActionRequest, X), ApiError> {
    principal.require(Permission::Isolate)?;
    require_json(headers)?;
    let value = parse_object(body)?;
    let (comment, isolation_type, title, external_id) = match kind {
        ActionKind::Isolate => {
            let r: proto::api::IsolateRequest = typed(&value)?;
            (r.comment, r.isolation_type, r.title, r.external_id)
        }
        ActionKind::Unisolate => {
            let r: proto::api::UnisolateRequest = typed(&value)?;
            (r.comment, None, r.title, r.external_id)
        }
    };
    let extra: X = typed(&value)?;
    let comment = required_comment(comment)?;
    let scope = match (kind, isolation_type.as_deref()) {
        (ActionKind::Unisolate, _) => None,
        (ActionKind::Isolate, None) => Some("Full"),
        (ActionKind::Isolate, Some(t)) if t.eq_ignore_ascii_case("full") => Some("Full"),
        (ActionKind::Isolate, Some(t)) if t.eq_ignore_ascii_case("selective") => Some("Selective"),
        (ActionKind::Isolate, Some(t)) => {
            return Err(ApiError::invalid_input(format!(
                "IsolationType '{}' is not valid; use Full or Selective.",
                shorten(t)
            )));
        }
    };
    check_length("Title", title.as_ref(), MAX_SHORT_TEXT)?;
    check_length("ExternalId", external_id.as_ref(), MAX_SHORT_TEXT)?;
    let request = ActionRequest {
        kind,
        scope,
        requestor: principal.display_name.clone(),
        comment,
        title,
        external_id,
        request_source: if principal.via_console {
            "Portal"
        } else {
            "PublicApi"
        },
    };
    Ok((request, extra))
}

impl ActionRequest {
    /// The new action for `machine_id` (checked by [`machine_id_param`]).
    pub(crate) fn for_machine(&self, machine_id: String) -> NewAction {
        NewAction {
            id: crypto::new_guid(),
            action_type: self.kind.action_type().into(),
            title: self.title.clone(),
            requestor: self.requestor.clone(),
            requestor_comment: self.comment.clone(),
            machine_id,
            scope: self.scope.map(str::to_owned),
            external_id: self.external_id.clone(),
            request_source: self.request_source.into(),
            now: crate::now_nanos(),
        }
    }
}

/// Whether the caller reaches the machine: with `groups`, it must exist and
/// be in one of them; without (`None`), any id passes and the caller's own
/// lookup answers for its existence.
async fn reachable(
    state: &AppState,
    machine_id: &str,
    groups: Option<Vec<i64>>,
) -> Result<bool, ApiError> {
    let Some(groups) = groups else {
        return Ok(true);
    };
    Ok(state
        .store
        .machine_group(machine_id)
        .await?
        .is_some_and(|group| groups.contains(&group)))
}

async fn create(
    state: &AppState,
    new: NewAction,
    groups: Option<Vec<i64>>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let machine_id = new.machine_id.clone();
    // A machine outside the caller's groups is as good as unknown.
    if !reachable(state, &machine_id, groups).await? {
        return Err(create_error(&machine_id, StoreError::NotFound));
    }
    let action = state
        .store
        .create_action(new)
        .await
        .map_err(|e| create_error(&machine_id, e))?;
    state.gateway.push(&action);
    Ok(entity_response(
        StatusCode::CREATED,
        &context_url(headers, state, "MachineActions/$entity"),
        action_entity(&action),
        None,
    ))
}

/// The contract's error for an action the store refused to create.
pub(crate) fn create_error(machine_id: &str, e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => ApiError::not_found(format!("Machine {machine_id} was not found.")),
        StoreError::ActiveExists(active) => ApiError::active_request(active),
        e => e.into(),
    }
}

/// Longest machine tag, in characters.
const MAX_TAG: usize = 200;

/// `POST /api/machines/{id}/tags`: add or remove one machine tag.
async fn tags(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    IdParam(id): IdParam,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    principal.require(Permission::Settings)?;
    require_json(&headers)?;
    let request: proto::api::TagRequest = parse_body(&body)?;
    let value = request
        .value
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::missing_parameter("Value"))?;
    if value.chars().count() > MAX_TAG || value.chars().any(char::is_control) {
        return Err(ApiError::invalid_input(format!(
            "Value must be at most {MAX_TAG} printable characters."
        )));
    }
    let add = match request.action.as_deref() {
        None => return Err(ApiError::missing_parameter("Action")),
        Some(a) if a.eq_ignore_ascii_case("add") => true,
        Some(a) if a.eq_ignore_ascii_case("remove") => false,
        Some(a) => {
            return Err(ApiError::invalid_input(format!(
                "Action '{}' is not valid; use Add or Remove.",
                shorten(a)
            )));
        }
    };
    let machine_id = machine_id_param(&id)?;
    if !reachable(&state, &machine_id, principal.machine_groups()).await? {
        return Err(ApiError::not_found(format!(
            "Machine {machine_id} was not found."
        )));
    }
    let machine = match state.store.change_tag(&machine_id, value, add).await {
        Ok(machine) => machine,
        Err(StoreError::NotFound) => {
            return Err(ApiError::not_found(format!(
                "Machine {machine_id} was not found."
            )));
        }
        Err(e) => return Err(e.into()),
    };
    Ok(entity_response(
        StatusCode::OK,
        &context_url(&headers, &state, "Machines/$entity"),
        machine_entity(&state, &machine),
        None,
    ))
}

async fn cancel(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    IdParam(id): IdParam,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    principal.require(Permission::Isolate)?;
    // The body is optional; a body that is there must be JSON.
    let request: proto::api::CancelRequest = if body.iter().all(u8::is_ascii_whitespace) {
        proto::api::CancelRequest::default()
    } else {
        require_json(&headers)?;
        parse_body(&body)?
    };
    check_length("Comment", request.comment.as_ref(), MAX_COMMENT)?;
    let action_id = action_id_param(&id)?;
    action_in_scope(&state, &principal, &action_id).await?;
    let comment = request.comment.filter(|c| !c.trim().is_empty());
    let action = match state
        .store
        .cancel_action(
            &action_id,
            principal.display_name,
            comment,
            crate::now_nanos(),
        )
        .await
    {
        Ok(action) => action,
        Err(StoreError::NotFound) => {
            return Err(ApiError::not_found(format!(
                "MachineAction {action_id} was not found."
            )));
        }
        Err(StoreError::WrongStatus(status)) => {
            return Err(ApiError::bad_request(format!(
                "Only a Pending action can be cancelled; this action is {status}."
            )));
        }
        Err(e) => return Err(e.into()),
    };
    Ok(entity_response(
        StatusCode::OK,
        &context_url(&headers, &state, "MachineActions/$entity"),
        action_entity(&action),
        None,
    ))
}

async fn get_action(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    IdParam(id): IdParam,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    principal.require(Permission::Read)?;
    let action_id = action_id_param(&id)?;
    let action = action_in_scope(&state, &principal, &action_id).await?;
    Ok(entity_response(
        StatusCode::OK,
        &context_url(&headers, &state, "MachineActions/$entity"),
        action_entity(&action),
        None,
    ))
}

/// The action, if it exists and its machine is in the caller's groups;
/// otherwise the contract's 404.
async fn action_in_scope(
    state: &AppState,
    principal: &Principal,
    action_id: &str,
) -> Result<store::ActionRecord, ApiError> {
    let not_found = || ApiError::not_found(format!("MachineAction {action_id} was not found."));
    let action = state
        .store
        .get_action(action_id)
        .await?
        .ok_or_else(not_found)?;
    if !reachable(state, &action.machine_id, principal.machine_groups()).await? {
        return Err(not_found());
    }
    Ok(action)
}

async fn get_machine(
    state: State<Arc<AppState>>,
    principal: Principal,
    IdParam(id): IdParam,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    machine_by_key(state, principal, id, headers).await
}

/// `GET /api/machines/{id}`, `{id}` a machine id or a computer name.
async fn machine_by_key(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    id: String,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    principal.require(Permission::Read)?;
    let valid_name = !id.is_empty()
        && id.len() <= 255
        && id
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !crypto::is_machine_id(&id) && !valid_name {
        return Err(ApiError::invalid_input(format!(
            "'{}' is neither a machine id nor a computer name.",
            shorten(&id)
        )));
    }
    let key = if crypto::is_machine_id(&id) {
        id.to_ascii_lowercase()
    } else {
        id.clone()
    };
    let machine = state
        .store
        .get_machine_in(&key, principal.machine_groups())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Machine {} was not found.", shorten(&id))))?;
    Ok(entity_response(
        StatusCode::OK,
        &context_url(&headers, &state, "Machines/$entity"),
        machine_entity(&state, &machine),
        None,
    ))
}

async fn list_actions(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Result<Response, ApiError> {
    principal.require(Permission::Read)?;
    let mut options = odata::parse(uri.query(), odata::ACTION_FIELDS, odata::ACTION_PROPERTIES)
        .map_err(ApiError::odata)?;
    options.query.groups = principal.machine_groups();
    let page = state
        .store
        .list_actions(options.query.clone(), state.sql_context())
        .await?;
    let items = page.items.iter().map(action_entity).collect();
    Ok(collection_response(
        &state,
        &headers,
        &uri,
        "MachineActions",
        items,
        &options,
        page.next,
        page.count,
    ))
}

async fn list_machines(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Result<Response, ApiError> {
    principal.require(Permission::Read)?;
    let mut options = odata::parse(
        uri.query(),
        odata::MACHINE_FIELDS,
        odata::MACHINE_PROPERTIES,
    )
    .map_err(ApiError::odata)?;
    options.query.groups = principal.machine_groups();
    let page = state
        .store
        .list_machines(options.query.clone(), state.sql_context())
        .await?;
    let items = page
        .items
        .iter()
        .map(|m| machine_entity(&state, m))
        .collect();
    Ok(collection_response(
        &state, &headers, &uri, "Machines", items, &options, page.next, page.count,
    ))
}

async fn openapi(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let mut document: Value =
        serde_json::from_str(include_str!("openapi.json")).map_err(ApiError::internal)?;
    document["servers"] =
        serde_json::json!([{ "url": format!("{}/api", base_url(&headers, &state)) }]);
    Ok(json_response(
        StatusCode::OK,
        serde_json::to_vec(&document).map_err(ApiError::internal)?,
    ))
}

/// `<base>/api/$metadata#<what>`, with the API prefix the client used.
pub(crate) fn context_url(headers: &HeaderMap, state: &AppState, what: &str) -> String {
    // The contract's form, whichever of the two prefixes the client used.
    format!("{}/api/$metadata#{what}", base_url(headers, state))
}

fn to_object<T: serde::Serialize>(entity: T) -> Map<String, Value> {
    match serde_json::to_value(entity) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

pub(crate) fn entity_response<T: serde::Serialize>(
    status: StatusCode,
    context: &str,
    entity: T,
    select: Option<&[&str]>,
) -> Response {
    let mut body = Map::new();
    body.insert("@odata.context".into(), Value::String(context.to_owned()));
    body.extend(project(to_object(entity), select));
    json_response(status, serde_json::to_vec(&body).expect("JSON object"))
}

/// Keeps only the selected properties, in the entity's order.
fn project(object: Map<String, Value>, select: Option<&[&str]>) -> Map<String, Value> {
    match select {
        None => object,
        Some(keep) => object
            .into_iter()
            .filter(|(key, _)| keep.contains(&key.as_str()))
            .collect(),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn collection_response<T: serde::Serialize, F>(
    state: &AppState,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    set: &str,
    items: Vec<T>,
    options: &odata::ListOptions<F>,
    next: Option<store::Cursor>,
    count: Option<u64>,
) -> Response {
    let returned = items.len() as u64;
    let mut body = Map::new();
    body.insert(
        "@odata.context".into(),
        Value::String(context_url(headers, state, set)),
    );
    if let Some(count) = count {
        body.insert("@odata.count".into(), Value::from(count));
    }
    let select = options.select.as_deref();
    let values: Vec<Value> = items
        .into_iter()
        .map(|item| Value::Object(project(to_object(item), select)))
        .collect();
    body.insert("value".into(), Value::Array(values));
    let remaining = options.top.map(|top| top.saturating_sub(returned));
    if let Some(cursor) = next
        && remaining != Some(0)
    {
        let query = odata::next_page_query(uri.query(), &cursor, remaining);
        body.insert(
            "@odata.nextLink".into(),
            Value::String(format!(
                "{}{}?{query}",
                base_url(headers, state),
                uri.path()
            )),
        );
    }
    json_response(
        StatusCode::OK,
        serde_json::to_vec(&body).expect("JSON object"),
    )
}

pub fn action_entity(a: &ActionRecord) -> MachineAction {
    MachineAction {
        id: a.id.clone(),
        action_type: a.action_type.clone(),
        title: a.title.clone(),
        requestor: a.requestor.clone(),
        requestor_comment: a.requestor_comment.clone(),
        status: a.status.clone(),
        machine_id: a.machine_id.clone(),
        computer_dns_name: a.computer_dns_name.clone(),
        creation_date_time_utc: format_utc(a.created_at),
        last_update_date_time_utc: format_utc(a.updated_at),
        cancellation_requestor: a.cancellation_requestor.clone(),
        cancellation_comment: a.cancellation_comment.clone(),
        cancellation_date_time_utc: a.cancellation_at.map(format_utc),
        error_h_result: a.error_hresult,
        scope: a.scope.clone(),
        external_id: a.external_id.clone(),
        request_source: a.request_source.clone(),
        related_file_info: None,
        commands: Vec::new(),
        troubleshoot_info: a.troubleshoot_info.clone(),
    }
}

pub fn machine_entity(state: &AppState, m: &MachineRecord) -> Machine {
    let last_seen = state
        .gateway
        .last_seen(&m.id)
        .map_or(m.last_seen, |s| s.max(m.last_seen));
    machine_entity_seen(m, last_seen, &state.sql_context())
}

/// The machine's entity given when it was last seen and the health
/// thresholds (an event renders it as of its time).
pub fn machine_entity_seen(m: &MachineRecord, last_seen: i64, ctx: &store::SqlContext) -> Machine {
    let facts = &m.facts;
    Machine {
        id: m.id.clone(),
        computer_dns_name: facts.computer_dns_name.clone(),
        first_seen: format_utc(m.first_seen),
        last_seen: Some(format_utc(last_seen)),
        os_platform: facts.os_platform.clone(),
        os_version: facts.os_version.clone(),
        version: facts.os_version.clone(),
        os_processor: facts.os_processor.clone(),
        os_architecture: facts.os_architecture.clone(),
        os_build: facts.os_build,
        agent_version: facts.agent_version.clone(),
        last_ip_address: facts.last_ip_address.clone(),
        last_external_ip_address: facts.last_external_ip_address.clone(),
        health_status: store::health_status(last_seen, ctx).to_owned(),
        onboarding_status: m.onboarding_status.clone(),
        rbac_group_id: m.rbac_group_id,
        rbac_group_name: Some(m.rbac_group_name.clone()),
        risk_score: "None".into(),
        exposure_level: "None".into(),
        device_value: "Normal".into(),
        aad_device_id: None,
        is_aad_joined: false,
        machine_tags: m.tags.clone(),
        ip_addresses: facts
            .addresses
            .iter()
            .map(|a| IpAddress {
                ip_address: a.ip_address.clone(),
                mac_address: a.mac_address.clone(),
                address_type: a.interface_type.clone().unwrap_or_else(|| "Other".into()),
                operational_status: a.operational_status.clone().unwrap_or_else(|| "Up".into()),
            })
            .collect(),
        isolation_state: m.isolation_state.clone(),
        isolation_scope: m.isolation_scope.clone(),
        tamper_count: m.tamper_count,
        last_tamper_date_time_utc: m.last_tamper_at.map(format_utc),
        exclusion_rules_version: m.exclusion_version,
    }
}
