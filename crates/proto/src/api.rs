//! Bodies of the public REST API (the Defender for Endpoint machine-isolation
//! subset) and its error body.

use serde::{Deserialize, Serialize};

/// The error body: `{"error":{"code":…,"message":…,"target":…}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    /// The request id of the failed request.
    pub target: String,
    /// Only on `ActiveRequestAlreadyExists`: the in-flight action to follow.
    #[serde(
        rename = "activeActionId",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub active_action_id: Option<String>,
}

/// `POST /api/machines/{id}/isolate`. Every field is optional at this level;
/// the server decides what is missing, so that a missing `Comment` gets its
/// own error code instead of a generic parse error.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IsolateRequest {
    #[serde(rename = "Comment", default)]
    pub comment: Option<String>,
    #[serde(rename = "IsolationType", default)]
    pub isolation_type: Option<String>,
    #[serde(rename = "ExternalId", default)]
    pub external_id: Option<String>,
    #[serde(rename = "Title", default)]
    pub title: Option<String>,
}

/// `POST /api/machines/{id}/unisolate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UnisolateRequest {
    #[serde(rename = "Comment", default)]
    pub comment: Option<String>,
    #[serde(rename = "ExternalId", default)]
    pub external_id: Option<String>,
    #[serde(rename = "Title", default)]
    pub title: Option<String>,
}

/// `POST /api/machines/{id}/tags`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TagRequest {
    #[serde(rename = "Value", default)]
    pub value: Option<String>,
    /// `Add` or `Remove`.
    #[serde(rename = "Action", default)]
    pub action: Option<String>,
}

/// `POST /api/machineactions/{id}/cancel`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CancelRequest {
    #[serde(rename = "Comment", default)]
    pub comment: Option<String>,
}

/// **Cordon:** the machines of `POST /api/machines/isolate` and
/// `POST /api/machines/unisolate` (bulk isolation), beside the single
/// call's fields: exactly one of the two, `null` meaning absent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BulkTargets {
    #[serde(rename = "MachineIds", default)]
    pub machine_ids: Option<Vec<String>>,
    /// A `$filter` expression of `GET /api/machines`.
    #[serde(rename = "Filter", default)]
    pub filter: Option<String>,
}

/// **Cordon:** one machine's outcome in a bulk isolation answer: `status`
/// `201` with the created action, or the status and error the single call
/// would have answered for that machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkActionResult {
    pub machine_id: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub machine_action: Option<MachineAction>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<ErrorDetail>,
}

/// The MachineAction entity; field order is the contract's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MachineAction {
    pub id: String,
    #[serde(rename = "type")]
    pub action_type: String,
    pub title: Option<String>,
    pub requestor: String,
    pub requestor_comment: String,
    pub status: String,
    pub machine_id: String,
    pub computer_dns_name: Option<String>,
    pub creation_date_time_utc: String,
    pub last_update_date_time_utc: String,
    pub cancellation_requestor: Option<String>,
    pub cancellation_comment: Option<String>,
    pub cancellation_date_time_utc: Option<String>,
    pub error_h_result: i64,
    pub scope: Option<String>,
    pub external_id: Option<String>,
    pub request_source: String,
    pub related_file_info: Option<serde_json::Value>,
    pub commands: Vec<serde_json::Value>,
    pub troubleshoot_info: Option<String>,
}

/// One entry of the Machine entity's `ipAddresses`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IpAddress {
    pub ip_address: String,
    pub mac_address: Option<String>,
    #[serde(rename = "type")]
    pub address_type: String,
    pub operational_status: String,
}

/// The Machine entity: the documented fields plus Cordon's isolation fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    pub id: String,
    pub computer_dns_name: String,
    pub first_seen: String,
    pub last_seen: Option<String>,
    pub os_platform: Option<String>,
    pub os_version: Option<String>,
    pub version: Option<String>,
    pub os_processor: Option<String>,
    pub os_architecture: Option<String>,
    pub os_build: Option<i64>,
    pub agent_version: Option<String>,
    pub last_ip_address: Option<String>,
    pub last_external_ip_address: Option<String>,
    pub health_status: String,
    pub onboarding_status: String,
    pub rbac_group_id: i64,
    pub rbac_group_name: Option<String>,
    pub risk_score: String,
    pub exposure_level: String,
    pub device_value: String,
    pub aad_device_id: Option<String>,
    pub is_aad_joined: bool,
    pub machine_tags: Vec<String>,
    pub ip_addresses: Vec<IpAddress>,
    pub isolation_state: String,
    pub isolation_scope: Option<String>,
    /// Cordon: how often the agent found its isolation rules removed or
    /// changed (and restored them), and when it last did.
    pub tamper_count: i64,
    pub last_tamper_date_time_utc: Option<String>,
    /// Cordon: the exclusion rule-set version the agent runs (Selective
    /// isolation only).
    pub exclusion_rules_version: Option<i64>,
}

/// Cordon extension: an isolation exclusion rule (`/api/isolationExclusionRules`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExclusionRule {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub executable_path: Option<String>,
    pub systemd_unit: Option<String>,
    /// `Inbound`, `Outbound` or `Both`.
    pub direction: String,
    pub remote_addresses: Vec<String>,
    /// Ports and ranges, such as `22` or `8000-8100`.
    pub remote_ports: Vec<String>,
    pub created_date_time_utc: String,
    pub last_update_date_time_utc: String,
    /// The rule-set version this rule's last change produced.
    pub version: i64,
}

/// Cordon: one record of the audit trail (`GET /api/auditEvents`, and the
/// lines of `cordon audit export`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    pub id: String,
    pub date_time_utc: String,
    /// `<client id> (<display name>)` of the caller, or `anonymous`.
    pub principal: String,
    pub source_address: String,
    pub request_id: String,
    pub method: String,
    /// The request's path.
    pub target: String,
    /// What was attempted: `isolate`, `unisolate`, `cancel`,
    /// `exclusion.create`, `token`, `enroll`, …
    pub action: String,
    /// `Succeeded`, `Refused` or `Failed`.
    pub outcome: String,
    /// The HTTP status of the response.
    pub status: i64,
    pub detail: Option<String>,
    /// How many calls the record stands for: 1, or more when repeated
    /// refusals from one source were folded into one record.
    pub count: i64,
    pub hash: String,
    pub previous_hash: String,
}

/// Cordon extension: the caller of `GET /api/me`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Caller {
    /// The application's client id, or the user's object id.
    pub id: String,
    /// The application's name, or the user's display name.
    pub display_name: String,
    /// `user` or `application`.
    pub kind: String,
    /// The user's name; null for an application.
    pub upn: Option<String>,
    /// The user's role; null for an application or a user without one.
    pub role: Option<String>,
    pub permissions: CallerPermissions,
    /// The machine groups the caller reaches; null: all of them.
    pub machine_groups: Option<Vec<MachineGroupRef>>,
    /// Every machine group whose machines the caller sees, by name (the
    /// default group first): what a filter by group can offer.
    pub visible_machine_groups: Vec<MachineGroupRef>,
}

/// What each permission check would answer for the caller.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct CallerPermissions {
    pub read: bool,
    pub isolate: bool,
    pub settings: bool,
    pub audit: bool,
}

/// A machine group, by id and name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineGroupRef {
    pub id: i64,
    pub name: String,
}

/// Cordon extension: the body of a live event (`GET /api/events`), the
/// Standard Webhooks payload shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventPayload<T> {
    /// The event's type, as its SSE `event:` field.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When it was published (UTC).
    pub timestamp: String,
    pub data: T,
}

/// Cordon extension: the `data` of an `exclusionRule.changed` event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExclusionRuleChange {
    /// The rule's id; null for a change made outside the API (the CLI).
    pub id: Option<String>,
    /// `created`, `updated`, `deleted`, or `changed` (outside the API).
    pub change: String,
    /// The rule as the API returns it; null once deleted, or for `changed`.
    pub rule: Option<ExclusionRule>,
}

/// Cordon extension: the `data` of a `machine.tamperDetected` event: the
/// machine, and what its agent found changed in its isolation rules (the
/// agent put them back).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TamperReport {
    pub machine: Machine,
    /// What the agent found, in its words.
    pub detail: String,
    /// How many tamper reports the machine has sent in all.
    pub tamper_count: i64,
}

/// Cordon extension: a webhook (`/api/webhooks`, `cordon webhook`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub id: String,
    /// The receiver: an `https://` URL.
    pub url: String,
    /// The event types it receives.
    pub events: Vec<String>,
    pub description: Option<String>,
    pub created_by: String,
    pub created_date_time_utc: String,
    /// Whether the receiver's certificate is checked against the webhook's
    /// own CA certificates (`false`: the system's roots).
    pub custom_ca: bool,
    /// The signing secret (`whsec_…`): only in the answer that created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// Cordon extension: one delivery of one event to one webhook.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDelivery {
    /// The `webhook-id` header of every attempt.
    pub id: String,
    pub webhook_id: String,
    /// The event's id (as on `GET /api/events`).
    pub event_id: i64,
    pub event_type: String,
    /// `Pending`, `Delivered` or `Failed`.
    pub status: String,
    pub created_date_time_utc: String,
    pub attempts: Vec<WebhookAttempt>,
    pub next_attempt_date_time_utc: Option<String>,
    pub delivered_date_time_utc: Option<String>,
}

/// Cordon extension: one attempt of a webhook delivery.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAttempt {
    pub date_time_utc: String,
    /// The receiver's HTTP status (`null`: no answer).
    pub status_code: Option<i64>,
    /// What went wrong (`null`: delivered).
    pub error: Option<String>,
    pub duration_ms: i64,
}
