//! Roles, their permissions, and which machine groups a user reaches.
//!
//! A delegated (user) caller needs two things for a call: the token's
//! delegated permission (`scp`, checked in [`crate::auth`]) and a role that
//! grants the matching role permission. The built-in roles are `Viewer`
//! (View data), `Responder` (View data, Active remediation actions) and
//! `Administrator` (every permission, and every machine group); custom
//! roles (`cordon role create`) grant a chosen set. A user reaches the
//! default group, every group open to all (no user groups assigned) and
//! every group assigned one of the user's user groups. Application tokens
//! are not group-scoped.

use store::{DEFAULT_GROUP_ID, GroupRecord, Store};

/// What a role may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolePermission {
    /// Read machines and machine actions.
    ViewData,
    /// Isolate, release, cancel.
    ActiveRemediation,
    /// Isolation exclusion rules and machine tags.
    ManageSecuritySettings,
    /// The audit trail.
    ManagePortalSettings,
}

impl RolePermission {
    pub const ALL: [RolePermission; 4] = [
        RolePermission::ViewData,
        RolePermission::ActiveRemediation,
        RolePermission::ManageSecuritySettings,
        RolePermission::ManagePortalSettings,
    ];

    /// The name shown and stored, as the reference service spells it.
    pub fn name(self) -> &'static str {
        match self {
            RolePermission::ViewData => "View data",
            RolePermission::ActiveRemediation => "Active remediation actions",
            RolePermission::ManageSecuritySettings => "Manage security settings",
            RolePermission::ManagePortalSettings => "Manage portal system settings",
        }
    }

    /// Parses a permission name without regard to case, spaces, dashes or
    /// underscores ("View data", "view-data", "ViewData").
    pub fn parse(text: &str) -> Option<RolePermission> {
        let squash = |s: &str| {
            s.chars()
                .filter(|c| !matches!(c, ' ' | '-' | '_'))
                .flat_map(char::to_lowercase)
                .collect::<String>()
        };
        let wanted = squash(text);
        Self::ALL.into_iter().find(|p| squash(p.name()) == wanted)
    }
}

/// A role as the server applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct Role {
    pub name: String,
    pub permissions: Vec<RolePermission>,
    /// Reaches every machine group (the built-in Administrator).
    pub all_groups: bool,
}

pub const BUILTIN_ROLES: [&str; 3] = ["Viewer", "Responder", "Administrator"];

/// A built-in role by name (without regard to case).
pub fn builtin_role(name: &str) -> Option<Role> {
    use RolePermission::*;
    let (name, permissions, all_groups) = match name.to_ascii_lowercase().as_str() {
        "viewer" => ("Viewer", vec![ViewData], false),
        "responder" => ("Responder", vec![ViewData, ActiveRemediation], false),
        "administrator" => ("Administrator", RolePermission::ALL.to_vec(), true),
        _ => return None,
    };
    Some(Role {
        name: name.to_owned(),
        permissions,
        all_groups,
    })
}

/// A role, built in or custom, by name; `None` if there is none.
pub async fn resolve_role(store: &Store, name: &str) -> store::Result<Option<Role>> {
    if let Some(role) = builtin_role(name) {
        return Ok(Some(role));
    }
    Ok(store.get_role(name).await?.map(|record| Role {
        name: record.name,
        permissions: record
            .permissions
            .iter()
            .filter_map(|p| RolePermission::parse(p))
            .collect(),
        all_groups: false,
    }))
}

/// The ids of the groups a member of `user_groups` reaches, the default
/// group included.
pub fn reachable_groups(groups: &[GroupRecord], user_groups: &[String]) -> Vec<i64> {
    let mut ids = vec![DEFAULT_GROUP_ID];
    ids.extend(
        groups
            .iter()
            .filter(|g| {
                g.user_groups.is_empty()
                    || g.user_groups
                        .iter()
                        .any(|ug| user_groups.iter().any(|mine| mine.eq_ignore_ascii_case(ug)))
            })
            .map(|g| g.id),
    );
    ids
}

/// Checks a name given to a role, a machine group, a user group or a user:
/// 1 to 100 characters once trimmed, none of them a control or format
/// character ([`crate::text::is_safe_to_show`]).
pub fn check_name(what: &str, text: &str) -> Result<String, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("the {what} must not be empty"));
    }
    if trimmed.chars().count() > 100 {
        return Err(format!("the {what} must be at most 100 characters"));
    }
    if !crate::text::is_safe_to_show(trimmed) {
        return Err(format!("the {what} {}", crate::text::UNSAFE_TEXT));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(id: i64, user_groups: &[&str]) -> GroupRecord {
        GroupRecord {
            id,
            name: format!("g{id}"),
            rank: id,
            match_tag: Some("t".into()),
            match_name_prefix: None,
            match_os: None,
            user_groups: user_groups.iter().map(|s| s.to_string()).collect(),
            created_at: 0,
        }
    }

    #[test]
    fn permissions_parse_in_every_usual_spelling() {
        for text in ["View data", "view-data", "ViewData", "VIEW_DATA"] {
            assert_eq!(RolePermission::parse(text), Some(RolePermission::ViewData));
        }
        assert_eq!(
            RolePermission::parse("Active remediation actions"),
            Some(RolePermission::ActiveRemediation)
        );
        assert_eq!(RolePermission::parse("root"), None);
        assert_eq!(RolePermission::parse(""), None);
    }

    #[test]
    fn builtin_roles_grant_what_their_names_say() {
        let viewer = builtin_role("viewer").unwrap();
        assert_eq!(viewer.permissions, vec![RolePermission::ViewData]);
        let responder = builtin_role("Responder").unwrap();
        assert!(
            responder
                .permissions
                .contains(&RolePermission::ActiveRemediation)
        );
        assert!(!responder.all_groups);
        let admin = builtin_role("ADMINISTRATOR").unwrap();
        assert!(admin.all_groups);
        assert_eq!(admin.permissions.len(), RolePermission::ALL.len());
        assert!(builtin_role("Owner").is_none());
    }

    #[test]
    fn a_user_reaches_open_groups_and_the_groups_of_their_user_groups() {
        let groups = [group(1, &["SOC-EU"]), group(2, &[]), group(3, &["soc-us"])];
        assert_eq!(reachable_groups(&groups, &["soc-eu".into()]), vec![0, 1, 2]);
        assert_eq!(reachable_groups(&groups, &[]), vec![0, 2]);
        assert_eq!(
            reachable_groups(&groups, &["SOC-US".into(), "soc-eu".into()]),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(check_name("role name", "  Tier 1 ").unwrap(), "Tier 1");
        assert!(check_name("role name", " ").is_err());
        assert!(check_name("role name", &"x".repeat(101)).is_err());
        assert!(check_name("role name", "a\u{7}b").is_err());
        assert!(check_name("role name", "a\u{202E}b").is_err());
        assert!(check_name("role name", "a\u{200B}b").is_err());
    }
}
