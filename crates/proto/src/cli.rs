//! JSON printed by the admin commands (`--json`).

use serde::{Deserialize, Serialize};

/// `cordon app create --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppCreated {
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: String,
}

/// One row of `cordon app list --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppSummary {
    pub client_id: String,
    pub name: String,
    pub permissions: Vec<String>,
    pub created: String,
}

/// `cordon enroll-token create --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollTokenCreated {
    /// What `cordon enroll-token list` shows and `revoke` takes.
    pub id: String,
    pub token: String,
    pub expires: Option<String>,
    pub max_uses: Option<i64>,
}

/// One row of `cordon enroll-token list --json` (never the token).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollTokenSummary {
    pub id: String,
    pub created: String,
    pub expires: Option<String>,
    pub max_uses: Option<i64>,
    pub uses: i64,
    /// `None`: no limit.
    pub uses_left: Option<i64>,
    pub revoked: Option<String>,
    /// `Active`, `Expired`, `UsedUp` or `Revoked`.
    pub status: String,
}

/// One row of `cordon machine list --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineSummary {
    pub machine_id: String,
    pub computer_dns_name: String,
    pub revoked: bool,
    pub isolation_state: String,
    pub last_seen: Option<String>,
    /// The machine group (`rbacGroupName`).
    #[serde(default)]
    pub rbac_group_name: String,
}
