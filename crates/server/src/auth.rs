//! Authentication of API calls: the bearer token becomes a [`Principal`].
//!
//! The extractor checks, in order: a well-formed `Authorization: Bearer`
//! header, the token's signature (pinned to RS256 and the server's key),
//! issuer, audience, tenant and lifetime, that the application still exists,
//! and the caller's rate limit. Permission checks come after, in the
//! handler, so that a refused permission is a 403 and never a 401.

use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath};
use axum::http::header;
use axum::http::request::Parts;
use proto::auth::Claims;

use crate::AppState;
use crate::error::ApiError;
use crate::rbac::{Role, RolePermission};

/// Tokens are accepted this long before `nbf` and after `exp`.
const CLOCK_SKEW_SECONDS: i64 = 300;

/// Resources (audiences) a token may be issued for, besides the server's own URL.
pub const RESOURCES: &[&str] = &[
    "https://api.securitycenter.microsoft.com",
    "https://api.security.microsoft.com",
    "https://securitycenter.onmicrosoft.com/windowsatpservice",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Isolate, unisolate, cancel.
    Isolate,
    /// Read machines and machine actions.
    Read,
    /// Read and change settings: the isolation exclusion rules, machine tags.
    Settings,
    /// Read the audit trail.
    Audit,
}

/// The application permissions (`roles`) the API knows.
pub const APPLICATION_PERMISSIONS: [&str; 3] = [
    "Machine.Isolate",
    "Machine.Read.All",
    "Machine.ReadWrite.All",
];

/// The delegated permissions the built-in authority grants users (their
/// role decides what they may actually do).
pub const DELEGATED_SCOPES: [&str; 3] = ["Machine.Read", "Machine.ReadWrite", "Machine.Isolate"];

/// What a user (delegated) caller is allowed, beyond the token's `scp`.
#[derive(Debug, Clone)]
pub struct UserAccess {
    /// The user's role, as the user holds it now.
    pub role: Option<Role>,
    /// The machine groups the user reaches; `None`: all of them.
    pub groups: Option<Vec<i64>>,
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The application's client id (or the user's object id).
    pub id: String,
    /// Shown as `requestor`: the app's display name or the user's UPN.
    pub display_name: String,
    /// The name to show the caller: the app's name, or the user's display
    /// name (their UPN when they have none).
    pub name: String,
    /// The call comes through the analyst console: a user token of the
    /// built-in authority issued to [`crate::signin::CONSOLE_CLIENT_ID`]
    /// (actions it creates have `requestSource` `Portal`).
    pub via_console: bool,
    /// Application permissions (`roles`).
    pub roles: Vec<String>,
    /// Delegated permissions (`scp`).
    pub scopes: Vec<String>,
    /// Set for a user: their role and reach. `None`: an application.
    pub user: Option<UserAccess>,
}

impl Principal {
    /// Checks the token's permission and, for a user, the role permission
    /// the call needs: a 403 names what is missing.
    pub fn require(&self, permission: Permission) -> Result<(), ApiError> {
        let (roles, scopes, role_permission): (&[&str], &[&str], _) = match permission {
            Permission::Isolate => (
                &["Machine.Isolate"],
                &["Machine.Isolate"],
                RolePermission::ActiveRemediation,
            ),
            Permission::Read => (
                &["Machine.Read.All", "Machine.ReadWrite.All"],
                &["Machine.Read", "Machine.ReadWrite"],
                RolePermission::ViewData,
            ),
            Permission::Settings => (
                &["Machine.ReadWrite.All"],
                &["Machine.ReadWrite"],
                RolePermission::ManageSecuritySettings,
            ),
            Permission::Audit => (
                &["Machine.ReadWrite.All"],
                &["Machine.ReadWrite"],
                RolePermission::ManagePortalSettings,
            ),
        };
        let Some(user) = &self.user else {
            if self.roles.iter().any(|r| roles.contains(&r.as_str())) {
                return Ok(());
            }
            return Err(ApiError::forbidden(format!(
                "The application lacks the permission this call needs: {}.",
                roles.join(" or ")
            )));
        };
        if !self.scopes.iter().any(|s| scopes.contains(&s.as_str())) {
            return Err(ApiError::forbidden(format!(
                "The token lacks the delegated permission this call needs: {}.",
                scopes.join(" or ")
            )));
        }
        match &user.role {
            Some(role) if role.permissions.contains(&role_permission) => Ok(()),
            Some(role) => Err(ApiError::forbidden(format!(
                "The role '{}' does not grant '{}', which this call needs.",
                role.name,
                role_permission.name()
            ))),
            None => Err(ApiError::forbidden(format!(
                "The user has no role; this call needs one granting '{}'.",
                role_permission.name()
            ))),
        }
    }

    /// The machine groups the caller reaches; `None`: every group (an
    /// application, or a user whose role reaches all groups).
    /// Whether the caller may read the audit trail (`GET /api/auditEvents`,
    /// its live events): the audit permission, and, since the trail names
    /// machines of every group, a reach over all of them (applications,
    /// Administrators).
    pub fn require_audit_trail(&self) -> Result<(), ApiError> {
        self.require(Permission::Audit)?;
        if self.machine_groups().is_some() {
            return Err(ApiError::forbidden(
                "The audit trail covers every machine group; only callers who reach all of them may read it.",
            ));
        }
        Ok(())
    }

    pub fn machine_groups(&self) -> Option<Vec<i64>> {
        self.user.as_ref().and_then(|u| u.groups.clone())
    }

    /// Whether the caller reaches machines of group `group_id`.
    pub fn reaches(&self, group_id: i64) -> bool {
        self.machine_groups().is_none_or(|g| g.contains(&group_id))
    }
}

/// Normalizes a resource or audience for comparison (no trailing slash, lowercase).
pub fn normalize_resource(resource: &str) -> String {
    resource.trim_end_matches('/').to_ascii_lowercase()
}

impl AppState {
    /// Whether `resource` names this API.
    pub fn accepts_resource(&self, resource: &str) -> bool {
        let resource = normalize_resource(resource);
        resource == normalize_resource(&self.public_url)
            || RESOURCES.iter().any(|r| normalize_resource(r) == resource)
    }

    /// Checks a bearer token's claims; the signature is checked by the key.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, ApiError> {
        if self.oidc.provider_for(token).is_some() {
            return self.authenticate_external(token).await;
        }
        let claims = self
            .key_ring()
            .verify(token, crate::now_nanos())
            .map_err(|e| {
                tracing::info!(reason = %e, "token refused");
                ApiError::unauthorized("The access token is invalid.")
            })?;
        self.check_claims(&claims)?;
        if claims.scp.is_some() {
            return self.authenticate_user(claims).await;
        }
        let Some(app_id) = claims.appid.clone() else {
            return Err(ApiError::unauthorized(
                "The access token has no application id.",
            ));
        };
        let app = self.store.get_app(&app_id).await?.ok_or_else(|| {
            tracing::info!(app_id = %app_id, "token of a deleted application refused");
            ApiError::unauthorized("The application of this token no longer exists.")
        })?;
        // Permissions are the token's roles that the app still holds.
        let roles = claims
            .roles
            .unwrap_or_default()
            .into_iter()
            .filter(|r| app.permissions.contains(r))
            .collect();
        Ok(Principal {
            id: app.client_id,
            name: app.name.clone(),
            display_name: app.name,
            via_console: false,
            roles,
            scopes: Vec::new(),
            user: None,
        })
    }

    /// A delegated token of the built-in authority: the user must still
    /// exist and be enabled; their role and reach are read now, so a change
    /// takes effect at once.
    async fn authenticate_user(&self, claims: Claims) -> Result<Principal, ApiError> {
        let client_ok = match claims.appid.as_deref() {
            Some(crate::signin::CONSOLE_CLIENT_ID) => true,
            Some(app_id) => self.store.get_app(app_id).await?.is_some(),
            None => false,
        };
        if !client_ok {
            return Err(ApiError::unauthorized(
                "The application of this token no longer exists.",
            ));
        }
        let user = self
            .store
            .get_user(&claims.oid)
            .await?
            .filter(|u| !u.disabled)
            .ok_or_else(|| {
                tracing::info!(oid = %claims.oid, "token of a deleted or disabled user refused");
                ApiError::unauthorized("The user of this token is disabled or no longer exists.")
            })?;
        let role = crate::rbac::resolve_role(&self.store, &user.role).await?;
        let access = self.user_access(role, &user.user_groups).await?;
        let name = if user.display_name.trim().is_empty() {
            user.upn.clone()
        } else {
            user.display_name.clone()
        };
        Ok(Principal {
            id: user.id,
            name,
            via_console: claims.appid.as_deref() == Some(crate::signin::CONSOLE_CLIENT_ID),
            display_name: user.upn,
            roles: Vec::new(),
            scopes: claims
                .scp
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            user: Some(access),
        })
    }

    /// A token of an external OpenID Connect provider. An application's
    /// own token (client credentials) is an application with the
    /// application permissions of its `roles`. Otherwise it is a user whose
    /// role and user groups come from the token's claims (`--oidc-role-claim`,
    /// `--oidc-group-claim`). Several roles combine their permissions.
    /// Without any `Machine.*` delegated permission in `scp`/`scope`, the
    /// token carries the delegated permissions Cordon's own user tokens do:
    /// providers other than Microsoft's don't know them, and the audience
    /// check already ties the token to this API.
    async fn authenticate_external(&self, token: &str) -> Result<Principal, ApiError> {
        let identity = self.oidc.verify(token).await.map_err(|e| {
            tracing::info!(reason = %e, "external token refused");
            ApiError::unauthorized("The access token is invalid.")
        })?;
        if let Some(roles) = identity.application_roles {
            // An application of the provider (as an Entra ID app calling
            // with client credentials): its application permissions, every
            // machine group, as for Cordon's own applications.
            return Ok(Principal {
                id: format!("{}|{}", identity.issuer, identity.subject),
                name: identity.name.clone(),
                via_console: false,
                display_name: identity.name,
                roles: roles
                    .into_iter()
                    .filter(|r| APPLICATION_PERMISSIONS.contains(&r.as_str()))
                    .collect(),
                scopes: Vec::new(),
                user: None,
            });
        }
        let mut role: Option<Role> = None;
        for name in &identity.roles {
            let Some(found) = crate::rbac::resolve_role(&self.store, name).await? else {
                continue;
            };
            role = Some(match role {
                None => found,
                Some(mut combined) => {
                    combined.name = format!("{}, {}", combined.name, found.name);
                    for p in found.permissions {
                        if !combined.permissions.contains(&p) {
                            combined.permissions.push(p);
                        }
                    }
                    combined.all_groups |= found.all_groups;
                    combined
                }
            });
        }
        let access = self.user_access(role, &identity.user_groups).await?;
        let machine_scopes: Vec<String> = identity
            .scopes
            .unwrap_or_default()
            .into_iter()
            .filter(|s| DELEGATED_SCOPES.contains(&s.as_str()))
            .collect();
        let scopes = if machine_scopes.is_empty() {
            DELEGATED_SCOPES.iter().map(|s| s.to_string()).collect()
        } else {
            machine_scopes
        };
        Ok(Principal {
            id: format!("{}|{}", identity.issuer, identity.subject),
            name: identity.name,
            via_console: false,
            display_name: identity.upn,
            roles: Vec::new(),
            scopes,
            user: Some(access),
        })
    }

    /// The access of a user holding `role` and member of `user_groups`.
    pub async fn user_access(
        &self,
        role: Option<Role>,
        user_groups: &[String],
    ) -> Result<UserAccess, ApiError> {
        let groups = if role.as_ref().is_some_and(|r| r.all_groups) {
            None
        } else {
            let groups = self.store.list_groups().await?;
            Some(crate::rbac::reachable_groups(&groups, user_groups))
        };
        Ok(UserAccess { role, groups })
    }

    fn check_claims(&self, claims: &Claims) -> Result<(), ApiError> {
        let now = crate::unix_seconds();
        let refuse = |why: &str| {
            tracing::info!(reason = why, "token refused");
            Err(ApiError::unauthorized(format!(
                "The access token is {why}."
            )))
        };
        if claims.iss != self.issuer {
            return refuse("from another issuer");
        }
        if !self.accepts_resource(&claims.aud) {
            return refuse("for another audience");
        }
        if claims.tid != self.tenant_id {
            return refuse("for another tenant");
        }
        // Saturating: an `exp` near the largest integer must not wrap around.
        if claims.exp.saturating_add(CLOCK_SKEW_SECONDS) <= now {
            return refuse("expired");
        }
        if claims.nbf.saturating_sub(CLOCK_SKEW_SECONDS) > now {
            return refuse("not yet valid");
        }
        Ok(())
    }
}

impl FromRequestParts<Arc<AppState>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let mut headers = parts.headers.get_all(header::AUTHORIZATION).iter();
        let header = headers
            .next()
            .ok_or_else(|| ApiError::unauthorized("The Authorization header is missing."))?;
        if headers.next().is_some() {
            // A proxy in front may have checked the other one.
            return Err(ApiError::unauthorized(
                "The request has more than one Authorization header.",
            ));
        }
        let token = header
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("The Authorization header must be 'Bearer <token>'.")
            })?;
        let principal = state.authenticate(token).await?;
        if let Some(slot) = parts.extensions.get::<crate::audit::PrincipalSlot>() {
            slot.set(&principal);
        }
        let endpoint = format!(
            "{} {}",
            parts.method,
            parts
                .extensions
                .get::<MatchedPath>()
                .map_or("", |p| p.as_str())
                .replacen("/api/v1.0/", "/api/", 1)
        );
        state
            .limiter
            .check(&principal.id, &endpoint)
            .map_err(|wait| {
                tracing::info!(caller = %principal.id, %endpoint, "rate limit hit");
                ApiError::too_many_requests(wait)
            })?;
        tracing::debug!(caller = %principal.id, "authenticated");
        Ok(principal)
    }
}
