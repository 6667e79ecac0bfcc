//! `cordon user`, `cordon role` and `cordon group`: the people who sign in,
//! what their roles allow, and which machines each user group reaches.

use std::io::BufRead;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use server::crypto;
use server::rbac::{self, RolePermission};
use store::StoreError;

use crate::DataDir;

/// Shortest password accepted.
const MIN_PASSWORD: usize = 8;
const MAX_PASSWORD: usize = 1024;

/// The name a command acts on: `--name NAME`, or just `NAME`.
#[derive(Args)]
pub struct NameArg {
    /// The name (a user's sign-in name, a role's or a group's name).
    #[arg(long = "name", value_name = "NAME", conflicts_with = "positional_name")]
    flag_name: Option<String>,
    /// The same, given without --name.
    #[arg(value_name = "NAME", required_unless_present = "flag_name")]
    positional_name: Option<String>,
}

impl NameArg {
    fn get(self) -> String {
        self.flag_name.or(self.positional_name).unwrap_or_default()
    }
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a user who signs in to the built-in authority.
    Create {
        #[command(flatten)]
        data: DataDir,
        /// Sign-in name (the `upn` of their tokens), such as alice@example.com.
        #[arg(long)]
        name: String,
        /// Name shown for the user (default: the sign-in name).
        #[arg(long)]
        display_name: Option<String>,
        /// Viewer, Responder, Administrator or a custom role.
        #[arg(long)]
        role: String,
        /// A user group the user belongs to (repeatable).
        #[arg(long = "user-group")]
        user_groups: Vec<String>,
        /// Read the password from the first line of standard input. Without
        /// it, a random password is generated and shown once.
        #[arg(long)]
        password_stdin: bool,
        #[arg(long)]
        json: bool,
    },
    /// List users.
    List {
        #[command(flatten)]
        data: DataDir,
        #[arg(long)]
        json: bool,
    },
    /// Delete a user; their tokens stop working at once.
    Delete {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        name: NameArg,
    },
    /// Set a user's password (first line of standard input).
    SetPassword {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        name: NameArg,
        /// Read the password from standard input (the only way to give it).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Disable a user: they cannot sign in and their tokens stop working.
    Disable {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        name: NameArg,
    },
    /// Enable a disabled user again.
    Enable {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        name: NameArg,
    },
}

#[derive(Subcommand)]
pub enum RoleCommand {
    /// Create a custom role.
    Create {
        #[command(flatten)]
        data: DataDir,
        #[arg(long)]
        name: String,
        /// A permission it grants (repeatable): "View data", "Active
        /// remediation actions", "Manage security settings", "Manage portal
        /// system settings".
        #[arg(long = "permission", required = true)]
        permissions: Vec<String>,
    },
    /// List the roles, built-in ones first.
    List {
        #[command(flatten)]
        data: DataDir,
        #[arg(long)]
        json: bool,
    },
    /// Delete a custom role no user holds.
    Delete {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        name: NameArg,
    },
}

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Create a machine group. A machine belongs to the highest-ranked
    /// group whose rules (all that are given) it matches; a group with no
    /// --user-group is open to every user.
    Create {
        #[command(flatten)]
        data: DataDir,
        #[arg(long)]
        name: String,
        /// 1 is the highest; groups from this rank down move one down.
        #[arg(long)]
        rank: u32,
        /// A machine tag members carry (case-insensitive).
        #[arg(long)]
        match_tag: Option<String>,
        /// How members' names begin (case-insensitive).
        #[arg(long)]
        match_name_prefix: Option<String>,
        /// Members' OS platform, such as Linux (case-insensitive).
        #[arg(long)]
        match_os: Option<String>,
        /// A user group given access (repeatable).
        #[arg(long = "user-group")]
        user_groups: Vec<String>,
    },
    /// List the machine groups by rank, the default group last.
    List {
        #[command(flatten)]
        data: DataDir,
        #[arg(long)]
        json: bool,
    },
    /// Delete a machine group; its machines move to the next match or the default group.
    Delete {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        name: NameArg,
    },
}

fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    let length = password.chars().count();
    if length < MIN_PASSWORD {
        bail!("the password must be at least {MIN_PASSWORD} characters");
    }
    if password.len() > MAX_PASSWORD {
        bail!("the password must be at most {MAX_PASSWORD} bytes");
    }
    Ok(password)
}

fn user_groups(raw: Vec<String>) -> anyhow::Result<Vec<String>> {
    let mut unique: Vec<String> = Vec::new();
    for group in raw {
        let group = rbac::check_name("user group", &group).map_err(anyhow::Error::msg)?;
        if !unique.iter().any(|g| g.eq_ignore_ascii_case(&group)) {
            unique.push(group);
        }
    }
    Ok(unique)
}

fn not_found(what: &str, name: &str) -> impl FnOnce(StoreError) -> anyhow::Error {
    let message = format!("there is no {what} named '{name}'");
    move |e| match e {
        StoreError::NotFound => anyhow::anyhow!(message),
        e => e.into(),
    }
}

pub async fn user_command(command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Create {
            data,
            name,
            display_name,
            role,
            user_groups: groups,
            password_stdin,
            json,
        } => {
            let upn = rbac::check_name("user name", &name).map_err(anyhow::Error::msg)?;
            if upn.chars().any(char::is_whitespace) {
                bail!("the user name must not contain spaces");
            }
            let display_name = match display_name {
                Some(d) => rbac::check_name("display name", &d).map_err(anyhow::Error::msg)?,
                None => upn.clone(),
            };
            let groups = user_groups(groups)?;
            let store = data.open().await?;
            let Some(role) = rbac::resolve_role(&store, &role).await? else {
                bail!("there is no role named '{role}'; see `cordon role list`");
            };
            let (password, generated) = if password_stdin {
                (read_password()?, false)
            } else {
                (crypto::new_secret(), true)
            };
            let id = crypto::new_guid();
            store
                .create_user(store::UserRecord {
                    id: id.clone(),
                    upn: upn.clone(),
                    display_name,
                    password_hash: crypto::hash_secret(&password),
                    role: role.name.clone(),
                    user_groups: groups.clone(),
                    disabled: false,
                    created_at: server::now_nanos(),
                })
                .await
                .map_err(|e| match e {
                    StoreError::Conflict(_) => {
                        anyhow::anyhow!("a user named '{upn}' already exists")
                    }
                    e => e.into(),
                })?;
            server::audit::record_command(&store, "user.create", &upn).await?;
            if json {
                let mut out =
                    json!({"id": id, "name": upn, "role": role.name, "userGroups": groups});
                if generated {
                    out["password"] = json!(password);
                }
                println!("{out}");
            } else {
                println!("Created user '{upn}' ({}) with role {}.", id, role.name);
                if !groups.is_empty() {
                    println!("  User groups: {}", groups.join(", "));
                }
                if generated {
                    println!("  Password:    {password}");
                    println!("The password is shown only now.");
                }
            }
            Ok(())
        }
        UserCommand::List { data, json } => {
            let store = data.open().await?;
            let users = store.list_users().await?;
            if json {
                let list: Vec<_> = users
                    .iter()
                    .map(|u| {
                        json!({"id": u.id, "name": u.upn, "displayName": u.display_name,
                               "role": u.role, "userGroups": u.user_groups,
                               "disabled": u.disabled,
                               "created": proto::time::format_utc(u.created_at)})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else if users.is_empty() {
                println!("No users.");
            } else {
                for u in users {
                    println!(
                        "{}  {}  role={}  groups={}{}",
                        u.id,
                        u.upn,
                        u.role,
                        if u.user_groups.is_empty() {
                            "-".to_owned()
                        } else {
                            u.user_groups.join(",")
                        },
                        if u.disabled { "  DISABLED" } else { "" }
                    );
                }
            }
            Ok(())
        }
        UserCommand::Delete { data, name } => {
            let name = name.get();
            let store = data.open().await?;
            store
                .delete_user(&name)
                .await
                .map_err(not_found("user", &name))?;
            server::audit::record_command(&store, "user.delete", &name).await?;
            println!("Deleted user '{name}'.");
            Ok(())
        }
        UserCommand::SetPassword {
            data,
            name,
            password_stdin,
        } => {
            let name = name.get();
            if !password_stdin {
                bail!("give the new password on standard input with --password-stdin");
            }
            let password = read_password()?;
            let store = data.open().await?;
            store
                .set_user_password(&name, crypto::hash_secret(&password))
                .await
                .map_err(not_found("user", &name))?;
            server::audit::record_command(&store, "user.set-password", &name).await?;
            println!("Set the password of '{name}'.");
            Ok(())
        }
        UserCommand::Disable { data, name } => set_disabled(data, &name.get(), true).await,
        UserCommand::Enable { data, name } => set_disabled(data, &name.get(), false).await,
    }
}

async fn set_disabled(data: DataDir, name: &str, disabled: bool) -> anyhow::Result<()> {
    let store = data.open().await?;
    store
        .set_user_disabled(name, disabled)
        .await
        .map_err(not_found("user", name))?;
    let action = if disabled {
        "user.disable"
    } else {
        "user.enable"
    };
    server::audit::record_command(&store, action, name).await?;
    let state = if disabled { "Disabled" } else { "Enabled" };
    println!("{state} user '{name}'.");
    Ok(())
}

fn permission_names(permissions: &[RolePermission]) -> Vec<&'static str> {
    permissions.iter().map(|p| p.name()).collect()
}

pub async fn role_command(command: RoleCommand) -> anyhow::Result<()> {
    match command {
        RoleCommand::Create {
            data,
            name,
            permissions,
        } => {
            let name = rbac::check_name("role name", &name).map_err(anyhow::Error::msg)?;
            if rbac::builtin_role(&name).is_some() {
                bail!("'{name}' is the name of a built-in role; choose another");
            }
            let mut granted: Vec<RolePermission> = Vec::new();
            for text in &permissions {
                let Some(p) = RolePermission::parse(text) else {
                    bail!(
                        "unknown permission '{text}'; use {}",
                        permission_names(&RolePermission::ALL)
                            .iter()
                            .map(|n| format!("\"{n}\""))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                };
                if !granted.contains(&p) {
                    granted.push(p);
                }
            }
            let store = data.open().await?;
            store
                .create_role(store::RoleRecord {
                    name: name.clone(),
                    permissions: permission_names(&granted)
                        .into_iter()
                        .map(str::to_owned)
                        .collect(),
                    created_at: server::now_nanos(),
                })
                .await
                .map_err(|e| match e {
                    StoreError::Conflict(_) => {
                        anyhow::anyhow!("a role named '{name}' already exists")
                    }
                    e => e.into(),
                })?;
            server::audit::record_command(&store, "role.create", &name).await?;
            println!(
                "Created role '{name}': {}.",
                permission_names(&granted).join(", ")
            );
            Ok(())
        }
        RoleCommand::List { data, json } => {
            let store = data.open().await?;
            let mut roles: Vec<(String, Vec<&'static str>, bool)> = rbac::BUILTIN_ROLES
                .iter()
                .filter_map(|n| rbac::builtin_role(n))
                .map(|r| (r.name, permission_names(&r.permissions), true))
                .collect();
            for record in store.list_roles().await? {
                let permissions: Vec<RolePermission> = record
                    .permissions
                    .iter()
                    .filter_map(|p| RolePermission::parse(p))
                    .collect();
                roles.push((record.name, permission_names(&permissions), false));
            }
            if json {
                let list: Vec<_> = roles
                    .iter()
                    .map(|(name, permissions, builtin)| {
                        json!({"name": name, "permissions": permissions, "builtIn": builtin})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                for (name, permissions, builtin) in roles {
                    println!(
                        "{name}{}: {}",
                        if builtin { " (built-in)" } else { "" },
                        permissions.join(", ")
                    );
                }
            }
            Ok(())
        }
        RoleCommand::Delete { data, name } => {
            let name = name.get();
            if rbac::builtin_role(&name).is_some() {
                bail!("'{name}' is a built-in role and cannot be deleted");
            }
            let store = data.open().await?;
            store.delete_role(&name).await.map_err(|e| match e {
                StoreError::NotFound => anyhow::anyhow!("there is no custom role named '{name}'"),
                StoreError::Conflict(holder) => {
                    anyhow::anyhow!("the role '{name}' is still held by user '{holder}'")
                }
                e => e.into(),
            })?;
            server::audit::record_command(&store, "role.delete", &name).await?;
            println!("Deleted role '{name}'.");
            Ok(())
        }
    }
}

fn optional_rule(what: &str, value: Option<String>) -> anyhow::Result<Option<String>> {
    value
        .map(|v| rbac::check_name(what, &v).map_err(anyhow::Error::msg))
        .transpose()
}

pub async fn group_command(command: GroupCommand) -> anyhow::Result<()> {
    match command {
        GroupCommand::Create {
            data,
            name,
            rank,
            match_tag,
            match_name_prefix,
            match_os,
            user_groups: groups,
        } => {
            let name = rbac::check_name("group name", &name).map_err(anyhow::Error::msg)?;
            if rank == 0 {
                bail!("--rank must be 1 (the highest) or more");
            }
            let match_tag = optional_rule("tag", match_tag)?;
            let match_name_prefix = optional_rule("name prefix", match_name_prefix)?;
            let match_os = optional_rule("OS platform", match_os)?;
            if match_tag.is_none() && match_name_prefix.is_none() && match_os.is_none() {
                bail!("a group needs a rule: --match-tag, --match-name-prefix or --match-os");
            }
            let groups = user_groups(groups)?;
            let store = data.open().await?;
            let group = store
                .create_group(store::NewGroup {
                    name: name.clone(),
                    rank: i64::from(rank),
                    match_tag,
                    match_name_prefix,
                    match_os,
                    user_groups: groups,
                    now: server::now_nanos(),
                })
                .await
                .map_err(|e| match e {
                    StoreError::Conflict(_) => {
                        anyhow::anyhow!("a machine group named '{name}' already exists")
                    }
                    e => e.into(),
                })?;
            server::audit::record_command(&store, "group.create", &group.name).await?;
            println!(
                "Created machine group '{}' (rbacGroupId {}) at rank {}.",
                group.name, group.id, group.rank
            );
            Ok(())
        }
        GroupCommand::List { data, json } => {
            let store = data.open().await?;
            let groups = store.list_groups().await?;
            if json {
                let mut list: Vec<_> = groups
                    .iter()
                    .map(|g| {
                        json!({"id": g.id, "name": g.name, "rank": g.rank,
                               "matchTag": g.match_tag, "matchNamePrefix": g.match_name_prefix,
                               "matchOs": g.match_os, "userGroups": g.user_groups})
                    })
                    .collect();
                list.push(
                    json!({"id": store::DEFAULT_GROUP_ID, "name": store::DEFAULT_GROUP_NAME,
                                 "rank": null, "matchTag": null, "matchNamePrefix": null,
                                 "matchOs": null, "userGroups": []}),
                );
                println!("{}", serde_json::Value::Array(list));
            } else {
                for g in &groups {
                    let rules: Vec<String> = [
                        g.match_tag.as_ref().map(|t| format!("tag={t}")),
                        g.match_name_prefix
                            .as_ref()
                            .map(|p| format!("name-prefix={p}")),
                        g.match_os.as_ref().map(|o| format!("os={o}")),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    println!(
                        "{}. {} (id {})  {}  user groups: {}",
                        g.rank,
                        g.name,
                        g.id,
                        rules.join(" "),
                        if g.user_groups.is_empty() {
                            "all users".to_owned()
                        } else {
                            g.user_groups.join(", ")
                        }
                    );
                }
                println!(
                    "-. {} (id {})  everything else  user groups: all users",
                    store::DEFAULT_GROUP_NAME,
                    store::DEFAULT_GROUP_ID
                );
            }
            Ok(())
        }
        GroupCommand::Delete { data, name } => {
            let name = name.get();
            let store = data.open().await?;
            store
                .delete_group(&name)
                .await
                .map_err(not_found("machine group", &name))?;
            server::audit::record_command(&store, "group.delete", &name).await?;
            println!("Deleted machine group '{name}'.");
            Ok(())
        }
    }
}
