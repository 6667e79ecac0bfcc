//! The agent protocol (see `docs/agent-protocol.md`).
//!
//! Enrollment is one HTTPS request. The session is one long-lived TLS
//! connection, upgraded from `GET /agent/v1/session`, that carries one JSON
//! object per line in each direction.

use serde::{Deserialize, Serialize};

/// Path of the enrollment endpoint.
pub const ENROLL_PATH: &str = "/agent/v1/enroll";
/// Path of the health endpoint an agent uses to prove its channel works.
pub const HEALTH_PATH: &str = "/agent/v1/health";
/// Path of the session endpoint (HTTP/1.1 upgrade).
pub const SESSION_PATH: &str = "/agent/v1/session";
/// Value of the `Upgrade` header that opens a session.
pub const SESSION_PROTOCOL: &str = "cordon-agent/1";
/// ALPN protocol an agent offers (before `http/1.1`, which the server
/// picks) on the connection it opens a session on, so the server counts the
/// connection in the agents' share from its TLS ClientHello on.
pub const SESSION_ALPN: &[u8] = b"cordon-agent/1";
/// Longest line either side accepts, in bytes.
pub const MAX_LINE: usize = 1 << 20;
/// Most addresses host facts may list; the agent sends its first ones.
pub const MAX_ADDRESSES: usize = 64;
/// Longest text value of host facts, in characters.
pub const MAX_FACT_LENGTH: usize = 256;
/// TLS exporter label that binds session proofs to one TLS connection.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-cordon-agent-session";

/// The bytes an agent signs to prove possession of its key at enrollment.
pub fn enroll_proof_message(token: &str, public_key_b64: &str) -> Vec<u8> {
    format!("cordon-enroll-v1\n{token}\n{public_key_b64}").into_bytes()
}

/// The bytes an agent signs to open a session: the server's nonce and the
/// TLS exporter value of this connection, so a proof can't be replayed on
/// another connection.
pub fn session_proof_message(machine_id: &str, nonce_b64: &str, exporter_b64: &str) -> Vec<u8> {
    format!("cordon-session-v1\n{machine_id}\n{nonce_b64}\n{exporter_b64}").into_bytes()
}

/// `POST /agent/v1/enroll`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollRequest {
    pub token: String,
    /// Ed25519 public key, base64 (standard alphabet) of the 32 raw bytes.
    pub public_key: String,
    /// Ed25519 signature of [`enroll_proof_message`], base64.
    pub proof: String,
    pub facts: HostFacts,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollResponse {
    pub machine_id: String,
}

/// `code` of an [`AgentError`] when an enrollment is answered 503 (with
/// `Retry-After`): the server has as many enrollments in progress as it
/// takes and turns the caller away for a while. (A session is refused
/// with [`UNAVAILABLE`] instead.)
pub const SERVER_BUSY: &str = "ServerBusy";
/// `code` of a `refused` session message that asks the agent to come back
/// later (overload, a full share of sessions, a store error).
pub const UNAVAILABLE: &str = "Unavailable";

/// Error body of the agent endpoints (enrollment and a refused upgrade).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentError {
    pub code: String,
    pub reason: String,
}

/// What the agent reports about its host.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostFacts {
    pub computer_dns_name: String,
    #[serde(default)]
    pub os_platform: Option<String>,
    #[serde(default)]
    pub os_version: Option<String>,
    #[serde(default)]
    pub os_processor: Option<String>,
    #[serde(default)]
    pub os_architecture: Option<String>,
    #[serde(default)]
    pub os_build: Option<i64>,
    #[serde(default)]
    pub agent_version: Option<String>,
    #[serde(default)]
    pub addresses: Vec<HostAddress>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostAddress {
    pub ip_address: String,
    #[serde(default)]
    pub mac_address: Option<String>,
    /// Interface type, such as `Ethernet` or `SoftwareLoopback`.
    #[serde(default)]
    pub interface_type: Option<String>,
    /// `Up` or `Down`.
    #[serde(default)]
    pub operational_status: Option<String>,
}

/// What the agent has in force now.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Enforced {
    #[default]
    NotIsolated,
    Full,
    Selective,
}

/// Messages from the server to the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerMessage {
    /// First message of every session.
    Challenge { nonce: String },
    /// The agent's proof was accepted.
    #[serde(rename_all = "camelCase")]
    Welcome {
        machine_id: String,
        heartbeat_seconds: u64,
    },
    /// The session is refused or ended; the connection closes after it.
    #[serde(rename_all = "camelCase")]
    Refused {
        code: String,
        reason: String,
        /// With `Unavailable`: seconds to wait before trying again, which
        /// the server spreads over the crowd it turns away. Absent in other
        /// refusals (and from older servers).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_seconds: Option<u64>,
    },
    /// An action to execute. Delivery is at-least-once.
    Action(ActionOrder),
    /// Answer to `Ack`: go ahead and apply.
    #[serde(rename_all = "camelCase")]
    Proceed { action_id: String },
    /// The isolation exclusion rules, sent after `Welcome` and whenever they
    /// change. Only Selective isolation honours them.
    Exclusions {
        version: i64,
        rules: Vec<ExclusionSpec>,
    },
    /// Answer to `Ack`: the action is no longer to be applied (cancelled,
    /// timed out, or already finished).
    #[serde(rename_all = "camelCase")]
    Withdrawn { action_id: String, status: String },
    /// A message type of a newer server that this agent doesn't know:
    /// ignored, so that a server may add messages within `cordon-agent/1`
    /// without breaking the agents already out there. Never sent.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ActionOrder {
    pub action_id: String,
    pub machine_id: String,
    /// `Isolate` or `Unisolate`.
    pub action_type: String,
    /// `Full` or `Selective` for Isolate.
    pub scope: Option<String>,
    pub created: String,
}

/// Messages from the agent to the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum AgentMessage {
    /// Answer to `Challenge`.
    #[serde(rename_all = "camelCase")]
    Hello {
        machine_id: String,
        /// Ed25519 signature of [`session_proof_message`], base64.
        proof: String,
        facts: HostFacts,
        enforced: Enforced,
    },
    /// The agent received an action and wants to start it.
    #[serde(rename_all = "camelCase")]
    Ack { action_id: String },
    /// The outcome of an action.
    #[serde(rename_all = "camelCase")]
    Result {
        action_id: String,
        succeeded: bool,
        #[serde(default)]
        error_h_result: i64,
        #[serde(default)]
        reason: Option<String>,
        enforced: Enforced,
    },
    /// Liveness, with what is in force now.
    #[serde(rename_all = "camelCase")]
    Heartbeat {
        enforced: Enforced,
        /// The exclusion rule-set version in force (Selective isolation only).
        #[serde(default)]
        exclusion_version: Option<i64>,
    },
    /// The outcome of applying an exclusion rule set received while
    /// isolated Selectively.
    #[serde(rename_all = "camelCase")]
    ExclusionsApplied {
        version: i64,
        succeeded: bool,
        #[serde(default)]
        reason: Option<String>,
    },
    /// New host facts.
    Facts(HostFacts),
    /// Someone removed or changed Cordon's table; the agent restored it.
    #[serde(rename_all = "camelCase")]
    Tamper { detail: String, restored: bool },
}

/// What `cordon-agent enroll` keeps in its state directory (`identity.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoredIdentity {
    pub machine_id: String,
    /// Base URL of the server, such as `https://cordon.example.com:8443`.
    pub server: String,
    /// The computer name given at enrollment (`--name`), reported instead of
    /// the host name. Absent in identities saved before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What the agent keeps on disk about what it enforces (`state.json`),
/// written before success is reported and re-applied at start and boot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SavedState {
    pub enforced: Enforced,
    /// The server's addresses when isolation was applied.
    #[serde(default)]
    pub server_addresses: Vec<String>,
    #[serde(default)]
    pub server_port: u16,
    #[serde(default)]
    pub agent_gid: u32,
    /// The action that set this state, if any.
    #[serde(default)]
    pub action_id: Option<String>,
    /// The exclusion rules in force (Selective only) and their version.
    #[serde(default)]
    pub exclusions: Vec<ExclusionSpec>,
    #[serde(default)]
    pub exclusion_version: Option<i64>,
    pub updated: String,
    /// Outcomes of recent actions, so that a redelivered action is answered
    /// with the result it already had instead of being applied twice.
    #[serde(default)]
    pub recent: Vec<ActionOutcome>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ActionOutcome {
    pub action_id: String,
    pub succeeded: bool,
    pub error_h_result: i64,
    pub reason: Option<String>,
    pub enforced: Enforced,
}

/// `cordon-agent status --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Whether the state directory holds an identity (`cordon-agent enroll`).
    pub enrolled: bool,
    pub machine_id: Option<String>,
    /// The server's base URL.
    pub server: Option<String>,
    /// The computer name given at enrollment (`None`: the host name).
    pub name: Option<String>,
    /// `NotIsolated`, `Full`, `Selective` or `Unknown` (state file unreadable).
    pub intent: String,
    /// `present`, `absent` or `unknown`.
    pub table: String,
    pub note: Option<String>,
}

/// One isolation exclusion rule as the agent receives it. Conditions are
/// ANDed; an absent condition matches anything.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExclusionSpec {
    pub id: String,
    pub name: String,
    /// Absolute path of an executable whose processes are excluded.
    #[serde(default)]
    pub executable_path: Option<String>,
    /// A systemd unit (such as `sshd.service`) whose processes are excluded.
    #[serde(default)]
    pub systemd_unit: Option<String>,
    /// `Inbound`, `Outbound`, or none for both.
    #[serde(default)]
    pub direction: Option<String>,
    /// Remote addresses as CIDR prefixes (`198.18.0.4/32`, `fd00::/64`).
    #[serde(default)]
    pub remote_addresses: Vec<String>,
    /// Ports of the connection's service side: the remote port of an
    /// outbound connection, the local port of an inbound one.
    #[serde(default)]
    pub remote_ports: Vec<PortRange>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ServerMessage` as agents before `retryAfterSeconds` know it.
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(tag = "type", rename_all = "camelCase")]
    enum OlderServerMessage {
        Challenge { nonce: String },
        Refused { code: String, reason: String },
    }

    #[test]
    fn a_refusal_parses_with_and_without_retry_after_on_both_sides() {
        let busy = ServerMessage::Refused {
            code: UNAVAILABLE.into(),
            reason: "busy".into(),
            retry_after_seconds: Some(7),
        };
        let line = serde_json::to_string(&busy).unwrap();
        assert_eq!(
            line,
            r#"{"type":"refused","code":"Unavailable","reason":"busy","retryAfterSeconds":7}"#
        );
        assert_eq!(serde_json::from_str::<ServerMessage>(&line).unwrap(), busy);
        // An older agent reads the new message, ignoring the hint.
        assert_eq!(
            serde_json::from_str::<OlderServerMessage>(&line).unwrap(),
            OlderServerMessage::Refused {
                code: "Unavailable".into(),
                reason: "busy".into()
            }
        );
        // Without a hint the field is left out, as older servers sent it,
        // and such a message still parses.
        let plain = ServerMessage::Refused {
            code: "Revoked".into(),
            reason: "revoked".into(),
            retry_after_seconds: None,
        };
        let line = serde_json::to_string(&plain).unwrap();
        assert_eq!(
            line,
            r#"{"type":"refused","code":"Revoked","reason":"revoked"}"#
        );
        assert_eq!(serde_json::from_str::<ServerMessage>(&line).unwrap(), plain);
        assert!(serde_json::from_str::<OlderServerMessage>(&line).is_ok());
        // A null hint (a hand-written peer) means none.
        assert_eq!(
            serde_json::from_str::<ServerMessage>(
                r#"{"type":"refused","code":"Revoked","reason":"revoked","retryAfterSeconds":null}"#
            )
            .unwrap(),
            plain
        );
    }
}
