//! Users, custom roles and machine groups, and the rule that puts each
//! machine in its group.

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::{Result, Store, StoreError};

/// The group of machines no ranked group matches. It has no row.
pub const DEFAULT_GROUP_ID: i64 = 0;
pub const DEFAULT_GROUP_NAME: &str = "Ungrouped devices (default)";

/// A person who signs in to the built-in authority.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    /// Object id (a GUID): the `oid` of the user's tokens.
    pub id: String,
    /// Sign-in name, unique without regard to case.
    pub upn: String,
    pub display_name: String,
    pub password_hash: String,
    pub role: String,
    pub user_groups: Vec<String>,
    pub disabled: bool,
    pub created_at: i64,
}

/// A custom role: a name and the permissions it grants.
#[derive(Debug, Clone, PartialEq)]
pub struct RoleRecord {
    pub name: String,
    pub permissions: Vec<String>,
    pub created_at: i64,
}

/// A ranked machine group and its membership rules.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRecord {
    pub id: i64,
    pub name: String,
    /// 1 is the highest.
    pub rank: i64,
    /// A tag the machine must carry (without regard to case).
    pub match_tag: Option<String>,
    /// How the machine's name must begin (without regard to case).
    pub match_name_prefix: Option<String>,
    /// The machine's `osPlatform` (without regard to case).
    pub match_os: Option<String>,
    /// User groups with access; empty: every user.
    pub user_groups: Vec<String>,
    pub created_at: i64,
}

/// A group to create.
#[derive(Debug, Clone)]
pub struct NewGroup {
    pub name: String,
    /// Where it goes: groups at this rank and below move down one.
    pub rank: i64,
    pub match_tag: Option<String>,
    pub match_name_prefix: Option<String>,
    pub match_os: Option<String>,
    pub user_groups: Vec<String>,
    pub now: i64,
}

impl GroupRecord {
    /// Whether a machine with this name, OS and tags meets every rule that
    /// is set. A group without rules matches nothing.
    pub fn matches(&self, name: &str, os: Option<&str>, tags: &[String]) -> bool {
        if self.match_tag.is_none() && self.match_name_prefix.is_none() && self.match_os.is_none() {
            return false;
        }
        let tag_ok = self
            .match_tag
            .as_ref()
            .is_none_or(|t| tags.iter().any(|have| have.eq_ignore_ascii_case(t)));
        let prefix_ok = self.match_name_prefix.as_ref().is_none_or(|p| {
            name.len() >= p.len()
                && name
                    .get(..p.len())
                    .is_some_and(|head| head.eq_ignore_ascii_case(p))
        });
        let os_ok = self
            .match_os
            .as_ref()
            .is_none_or(|o| os.is_some_and(|have| have.eq_ignore_ascii_case(o)));
        tag_ok && prefix_ok && os_ok
    }
}

fn lines(items: &[String]) -> String {
    items.join("\n")
}

fn unlines(text: String) -> Vec<String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

const USER_COLUMNS: &str =
    "id, upn, display_name, password_hash, role, user_groups, disabled, created_at";

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        id: row.get(0)?,
        upn: row.get(1)?,
        display_name: row.get(2)?,
        password_hash: row.get(3)?,
        role: row.get(4)?,
        user_groups: unlines(row.get(5)?),
        disabled: row.get(6)?,
        created_at: row.get(7)?,
    })
}

fn role_from_row(row: &Row<'_>) -> rusqlite::Result<RoleRecord> {
    Ok(RoleRecord {
        name: row.get(0)?,
        permissions: unlines(row.get(1)?),
        created_at: row.get(2)?,
    })
}

const GROUP_COLUMNS: &str =
    "id, name, rank, match_tag, match_name_prefix, match_os, user_groups, created_at";

fn group_from_row(row: &Row<'_>) -> rusqlite::Result<GroupRecord> {
    Ok(GroupRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        rank: row.get(2)?,
        match_tag: row.get(3)?,
        match_name_prefix: row.get(4)?,
        match_os: row.get(5)?,
        user_groups: unlines(row.get(6)?),
        created_at: row.get(7)?,
    })
}

fn groups(conn: &Connection) -> Result<Vec<GroupRecord>> {
    let sql = format!("SELECT {GROUP_COLUMNS} FROM machine_groups ORDER BY rank, id");
    Ok(conn
        .prepare_cached(&sql)?
        .query_map([], group_from_row)?
        .collect::<rusqlite::Result<_>>()?)
}

/// What decides the machine group of machines (`WHERE id = ?1`: of one).
pub(crate) const GROUP_FACTS: &str =
    "SELECT id, computer_dns_name, os_platform, rbac_group_id FROM machines";

/// Puts one machine (or, with `None`, every machine) in its group.
pub(crate) fn assign_groups(conn: &Connection, machine_id: Option<&str>) -> Result<()> {
    let groups = groups(conn)?;
    // Two statements, not `?1 IS NULL OR id = ?1`: that one is a scan of
    // every machine even for one (at every session's facts).
    let row = |r: &rusqlite::Row<'_>| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?));
    let machines: Vec<(String, String, Option<String>, i64)> = match machine_id {
        Some(id) => conn
            .prepare_cached(&format!("{GROUP_FACTS} WHERE id = ?1"))?
            .query_map([id], row)?
            .collect::<rusqlite::Result<_>>()?,
        None => conn
            .prepare_cached(GROUP_FACTS)?
            .query_map([], row)?
            .collect::<rusqlite::Result<_>>()?,
    };
    let mut tags_of = conn.prepare_cached("SELECT tag FROM machine_tags WHERE machine_id = ?1")?;
    let mut update = conn.prepare_cached("UPDATE machines SET rbac_group_id = ?2 WHERE id = ?1")?;
    for (id, name, os, current) in machines {
        let tags: Vec<String> = if groups.iter().any(|g| g.match_tag.is_some()) {
            tags_of
                .query_map([&id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        } else {
            Vec::new()
        };
        let group = groups
            .iter()
            .find(|g| g.matches(&name, os.as_deref(), &tags))
            .map_or(DEFAULT_GROUP_ID, |g| g.id);
        if group != current {
            update.execute(params![id, group])?;
        }
    }
    Ok(())
}

/// Renumbers the groups 1..N in their current order.
fn compact_ranks(conn: &Connection) -> Result<()> {
    let ids: Vec<i64> = groups(conn)?.into_iter().map(|g| g.id).collect();
    let mut update = conn.prepare_cached("UPDATE machine_groups SET rank = ?2 WHERE id = ?1")?;
    for (index, id) in ids.into_iter().enumerate() {
        update.execute(params![id, index as i64 + 1])?;
    }
    Ok(())
}

fn unique(result: rusqlite::Result<usize>, name: &str) -> Result<usize> {
    match result {
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(StoreError::Conflict(name.to_owned()))
        }
        other => Ok(other?),
    }
}

impl Store {
    // ---- users ----------------------------------------------------------

    /// Creates a user; `Conflict` when the sign-in name is taken.
    pub async fn create_user(&self, user: UserRecord) -> Result<()> {
        self.write(move |conn| {
            unique(
                conn.execute(
                    &format!(
                        "INSERT INTO users ({USER_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                    ),
                    params![
                        user.id,
                        user.upn,
                        user.display_name,
                        user.password_hash,
                        user.role,
                        lines(&user.user_groups),
                        user.disabled,
                        user.created_at
                    ],
                ),
                &user.upn,
            )?;
            Ok(())
        })
        .await
    }

    /// A user by sign-in name (without regard to case).
    pub async fn get_user_by_upn(&self, upn: &str) -> Result<Option<UserRecord>> {
        self.user_where("upn", upn).await
    }

    /// A user by object id.
    pub async fn get_user(&self, id: &str) -> Result<Option<UserRecord>> {
        self.user_where("id", id).await
    }

    /// The user whose `column` (a fixed name, never client text) is `value`.
    async fn user_where(&self, column: &'static str, value: &str) -> Result<Option<UserRecord>> {
        let value = value.to_owned();
        self.read(move |conn| {
            let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE {column} = ?1");
            Ok(conn
                .prepare_cached(&sql)?
                .query_row([value], user_from_row)
                .optional()?)
        })
        .await
    }

    pub async fn list_users(&self) -> Result<Vec<UserRecord>> {
        self.read(|conn| {
            let sql = format!("SELECT {USER_COLUMNS} FROM users ORDER BY upn");
            Ok(conn
                .prepare(&sql)?
                .query_map([], user_from_row)?
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Deletes a user; their tokens stop working at once.
    pub async fn delete_user(&self, upn: &str) -> Result<()> {
        let upn = upn.to_owned();
        self.write(
            move |conn| match conn.execute("DELETE FROM users WHERE upn = ?1", [upn])? {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            },
        )
        .await
    }

    pub async fn set_user_password(&self, upn: &str, password_hash: String) -> Result<()> {
        self.update_user(upn, "password_hash", password_hash).await
    }

    /// Disables (or enables again) a user; a disabled user's tokens stop
    /// working at once and they cannot sign in.
    pub async fn set_user_disabled(&self, upn: &str, disabled: bool) -> Result<()> {
        self.update_user(upn, "disabled", disabled).await
    }

    /// Sets one column (a fixed name, never client text) of a user.
    async fn update_user<V>(&self, upn: &str, column: &'static str, value: V) -> Result<()>
    where
        V: rusqlite::ToSql + Send + 'static,
    {
        let upn = upn.to_owned();
        self.write(move |conn| {
            let sql = format!("UPDATE users SET {column} = ?2 WHERE upn = ?1");
            match conn.execute(&sql, params![upn, value])? {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            }
        })
        .await
    }

    // ---- roles ----------------------------------------------------------

    /// Creates a custom role; `Conflict` when the name is taken.
    pub async fn create_role(&self, role: RoleRecord) -> Result<()> {
        self.write(move |conn| {
            unique(
                conn.execute(
                    "INSERT INTO roles (name, permissions, created_at) VALUES (?1, ?2, ?3)",
                    params![role.name, lines(&role.permissions), role.created_at],
                ),
                &role.name,
            )?;
            Ok(())
        })
        .await
    }

    pub async fn get_role(&self, name: &str) -> Result<Option<RoleRecord>> {
        let name = name.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT name, permissions, created_at FROM roles WHERE name = ?1")?
                .query_row([name], role_from_row)
                .optional()?)
        })
        .await
    }

    pub async fn list_roles(&self) -> Result<Vec<RoleRecord>> {
        self.read(|conn| {
            Ok(conn
                .prepare("SELECT name, permissions, created_at FROM roles ORDER BY name")?
                .query_map([], role_from_row)?
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Deletes a custom role; `Conflict` (naming a user) while a user holds it.
    pub async fn delete_role(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.write(move |conn| {
            let holder: Option<String> = conn
                .query_row(
                    "SELECT upn FROM users WHERE role = ?1 COLLATE NOCASE LIMIT 1",
                    [&name],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(holder) = holder {
                return Err(StoreError::Conflict(holder));
            }
            match conn.execute("DELETE FROM roles WHERE name = ?1", [&name])? {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            }
        })
        .await
    }

    // ---- machine groups -------------------------------------------------

    /// Creates a group at `rank` (groups from that rank down move one
    /// down; a rank past the end appends) and regroups every machine.
    /// `Conflict` when the name is taken.
    pub async fn create_group(&self, new: NewGroup) -> Result<GroupRecord> {
        self.write(move |conn| {
            if new.name.eq_ignore_ascii_case(DEFAULT_GROUP_NAME) {
                return Err(StoreError::Conflict(new.name));
            }
            let rank = new.rank.max(1);
            conn.execute(
                "UPDATE machine_groups SET rank = rank + 1 WHERE rank >= ?1",
                [rank],
            )?;
            unique(
                conn.execute(
                    "INSERT INTO machine_groups (name, rank, match_tag, match_name_prefix, \
                     match_os, user_groups, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        new.name,
                        rank,
                        new.match_tag,
                        new.match_name_prefix,
                        new.match_os,
                        lines(&new.user_groups),
                        new.now
                    ],
                ),
                &new.name,
            )?;
            let id = conn.last_insert_rowid();
            compact_ranks(conn)?;
            assign_groups(conn, None)?;
            groups(conn)?
                .into_iter()
                .find(|g| g.id == id)
                .ok_or(StoreError::NotFound)
        })
        .await
    }

    /// The groups, highest rank first.
    pub async fn list_groups(&self) -> Result<Vec<GroupRecord>> {
        self.read(groups).await
    }

    /// Deletes a group (by name, without regard to case); its machines
    /// move to the next matching group or the default one.
    pub async fn delete_group(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.write(move |conn| {
            if conn.execute("DELETE FROM machine_groups WHERE name = ?1", [&name])? == 0 {
                return Err(StoreError::NotFound);
            }
            compact_ranks(conn)?;
            assign_groups(conn, None)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(tag: Option<&str>, prefix: Option<&str>, os: Option<&str>) -> GroupRecord {
        GroupRecord {
            id: 1,
            name: "g".into(),
            rank: 1,
            match_tag: tag.map(Into::into),
            match_name_prefix: prefix.map(Into::into),
            match_os: os.map(Into::into),
            user_groups: Vec::new(),
            created_at: 0,
        }
    }

    #[test]
    fn a_group_matches_when_every_rule_it_sets_holds() {
        let tags = vec!["Finance".to_owned()];
        assert!(group(Some("finance"), None, None).matches("ws-1", None, &tags));
        assert!(!group(Some("hr"), None, None).matches("ws-1", None, &tags));
        assert!(group(None, Some("WS-"), None).matches("ws-1", None, &[]));
        assert!(!group(None, Some("ws-12"), None).matches("ws-1", None, &[]));
        assert!(group(None, None, Some("linux")).matches("x", Some("Linux"), &[]));
        assert!(!group(None, None, Some("linux")).matches("x", None, &[]));
        assert!(group(Some("finance"), Some("ws-"), Some("Linux")).matches(
            "ws-9",
            Some("Linux"),
            &tags
        ));
        assert!(
            !group(Some("finance"), Some("srv-"), Some("Linux")).matches(
                "ws-9",
                Some("Linux"),
                &tags
            )
        );
        // A name whose prefix would split a character is simply no match.
        assert!(!group(None, Some("é"), None).matches("\u{65}x", None, &[]));
        assert!(!group(None, None, None).matches("anything", Some("Linux"), &tags));
    }
}
