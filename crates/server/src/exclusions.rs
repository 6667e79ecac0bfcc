//! Isolation exclusion rules (a Cordon extension, `docs/isolation-exclusions.md`):
//! what Selective isolation lets through.
//!
//! This module owns the rules' validation, shared by the REST endpoints
//! below and by `cordon exclusion add`, so that both refuse the same input
//! with the same message. A request is read in three steps: the JSON types
//! ([`parse_input`], `InvalidRequestBody`), then each field's value
//! ([`RuleChanges::check`], `MissingRequiredParameter` and `InvalidInput`),
//! then the rule as a whole ([`RuleChanges::apply`]: a rule needs at least
//! one condition). Values are stored normalized: addresses as CIDR
//! prefixes of their network (`10.1.2.3/8` becomes `10.0.0.0/8`), ports
//! and ranges without spaces, duplicates dropped.
//!
//! Every change bumps the rule-set version in the store; [`publish`] then
//! sends the whole set to every live agent session.

use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use proto::agent::{ExclusionSpec, PortRange, ServerMessage};
use proto::time::format_utc;
use serde_json::{Map, Value};
use store::{ExclusionRuleFields, ExclusionRuleRecord, Store, StoreError};

use crate::api::{IdParam, context_url, entity_response, parse_body, require_json, shorten};
use crate::auth::{Permission, Principal};
use crate::error::{ApiError, json_response};
use crate::{AppState, crypto};

/// Longest `Name`, in characters.
pub const MAX_NAME: usize = 200;
/// Longest `Description`, in characters.
pub const MAX_DESCRIPTION: usize = 1000;
/// Longest `ExecutablePath`, in bytes (the kernel's `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Longest `SystemdUnit`, in characters (systemd's own limit).
pub const MAX_UNIT: usize = 256;
/// Most entries of `RemoteAddresses`, and of `RemotePorts`, in one rule.
pub const MAX_ITEMS: usize = 256;
/// Largest rule set, as the `exclusions` message an agent receives. Half
/// of the protocol's line limit, so that racing changes can't reach it.
pub const MAX_RULE_SET_BYTES: usize = proto::agent::MAX_LINE / 2;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/isolationExclusionRules", get(list).post(create))
        .route(
            "/isolationExclusionRules/{id}",
            get(get_one).patch(update).delete(delete),
        )
}

// ---- input ---------------------------------------------------------------

/// One field of a request: absent (unchanged), null (cleared), or a value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Field<T> {
    #[default]
    Absent,
    Null,
    Value(T),
}

/// The fields of a request or of the command line, of the right types but
/// not yet checked. List fields hold their entries as given: each may still
/// be a comma-separated list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleInput {
    pub name: Field<String>,
    pub description: Field<String>,
    pub executable_path: Field<String>,
    pub systemd_unit: Field<String>,
    pub direction: Field<String>,
    pub remote_addresses: Field<Vec<String>>,
    pub remote_ports: Field<Vec<String>>,
}

/// Reads a request body: a JSON object whose fields have the right types
/// (`InvalidRequestBody` otherwise). Unknown fields are ignored, as in the
/// rest of the API.
pub fn parse_input(body: &[u8]) -> Result<RuleInput, ApiError> {
    let object: Map<String, Value> = parse_body(body)?;
    Ok(RuleInput {
        name: text_field(&object, "Name")?,
        description: text_field(&object, "Description")?,
        executable_path: text_field(&object, "ExecutablePath")?,
        systemd_unit: text_field(&object, "SystemdUnit")?,
        direction: text_field(&object, "Direction")?,
        remote_addresses: list_field(&object, "RemoteAddresses", false)?,
        remote_ports: list_field(&object, "RemotePorts", true)?,
    })
}

fn wrong_type(name: &str, expected: &str) -> ApiError {
    ApiError::invalid_body(format!(
        "The request body has a field of the wrong type: {name} must be {expected}."
    ))
}

fn text_field(object: &Map<String, Value>, name: &str) -> Result<Field<String>, ApiError> {
    match object.get(name) {
        None => Ok(Field::Absent),
        Some(Value::Null) => Ok(Field::Null),
        Some(Value::String(text)) => Ok(Field::Value(text.clone())),
        Some(_) => Err(wrong_type(name, "a string")),
    }
}

/// A comma-separated string or an array of strings (and, for ports, of
/// integers).
fn list_field(
    object: &Map<String, Value>,
    name: &str,
    numbers: bool,
) -> Result<Field<Vec<String>>, ApiError> {
    let expected = if numbers {
        "a comma-separated string or an array of strings and integers"
    } else {
        "a comma-separated string or an array of strings"
    };
    match object.get(name) {
        None => Ok(Field::Absent),
        Some(Value::Null) => Ok(Field::Null),
        Some(Value::String(text)) => Ok(Field::Value(vec![text.clone()])),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(text.clone()),
                Value::Number(number) if numbers => Ok(number.to_string()),
                _ => Err(wrong_type(name, expected)),
            })
            .collect::<Result<_, _>>()
            .map(Field::Value),
        Some(_) => Err(wrong_type(name, expected)),
    }
}

// ---- checks ----------------------------------------------------------------

/// A checked change of one field: `None` keeps it, `Some(None)` clears it.
type Change<T> = Option<Option<T>>;

/// Checked and normalized changes to a rule's fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleChanges {
    name: Option<String>,
    description: Change<String>,
    executable_path: Change<String>,
    systemd_unit: Change<String>,
    /// `Some(None)`: both directions.
    direction: Change<String>,
    remote_addresses: Change<Vec<String>>,
    remote_ports: Change<Vec<String>>,
}

impl RuleChanges {
    /// Checks each field of `input`. A new rule (`creating`) needs a `Name`;
    /// a change may leave it out but not clear it. Optional text that is
    /// empty counts as null, and so does an empty list.
    pub fn check(input: RuleInput, creating: bool) -> Result<RuleChanges, ApiError> {
        let name = match input.name {
            Field::Value(name) if !name.trim().is_empty() => Some(name.trim().to_owned()),
            Field::Absent if !creating => None,
            _ => return Err(ApiError::missing_parameter("Name")),
        };
        if let Some(name) = &name {
            check_name(name)?;
        }
        Ok(RuleChanges {
            name,
            description: change(input.description, |text| {
                let text = text.trim();
                if text.chars().count() > MAX_DESCRIPTION {
                    return Err(ApiError::invalid_input(format!(
                        "Description is longer than {MAX_DESCRIPTION} characters."
                    )));
                }
                Ok((!text.is_empty()).then(|| text.to_owned()))
            })?,
            executable_path: change(input.executable_path, |text| {
                let text = text.trim();
                if text.is_empty() {
                    Ok(None)
                } else {
                    normalize_path(text).map(Some)
                }
            })?,
            systemd_unit: change(input.systemd_unit, |text| {
                let text = text.trim();
                if text.is_empty() {
                    Ok(None)
                } else {
                    check_unit(text).map(|()| Some(text.to_owned()))
                }
            })?,
            direction: change(input.direction, |text| parse_direction(&text))?,
            remote_addresses: change(input.remote_addresses, |items| {
                normalize_list(items, "RemoteAddresses", normalize_address)
            })?,
            remote_ports: change(input.remote_ports, |items| {
                normalize_list(items, "RemotePorts", normalize_ports)
            })?,
        })
    }

    /// The rule `current` with these changes, which must still have a
    /// condition.
    pub fn apply(&self, current: &ExclusionRuleFields) -> Result<ExclusionRuleFields, ApiError> {
        fn merge<T: Clone>(change: &Change<T>, current: &Option<T>) -> Option<T> {
            match change {
                None => current.clone(),
                Some(value) => value.clone(),
            }
        }
        let fields = ExclusionRuleFields {
            name: self.name.clone().unwrap_or_else(|| current.name.clone()),
            description: merge(&self.description, &current.description),
            executable_path: merge(&self.executable_path, &current.executable_path),
            systemd_unit: merge(&self.systemd_unit, &current.systemd_unit),
            direction: merge(&self.direction, &current.direction),
            remote_addresses: match &self.remote_addresses {
                None => current.remote_addresses.clone(),
                Some(value) => value.clone().unwrap_or_default(),
            },
            remote_ports: match &self.remote_ports {
                None => current.remote_ports.clone(),
                Some(value) => value.clone().unwrap_or_default(),
            },
        };
        check_rule(&fields)?;
        Ok(fields)
    }
}

/// The fields of a new rule from a request or the command line.
pub fn new_rule(input: RuleInput) -> Result<ExclusionRuleFields, ApiError> {
    RuleChanges::check(input, true)?.apply(&ExclusionRuleFields::default())
}

fn change<T, U>(
    field: Field<T>,
    check: impl FnOnce(T) -> Result<Option<U>, ApiError>,
) -> Result<Change<U>, ApiError> {
    match field {
        Field::Absent => Ok(None),
        Field::Null => Ok(Some(None)),
        Field::Value(value) => check(value).map(Some),
    }
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.chars().count() > MAX_NAME {
        return Err(ApiError::invalid_input(format!(
            "Name is longer than {MAX_NAME} characters."
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::invalid_input(
            "Name must not contain control characters.",
        ));
    }
    Ok(())
}

/// The conditions that make a rule: at least one, and not both an
/// executable and a unit (a process is matched by the one cgroup it is in,
/// see `crates/agent/src/exclusions.rs`, so no process could match both).
fn check_rule(fields: &ExclusionRuleFields) -> Result<(), ApiError> {
    if fields.executable_path.is_none()
        && fields.systemd_unit.is_none()
        && fields.remote_addresses.is_empty()
        && fields.remote_ports.is_empty()
    {
        return Err(ApiError::invalid_input(
            "A rule needs at least one condition: ExecutablePath, SystemdUnit, RemoteAddresses \
             or RemotePorts (a Direction alone is not a condition).",
        ));
    }
    if fields.executable_path.is_some() && fields.systemd_unit.is_some() {
        return Err(ApiError::invalid_input(
            "A rule can name an ExecutablePath or a SystemdUnit, not both; make two rules.",
        ));
    }
    Ok(())
}

/// An absolute path without `.` or `..` components, repeated slashes
/// collapsed (the kernel reports an executable by its canonical path, so
/// anything else would never match).
fn normalize_path(path: &str) -> Result<String, ApiError> {
    let invalid = |why: &str| {
        ApiError::invalid_input(format!(
            "ExecutablePath '{}' is not valid: {why}.",
            shorten(path)
        ))
    };
    if !path.starts_with('/') {
        return Err(invalid("it must be an absolute path"));
    }
    if path.len() > MAX_PATH {
        return Err(invalid(&format!("it is longer than {MAX_PATH} bytes")));
    }
    if path.chars().any(char::is_control) {
        return Err(invalid("it contains a control character"));
    }
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if components.iter().any(|c| *c == "." || *c == "..") {
        return Err(invalid("it must not contain '.' or '..' components"));
    }
    if components.is_empty() || path.ends_with('/') {
        return Err(invalid("it names a directory, not an executable"));
    }
    Ok(format!("/{}", components.join("/")))
}

/// A unit that has processes: a service, scope or slice.
fn check_unit(unit: &str) -> Result<(), ApiError> {
    let valid = unit.chars().count() <= MAX_UNIT
        && unit
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '@' | '-'))
        && [".service", ".scope", ".slice"]
            .iter()
            .any(|suffix| unit.len() > suffix.len() && unit.ends_with(suffix));
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid_input(format!(
            "SystemdUnit '{}' is not a unit name: use up to {MAX_UNIT} letters, digits and \
             ':_.@-', ending in .service, .scope or .slice.",
            shorten(unit)
        )))
    }
}

fn parse_direction(text: &str) -> Result<Option<String>, ApiError> {
    match text.trim() {
        t if t.eq_ignore_ascii_case("inbound") => Ok(Some("Inbound".into())),
        t if t.eq_ignore_ascii_case("outbound") => Ok(Some("Outbound".into())),
        t if t.eq_ignore_ascii_case("both") || t.is_empty() => Ok(None),
        _ => Err(ApiError::invalid_input(format!(
            "Direction '{}' is not valid; use Inbound, Outbound or Both.",
            shorten(text)
        ))),
    }
}

/// Splits entries at commas, normalizes each, drops duplicates (keeping
/// the first), and makes an empty list a null.
fn normalize_list(
    items: Vec<String>,
    field: &str,
    normalize: fn(&str) -> Option<String>,
) -> Result<Option<Vec<String>>, ApiError> {
    let mut out: Vec<String> = Vec::new();
    for item in items.iter().flat_map(|i| i.split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let normal = normalize(item).ok_or_else(|| {
            let what = if field == "RemotePorts" {
                "a port (1-65535) or a range such as 8000-8100"
            } else {
                "an IPv4 or IPv6 address or CIDR prefix"
            };
            ApiError::invalid_input(format!("{field}: '{}' is not {what}.", shorten(item)))
        })?;
        if !out.contains(&normal) {
            out.push(normal);
        }
        if out.len() > MAX_ITEMS {
            return Err(ApiError::invalid_input(format!(
                "{field} has more than {MAX_ITEMS} entries."
            )));
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

/// `198.18.0.5` → `198.18.0.5/32`; `10.1.2.3/8` → `10.0.0.0/8`;
/// `::ffff:198.18.0.5` → `198.18.0.5/32` (the kernel sees IPv4-mapped
/// traffic as IPv4).
pub fn normalize_address(text: &str) -> Option<String> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => {
            if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            (address, Some(prefix.parse::<u8>().ok()?))
        }
        None => (text, None),
    };
    let address: IpAddr = address.parse().ok()?;
    let (address, prefix) = match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) if prefix.is_none_or(|p| p >= 96) => (IpAddr::V4(v4), prefix.map(|p| p - 96)),
            _ => (address, prefix),
        },
        IpAddr::V4(_) => (address, prefix),
    };
    match address {
        IpAddr::V4(v4) => {
            let prefix = prefix.unwrap_or(32);
            if prefix > 32 {
                return None;
            }
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            let network = std::net::Ipv4Addr::from(u32::from(v4) & mask);
            Some(format!("{network}/{prefix}"))
        }
        IpAddr::V6(v6) => {
            let prefix = prefix.unwrap_or(128);
            if prefix > 128 {
                return None;
            }
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            let network = std::net::Ipv6Addr::from(u128::from(v6) & mask);
            Some(format!("{network}/{prefix}"))
        }
    }
}

/// `22` → `22`; ` 8000 - 8100 ` → `8000-8100`; `22-22` → `22`.
pub fn normalize_ports(text: &str) -> Option<String> {
    let range = parse_port_range(text)?;
    Some(if range.first == range.last {
        range.first.to_string()
    } else {
        format!("{}-{}", range.first, range.last)
    })
}

fn parse_port_range(text: &str) -> Option<PortRange> {
    let port = |p: &str| -> Option<u16> {
        let p = p.trim();
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse::<u16>().ok().filter(|p| *p >= 1)
    };
    let (first, last) = match text.split_once('-') {
        Some((first, last)) => (port(first)?, port(last)?),
        None => (port(text)?, port(text)?),
    };
    (first <= last).then_some(PortRange { first, last })
}

// ---- what clients and agents see -------------------------------------------

/// The REST entity of a rule.
pub fn entity(rule: &ExclusionRuleRecord) -> proto::api::ExclusionRule {
    let f = &rule.fields;
    proto::api::ExclusionRule {
        id: rule.id.clone(),
        name: f.name.clone(),
        description: f.description.clone(),
        executable_path: f.executable_path.clone(),
        systemd_unit: f.systemd_unit.clone(),
        direction: f.direction.clone().unwrap_or_else(|| "Both".into()),
        remote_addresses: f.remote_addresses.clone(),
        remote_ports: f.remote_ports.clone(),
        created_date_time_utc: format_utc(rule.created_at),
        last_update_date_time_utc: format_utc(rule.updated_at),
        version: rule.version,
    }
}

/// A rule as its agent receives it.
pub fn spec(id: &str, f: &ExclusionRuleFields) -> ExclusionSpec {
    ExclusionSpec {
        id: id.to_owned(),
        name: f.name.clone(),
        executable_path: f.executable_path.clone(),
        systemd_unit: f.systemd_unit.clone(),
        direction: f.direction.clone(),
        remote_addresses: f.remote_addresses.clone(),
        remote_ports: f
            .remote_ports
            .iter()
            .filter_map(|p| parse_port_range(p))
            .collect(),
    }
}

/// The message that gives an agent the rule set.
pub fn message(set: &store::ExclusionRuleSet) -> ServerMessage {
    ServerMessage::Exclusions {
        version: set.version,
        rules: set.rules.iter().map(|r| spec(&r.id, &r.fields)).collect(),
    }
}

/// Sends the current rule set to every live agent session (each session
/// skips a version it already has). A failure is logged; the watcher in
/// `lib.rs` tries again within a second.
pub async fn publish(state: &AppState) {
    match state.store.exclusion_rule_set().await {
        Ok(set) => state.gateway.push_exclusions(&set),
        Err(e) => tracing::warn!(error = %e, "could not read the exclusion rules to push"),
    }
}

// ---- changes, shared with the command line ---------------------------------

/// Refuses a rule set that would be too large to send to agents: `rules`
/// with `changed` (the rule `id`) added or replaced.
fn check_size(
    rules: &[ExclusionRuleRecord],
    id: &str,
    changed: &ExclusionRuleFields,
) -> Result<(), ApiError> {
    let mut specs: Vec<ExclusionSpec> = rules
        .iter()
        .filter(|r| r.id != id)
        .map(|r| spec(&r.id, &r.fields))
        .collect();
    specs.push(spec(id, changed));
    let size = serde_json::to_vec(&ServerMessage::Exclusions {
        version: i64::MAX,
        rules: specs,
    })
    .map_err(ApiError::internal)?
    .len();
    if size > MAX_RULE_SET_BYTES {
        return Err(ApiError::bad_request(format!(
            "The exclusion rules would take {size} bytes, more than the {MAX_RULE_SET_BYTES} \
             that agents are sent; shorten or remove rules."
        )));
    }
    Ok(())
}

fn conflict(name: &str) -> ApiError {
    ApiError::conflict(format!(
        "An exclusion rule named '{}' already exists.",
        shorten(name)
    ))
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("Exclusion rule {id} was not found."))
}

/// Stores a new rule (checked with [`new_rule`]).
pub async fn create_rule(
    store: &Store,
    fields: ExclusionRuleFields,
) -> Result<ExclusionRuleRecord, ApiError> {
    let id = crypto::new_guid();
    check_size(&store.list_exclusion_rules().await?, &id, &fields)?;
    match store
        .create_exclusion_rule(id, fields, crate::now_nanos())
        .await
    {
        Ok(rule) => Ok(rule),
        Err(StoreError::Conflict(name)) => Err(conflict(&name)),
        Err(e) => Err(e.into()),
    }
}

/// Changes a rule atomically.
pub async fn update_rule(
    store: &Store,
    id: &str,
    changes: RuleChanges,
) -> Result<ExclusionRuleRecord, ApiError> {
    let rules = store.list_exclusion_rules().await?;
    let rule_id = id.to_owned();
    let outcome = store
        .update_exclusion_rule(id, crate::now_nanos(), move |current| {
            let fields = changes.apply(&current.fields)?;
            check_size(&rules, &rule_id, &fields)?;
            Ok(fields)
        })
        .await;
    match outcome {
        Ok(result) => result,
        Err(StoreError::NotFound) => Err(not_found(id)),
        Err(StoreError::Conflict(name)) => Err(conflict(&name)),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a rule.
pub async fn delete_rule(store: &Store, id: &str) -> Result<(), ApiError> {
    match store.delete_exclusion_rule(id).await {
        Ok(_) => Ok(()),
        Err(StoreError::NotFound) => Err(not_found(id)),
        Err(e) => Err(e.into()),
    }
}

// ---- the endpoints -----------------------------------------------------------

fn rule_id_param(id: &str) -> Result<String, ApiError> {
    crate::api::guid_param(id, "an exclusion rule id")
}

/// These endpoints take no query options; a `$` option is refused as
/// elsewhere, anything else ignored.
fn no_query_options(uri: &axum::http::Uri) -> Result<(), ApiError> {
    let query = uri.query().unwrap_or("");
    match form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key.starts_with('$')) {
        Some((key, _)) => Err(ApiError::odata(format!(
            "The query option '{}' is not supported on isolation exclusion rules.",
            shorten(&key)
        ))),
        None => Ok(()),
    }
}

async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Result<Response, ApiError> {
    principal.require(Permission::Settings)?;
    no_query_options(&uri)?;
    let rules = state.store.list_exclusion_rules().await?;
    let value: Vec<proto::api::ExclusionRule> = rules.iter().map(entity).collect();
    let body = serde_json::json!({
        "@odata.context": context_url(&headers, &state, "IsolationExclusionRules"),
        "value": value,
    });
    Ok(json_response(
        StatusCode::OK,
        serde_json::to_vec(&body).map_err(ApiError::internal)?,
    ))
}

async fn get_one(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    IdParam(id): IdParam,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Result<Response, ApiError> {
    principal.require(Permission::Settings)?;
    no_query_options(&uri)?;
    let id = rule_id_param(&id)?;
    let rule = state
        .store
        .get_exclusion_rule(&id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(rule_response(StatusCode::OK, &state, &headers, &rule))
}

async fn create(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    principal.require(Permission::Settings)?;
    require_json(&headers)?;
    let fields = new_rule(parse_input(&body)?)?;
    let rule = create_rule(&state.store, fields).await?;
    tracing::info!(rule_id = %rule.id, version = rule.version, by = %principal.display_name, "exclusion rule created");
    publish(&state).await;
    Ok(rule_response(StatusCode::CREATED, &state, &headers, &rule))
}

async fn update(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    IdParam(id): IdParam,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    principal.require(Permission::Settings)?;
    require_json(&headers)?;
    let changes = RuleChanges::check(parse_input(&body)?, false)?;
    let id = rule_id_param(&id)?;
    let rule = update_rule(&state.store, &id, changes).await?;
    tracing::info!(rule_id = %rule.id, version = rule.version, by = %principal.display_name, "exclusion rule updated");
    publish(&state).await;
    Ok(rule_response(StatusCode::OK, &state, &headers, &rule))
}

async fn delete(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    IdParam(id): IdParam,
) -> Result<Response, ApiError> {
    principal.require(Permission::Settings)?;
    let id = rule_id_param(&id)?;
    delete_rule(&state.store, &id).await?;
    tracing::info!(rule_id = %id, by = %principal.display_name, "exclusion rule deleted");
    publish(&state).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn rule_response(
    status: StatusCode,
    state: &AppState,
    headers: &HeaderMap,
    rule: &ExclusionRuleRecord,
) -> Response {
    entity_response(
        status,
        &context_url(headers, state, "IsolationExclusionRules/$entity"),
        entity(rule),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(body: Value) -> Result<RuleInput, ApiError> {
        parse_input(body.to_string().as_bytes())
    }

    fn new(body: Value) -> Result<ExclusionRuleFields, ApiError> {
        new_rule(input(body)?)
    }

    /// The error's code and message.
    fn refused(body: Value) -> (&'static str, String) {
        let e = new(body).expect_err("refused");
        (e.code, e.message)
    }

    #[test]
    fn addresses_are_normalized_to_their_network() {
        for (given, normal) in [
            ("198.18.0.5", Some("198.18.0.5/32")),
            ("10.1.2.3/8", Some("10.0.0.0/8")),
            ("0.0.0.0/0", Some("0.0.0.0/0")),
            ("192.168.1.255/31", Some("192.168.1.254/31")),
            ("fd00::1", Some("fd00::1/128")),
            ("FD00:0:0:0::1/64", Some("fd00::/64")),
            ("::/0", Some("::/0")),
            ("::ffff:198.18.0.5", Some("198.18.0.5/32")),
            ("::ffff:198.18.0.0/120", Some("198.18.0.0/24")),
            ("::ffff:0:0/80", Some("::/80")),
            ("10.0.0.1/33", None),
            ("10.0.0.300", None),
            ("10.0.0.1/", None),
            ("10.0.0.1/+8", None),
            ("10.0.0.1/0008", None),
            ("fd00::/129", None),
            ("fe80::1%eth0", None),
            ("010.0.0.1", None),
            ("example.com", None),
            ("", None),
        ] {
            assert_eq!(normalize_address(given).as_deref(), normal, "{given}");
        }
    }

    #[test]
    fn ports_and_ranges() {
        for (given, normal) in [
            ("22", Some("22")),
            ("65535", Some("65535")),
            ("8000-8100", Some("8000-8100")),
            (" 8000 - 8100 ", Some("8000-8100")),
            ("22-22", Some("22")),
            ("022", Some("22")),
            ("0", None),
            ("65536", None),
            ("100-99", None),
            ("-1", None),
            ("+22", None),
            ("1-2-3", None),
            ("22.5", None),
            ("ssh", None),
        ] {
            assert_eq!(normalize_ports(given).as_deref(), normal, "{given}");
        }
    }

    #[test]
    fn a_new_rule_is_checked_and_normalized() {
        let rule = new(serde_json::json!({
            "Name": "  SSH from the jump hosts ",
            "Description": "",
            "SystemdUnit": "sshd.service",
            "Direction": "inbound",
            "RemoteAddresses": "198.18.0.5, 10.1.2.3/8,198.18.0.5/32",
            "RemotePorts": [22, "8000 - 8100", "22"],
            "Unknown": {"ignored": true},
        }))
        .unwrap();
        assert_eq!(
            rule,
            ExclusionRuleFields {
                name: "SSH from the jump hosts".into(),
                description: None,
                executable_path: None,
                systemd_unit: Some("sshd.service".into()),
                direction: Some("Inbound".into()),
                remote_addresses: vec!["198.18.0.5/32".into(), "10.0.0.0/8".into()],
                remote_ports: vec!["22".into(), "8000-8100".into()],
            }
        );
        let rule = new(serde_json::json!({
            "Name": "curl", "ExecutablePath": "//usr//bin/curl", "Direction": "BOTH",
            "RemoteAddresses": ["fd00::/64"], "RemotePorts": null,
        }))
        .unwrap();
        assert_eq!(rule.executable_path.as_deref(), Some("/usr/bin/curl"));
        assert_eq!(rule.direction, None);
        assert!(rule.remote_ports.is_empty());
    }

    #[test]
    fn bad_rules_are_refused_with_the_field_and_value_named() {
        use serde_json::json;
        for (body, code, says) in [
            (
                json!({"Name": 5, "RemotePorts": "22"}),
                "InvalidRequestBody",
                "Name",
            ),
            (
                json!({"Name": "x", "RemotePorts": true}),
                "InvalidRequestBody",
                "RemotePorts",
            ),
            (
                json!({"Name": "x", "RemoteAddresses": [1]}),
                "InvalidRequestBody",
                "RemoteAddresses",
            ),
            (
                json!({"Name": "x", "RemotePorts": [[22]]}),
                "InvalidRequestBody",
                "RemotePorts",
            ),
            (
                json!({"Name": "x", "Direction": 1, "RemotePorts": "22"}),
                "InvalidRequestBody",
                "Direction",
            ),
            (
                json!({"RemotePorts": "22"}),
                "MissingRequiredParameter",
                "Parameter Name is missing.",
            ),
            (
                json!({"Name": null, "RemotePorts": "22"}),
                "MissingRequiredParameter",
                "Name",
            ),
            (
                json!({"Name": "  ", "RemotePorts": "22"}),
                "MissingRequiredParameter",
                "Name",
            ),
            // The missing name is reported before a bad value.
            (
                json!({"RemotePorts": "0"}),
                "MissingRequiredParameter",
                "Name",
            ),
            (
                json!({"Name": "x".repeat(201), "RemotePorts": "22"}),
                "InvalidInput",
                "Name",
            ),
            (
                json!({"Name": "a\nb", "RemotePorts": "22"}),
                "InvalidInput",
                "Name",
            ),
            (
                json!({"Name": "x", "Description": "d".repeat(1001), "RemotePorts": "22"}),
                "InvalidInput",
                "Description",
            ),
            (
                json!({"Name": "x"}),
                "InvalidInput",
                "at least one condition",
            ),
            (
                json!({"Name": "x", "Direction": "Inbound"}),
                "InvalidInput",
                "at least one condition",
            ),
            (
                json!({"Name": "x", "RemoteAddresses": "", "RemotePorts": []}),
                "InvalidInput",
                "at least one condition",
            ),
            (
                json!({"Name": "x", "ExecutablePath": "bin/sh"}),
                "InvalidInput",
                "ExecutablePath 'bin/sh'",
            ),
            (
                json!({"Name": "x", "ExecutablePath": "/usr/bin/../sh"}),
                "InvalidInput",
                "ExecutablePath",
            ),
            (
                json!({"Name": "x", "ExecutablePath": "/usr/bin/"}),
                "InvalidInput",
                "ExecutablePath",
            ),
            (
                json!({"Name": "x", "ExecutablePath": "/a\u{0}b"}),
                "InvalidInput",
                "ExecutablePath",
            ),
            (
                json!({"Name": "x", "ExecutablePath": format!("/{}", "a".repeat(4096))}),
                "InvalidInput",
                "ExecutablePath",
            ),
            (
                json!({"Name": "x", "SystemdUnit": "sshd"}),
                "InvalidInput",
                "SystemdUnit 'sshd'",
            ),
            (
                json!({"Name": "x", "SystemdUnit": "ss hd.service"}),
                "InvalidInput",
                "SystemdUnit",
            ),
            (
                json!({"Name": "x", "SystemdUnit": ".service"}),
                "InvalidInput",
                "SystemdUnit",
            ),
            (
                json!({"Name": "x", "SystemdUnit": "sshd.socket"}),
                "InvalidInput",
                "SystemdUnit",
            ),
            (
                json!({"Name": "x", "SystemdUnit": "sshd.service", "ExecutablePath": "/usr/sbin/sshd"}),
                "InvalidInput",
                "not both",
            ),
            (
                json!({"Name": "x", "Direction": "Sideways", "RemotePorts": "22"}),
                "InvalidInput",
                "Direction 'Sideways'",
            ),
            (
                json!({"Name": "x", "RemoteAddresses": "10.0.0.0/33"}),
                "InvalidInput",
                "RemoteAddresses: '10.0.0.0/33'",
            ),
            (
                json!({"Name": "x", "RemoteAddresses": ["198.18.0.1", "bogus"]}),
                "InvalidInput",
                "'bogus'",
            ),
            (
                json!({"Name": "x", "RemotePorts": "70000"}),
                "InvalidInput",
                "RemotePorts: '70000'",
            ),
            (
                json!({"Name": "x", "RemotePorts": [0]}),
                "InvalidInput",
                "RemotePorts: '0'",
            ),
            (
                json!({"Name": "x", "RemotePorts": "9-1"}),
                "InvalidInput",
                "'9-1'",
            ),
            (
                json!({"Name": "x", "RemotePorts": (1..=257).map(|p| p.to_string()).collect::<Vec<_>>()}),
                "InvalidInput",
                "more than 256",
            ),
        ] {
            let (got, message) = refused(body.clone());
            assert_eq!(got, code, "{body}: {message}");
            assert!(message.contains(says), "{body}: {message}");
        }
        for body in ["[]", "\"x\"", "{", ""] {
            let e = parse_input(body.as_bytes()).expect_err(body);
            assert_eq!(e.code, "InvalidRequestBody", "{body}");
        }
    }

    #[test]
    fn a_change_keeps_what_it_does_not_name_and_clears_nulls() {
        let current = new(serde_json::json!({
            "Name": "web", "Description": "d", "ExecutablePath": "/usr/bin/curl",
            "Direction": "Outbound", "RemotePorts": "443",
        }))
        .unwrap();
        let change = |body: Value| {
            RuleChanges::check(input(body).unwrap(), false).and_then(|c| c.apply(&current))
        };
        assert_eq!(change(serde_json::json!({})).unwrap(), current);
        let changed = change(
            serde_json::json!({"Description": null, "Direction": "Both", "RemotePorts": "80,443"}),
        )
        .unwrap();
        assert_eq!(changed.description, None);
        assert_eq!(changed.direction, None);
        assert_eq!(changed.remote_ports, ["80", "443"]);
        assert_eq!(changed.executable_path, current.executable_path);
        assert_eq!(changed.name, "web");
        // One condition left is fine; none is not.
        assert!(change(serde_json::json!({"RemotePorts": null})).is_ok());
        let e =
            change(serde_json::json!({"RemotePorts": null, "ExecutablePath": null})).unwrap_err();
        assert!(
            e.message.contains("at least one condition"),
            "{}",
            e.message
        );
        let e = change(serde_json::json!({"Name": null})).unwrap_err();
        assert_eq!(e.code, "MissingRequiredParameter");
        let e = change(serde_json::json!({"SystemdUnit": "x.service"})).unwrap_err();
        assert!(e.message.contains("not both"), "{}", e.message);
        assert!(
            change(serde_json::json!({"SystemdUnit": "x.service", "ExecutablePath": null})).is_ok()
        );
    }

    #[test]
    fn agents_get_ranges_and_none_for_both_directions() {
        let fields = new(serde_json::json!({
            "Name": "x", "RemotePorts": "22,8000-8100", "RemoteAddresses": "198.18.0.5",
        }))
        .unwrap();
        let spec = spec("id", &fields);
        assert_eq!(spec.direction, None);
        assert_eq!(
            spec.remote_ports,
            [
                PortRange {
                    first: 22,
                    last: 22
                },
                PortRange {
                    first: 8000,
                    last: 8100
                }
            ]
        );
        assert_eq!(spec.remote_addresses, ["198.18.0.5/32"]);
    }

    #[test]
    fn the_rule_set_must_fit_in_a_message() {
        let big = ExclusionRuleFields {
            name: "big".into(),
            remote_addresses: (0..256).map(|i| format!("fd00::{i:x}/128")).collect(),
            ..Default::default()
        };
        let rules: Vec<ExclusionRuleRecord> = (0..200)
            .map(|i| ExclusionRuleRecord {
                seq: i,
                id: format!("{i}"),
                fields: big.clone(),
                created_at: 0,
                updated_at: 0,
                version: 1,
            })
            .collect();
        assert!(check_size(&rules[..10], "new", &big).is_ok());
        let e = check_size(&rules, "new", &big).unwrap_err();
        assert_eq!(e.code, "BadRequest");
        // Replacing a rule counts it once.
        assert!(check_size(&rules[..10], "3", &big).is_ok());
    }
}
