//! Isolation exclusion rules and the version of the rule set.
//!
//! Every change to the rules (create, update, delete) adds one to the
//! rule-set version in `meta` (`exclusion_version`) in the same transaction,
//! so a reader that sees a version sees exactly the rules of that version.
//! The server validates and normalizes the fields; the store keeps them as
//! they are given, and enforces only that names are unique regardless of
//! case.

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::{Result, Store, StoreError};

/// The fields of a rule that a client chooses, already validated and
/// normalized by the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExclusionRuleFields {
    pub name: String,
    pub description: Option<String>,
    pub executable_path: Option<String>,
    pub systemd_unit: Option<String>,
    /// `Inbound` or `Outbound`; `None` for both.
    pub direction: Option<String>,
    /// CIDR prefixes such as `198.18.0.5/32`; empty for any address.
    pub remote_addresses: Vec<String>,
    /// Ports and ranges such as `22` and `8000-8100`; empty for any port.
    pub remote_ports: Vec<String>,
}

/// A stored exclusion rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExclusionRuleRecord {
    pub seq: i64,
    pub id: String,
    pub fields: ExclusionRuleFields,
    pub created_at: i64,
    pub updated_at: i64,
    /// The rule-set version this rule's last change produced.
    pub version: i64,
}

/// Every rule, in creation order, and the version they make up together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExclusionRuleSet {
    pub version: i64,
    pub rules: Vec<ExclusionRuleRecord>,
}

const VERSION_KEY: &str = "exclusion_version";

const RULE_COLUMNS: &str = "seq, id, name, description, executable_path, systemd_unit, \
     direction, remote_addresses, remote_ports, created_at, updated_at, version";

/// The key that makes names unique regardless of case.
fn name_key(name: &str) -> String {
    name.to_lowercase()
}

fn join(list: &[String]) -> Option<String> {
    (!list.is_empty()).then(|| list.join(","))
}

fn split(text: Option<String>) -> Vec<String> {
    text.map(|t| {
        t.split(',')
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

fn rule_from_row(row: &Row<'_>) -> rusqlite::Result<ExclusionRuleRecord> {
    Ok(ExclusionRuleRecord {
        seq: row.get(0)?,
        id: row.get(1)?,
        fields: ExclusionRuleFields {
            name: row.get(2)?,
            description: row.get(3)?,
            executable_path: row.get(4)?,
            systemd_unit: row.get(5)?,
            direction: row.get(6)?,
            remote_addresses: split(row.get(7)?),
            remote_ports: split(row.get(8)?),
        },
        created_at: row.get(9)?,
        updated_at: row.get(10)?,
        version: row.get(11)?,
    })
}

fn read_version(conn: &Connection) -> Result<i64> {
    let version: Option<i64> = conn
        .prepare_cached("SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?1")?
        .query_row([VERSION_KEY], |r| r.get(0))
        .optional()?;
    Ok(version.unwrap_or(0))
}

/// Adds one to the rule-set version and returns the new version.
fn bump_version(conn: &Connection) -> Result<i64> {
    let version = read_version(conn)? + 1;
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![VERSION_KEY, version.to_string()])?;
    Ok(version)
}

pub(crate) fn get_rule(conn: &Connection, id: &str) -> Result<Option<ExclusionRuleRecord>> {
    let sql = format!("SELECT {RULE_COLUMNS} FROM exclusion_rules WHERE id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id], rule_from_row)
        .optional()?)
}

fn list_rules(conn: &Connection) -> Result<Vec<ExclusionRuleRecord>> {
    let sql = format!("SELECT {RULE_COLUMNS} FROM exclusion_rules ORDER BY seq");
    Ok(conn
        .prepare_cached(&sql)?
        .query_map([], rule_from_row)?
        .collect::<rusqlite::Result<_>>()?)
}

/// `Conflict` with the name of the rule, other than `except_id`, whose name
/// equals `name` regardless of case.
fn check_name_free(conn: &Connection, name: &str, except_id: Option<&str>) -> Result<()> {
    let taken: Option<String> = conn
        .prepare_cached("SELECT name FROM exclusion_rules WHERE name_key = ?1 AND id IS NOT ?2")?
        .query_row(params![name_key(name), except_id], |r| r.get(0))
        .optional()?;
    match taken {
        Some(name) => Err(StoreError::Conflict(name)),
        None => Ok(()),
    }
}

impl Store {
    /// Records a new rule and bumps the rule-set version. `Conflict` when
    /// another rule has the same name regardless of case.
    pub async fn create_exclusion_rule(
        &self,
        id: String,
        fields: ExclusionRuleFields,
        now: i64,
    ) -> Result<ExclusionRuleRecord> {
        self.write(move |conn| {
            check_name_free(conn, &fields.name, None)?;
            let version = bump_version(conn)?;
            conn.prepare_cached(
                "INSERT INTO exclusion_rules (id, name, name_key, description, executable_path, \
                 systemd_unit, direction, remote_addresses, remote_ports, created_at, \
                 updated_at, version) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11)",
            )?
            .execute(params![
                id,
                fields.name,
                name_key(&fields.name),
                fields.description,
                fields.executable_path,
                fields.systemd_unit,
                fields.direction,
                join(&fields.remote_addresses),
                join(&fields.remote_ports),
                now,
                version,
            ])?;
            get_rule(conn, &id)?.ok_or(StoreError::NotFound)
        })
        .await
    }

    pub async fn get_exclusion_rule(&self, id: &str) -> Result<Option<ExclusionRuleRecord>> {
        let id = id.to_owned();
        self.read(move |conn| get_rule(conn, &id)).await
    }

    /// The rule whose name equals `name` regardless of case.
    pub async fn get_exclusion_rule_by_name(
        &self,
        name: &str,
    ) -> Result<Option<ExclusionRuleRecord>> {
        let key = name_key(name);
        self.read(move |conn| {
            let sql = format!("SELECT {RULE_COLUMNS} FROM exclusion_rules WHERE name_key = ?1");
            Ok(conn
                .prepare_cached(&sql)?
                .query_row([key], rule_from_row)
                .optional()?)
        })
        .await
    }

    /// Every rule, in creation order.
    pub async fn list_exclusion_rules(&self) -> Result<Vec<ExclusionRuleRecord>> {
        self.read(list_rules).await
    }

    /// Every rule and the version they make up, read in one transaction.
    pub async fn exclusion_rule_set(&self) -> Result<ExclusionRuleSet> {
        self.read(|conn| {
            let tx = conn.unchecked_transaction()?;
            let version = read_version(&tx)?;
            let rules = list_rules(&tx)?;
            tx.finish()?;
            Ok(ExclusionRuleSet { version, rules })
        })
        .await
    }

    /// Changes a rule, atomically: `change` gets the rule as it is and
    /// returns all of its new fields, or its own error (which changes
    /// nothing and is returned as `Ok(Err(_))`). A change that leaves the
    /// fields as they were writes nothing and keeps the version. `NotFound`
    /// for an unknown id, `Conflict` for a name another rule has.
    pub async fn update_exclusion_rule<E, F>(
        &self,
        id: &str,
        now: i64,
        change: F,
    ) -> Result<Result<ExclusionRuleRecord, E>>
    where
        E: Send + 'static,
        F: FnOnce(&ExclusionRuleRecord) -> Result<ExclusionRuleFields, E> + Send + 'static,
    {
        let id = id.to_owned();
        self.write(move |conn| {
            let current = get_rule(conn, &id)?.ok_or(StoreError::NotFound)?;
            let fields = match change(&current) {
                Ok(fields) => fields,
                Err(e) => return Ok(Err(e)),
            };
            if fields == current.fields {
                return Ok(Ok(current));
            }
            check_name_free(conn, &fields.name, Some(&id))?;
            let version = bump_version(conn)?;
            conn.prepare_cached(
                "UPDATE exclusion_rules SET name = ?2, name_key = ?3, description = ?4, \
                 executable_path = ?5, systemd_unit = ?6, direction = ?7, \
                 remote_addresses = ?8, remote_ports = ?9, updated_at = ?10, version = ?11 \
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                fields.name,
                name_key(&fields.name),
                fields.description,
                fields.executable_path,
                fields.systemd_unit,
                fields.direction,
                join(&fields.remote_addresses),
                join(&fields.remote_ports),
                now.max(current.updated_at),
                version,
            ])?;
            Ok(Ok(get_rule(conn, &id)?.ok_or(StoreError::NotFound)?))
        })
        .await
    }

    /// Deletes a rule and bumps the rule-set version; returns the new
    /// version. `NotFound` when there was none.
    pub async fn delete_exclusion_rule(&self, id: &str) -> Result<i64> {
        let id = id.to_owned();
        self.write(move |conn| {
            match conn
                .prepare_cached("DELETE FROM exclusion_rules WHERE id = ?1")?
                .execute([&id])?
            {
                0 => Err(StoreError::NotFound),
                _ => bump_version(conn),
            }
        })
        .await
    }

    /// The current rule-set version (0 before the first change).
    pub async fn exclusion_version(&self) -> Result<i64> {
        self.read(read_version).await
    }

    /// Records the rule-set version a machine's agent reports applying
    /// (`None`: none in force).
    pub async fn set_exclusion_version(
        &self,
        machine_id: &str,
        version: Option<i64>,
    ) -> Result<()> {
        let machine_id = machine_id.to_owned();
        self.write(move |conn| {
            conn.prepare_cached("UPDATE machines SET exclusion_version = ?2 WHERE id = ?1")?
                .execute(params![machine_id, version])?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDb(std::path::PathBuf);

    impl TempDb {
        fn new(label: &str) -> TempDb {
            static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "cordon-store-{label}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDb(dir)
        }
        fn open(&self) -> Store {
            Store::open(&self.0.join("cordon.db")).unwrap()
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ssh(name: &str) -> ExclusionRuleFields {
        ExclusionRuleFields {
            name: name.into(),
            systemd_unit: Some("sshd.service".into()),
            remote_addresses: vec!["198.18.0.0/24".into(), "fd00::/64".into()],
            remote_ports: vec!["22".into(), "8000-8100".into()],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn rules_round_trip_and_every_change_bumps_the_version() {
        let db = TempDb::new("rules");
        let store = db.open();
        assert_eq!(store.exclusion_version().await.unwrap(), 0);
        assert_eq!(
            store.exclusion_rule_set().await.unwrap(),
            ExclusionRuleSet::default()
        );

        let a = store
            .create_exclusion_rule("a".into(), ssh("SSH"), 10)
            .await
            .unwrap();
        assert_eq!(a.fields, ssh("SSH"));
        assert_eq!((a.version, a.created_at, a.updated_at), (1, 10, 10));
        let b = store
            .create_exclusion_rule(
                "b".into(),
                ExclusionRuleFields {
                    name: "Backup".into(),
                    direction: Some("Outbound".into()),
                    executable_path: Some("/usr/bin/restic".into()),
                    ..Default::default()
                },
                11,
            )
            .await
            .unwrap();
        assert_eq!(b.version, 2);
        assert_eq!(b.fields.remote_addresses, Vec::<String>::new());
        assert_eq!(
            store.get_exclusion_rule("a").await.unwrap(),
            Some(a.clone())
        );
        assert_eq!(
            store.get_exclusion_rule_by_name("backup").await.unwrap(),
            Some(b.clone())
        );
        assert_eq!(store.get_exclusion_rule("zz").await.unwrap(), None);

        // Names are unique regardless of case, Unicode included.
        for taken in ["ssh", "BACKUP"] {
            assert!(matches!(
                store
                    .create_exclusion_rule("c".into(), ssh(taken), 12)
                    .await,
                Err(StoreError::Conflict(_))
            ));
        }
        store
            .create_exclusion_rule("c".into(), ssh("Äpfel"), 12)
            .await
            .unwrap();
        assert!(matches!(
            store.create_exclusion_rule("d".into(), ssh("äPFEL"), 12).await,
            Err(StoreError::Conflict(name)) if name == "Äpfel"
        ));
        assert_eq!(store.exclusion_version().await.unwrap(), 3);

        // Update: full replacement, one version more; a no-op writes nothing.
        let updated = store
            .update_exclusion_rule::<(), _>("a", 20, |current| {
                Ok(ExclusionRuleFields {
                    remote_ports: vec![],
                    ..current.fields.clone()
                })
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(updated.version, 4);
        assert_eq!(updated.updated_at, 20);
        assert_eq!(updated.created_at, 10);
        assert!(updated.fields.remote_ports.is_empty());
        let same = store
            .update_exclusion_rule::<(), _>("a", 30, |current| Ok(current.fields.clone()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(same, updated);
        let refused = store
            .update_exclusion_rule("a", 30, |_| Err("no"))
            .await
            .unwrap();
        assert_eq!(refused, Err("no"));
        // Renaming onto another rule's name conflicts; a case change of its own does not.
        assert!(matches!(
            store
                .update_exclusion_rule::<(), _>("a", 30, |_| Ok(ssh("backup")))
                .await,
            Err(StoreError::Conflict(_))
        ));
        let renamed = store
            .update_exclusion_rule::<(), _>("a", 30, |_| Ok(ssh("ssh")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(renamed.fields.name, "ssh");
        assert!(matches!(
            store
                .update_exclusion_rule::<(), _>("nope", 30, |_| Ok(ssh("x")))
                .await,
            Err(StoreError::NotFound)
        ));
        assert_eq!(store.exclusion_version().await.unwrap(), 5);

        // Delete.
        assert_eq!(store.delete_exclusion_rule("b").await.unwrap(), 6);
        assert!(matches!(
            store.delete_exclusion_rule("b").await,
            Err(StoreError::NotFound)
        ));
        let set = store.exclusion_rule_set().await.unwrap();
        assert_eq!(set.version, 6);
        let ids: Vec<&str> = set.rules.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(store.list_exclusion_rules().await.unwrap(), set.rules);

        // Another handle on the same file (another process) sees the same.
        drop(store);
        assert_eq!(db.open().exclusion_version().await.unwrap(), 6);
    }

    #[tokio::test]
    async fn machines_record_the_version_their_agent_runs() {
        let db = TempDb::new("machine-version");
        let store = db.open();
        store
            .create_enroll_token(crate::EnrollToken {
                id: "t".into(),
                token_hash: "h".into(),
                created_at: 0,
                expires_at: None,
                max_uses: None,
            })
            .await
            .unwrap();
        let machine = store
            .enroll_machine(
                "h".into(),
                "m".repeat(40),
                vec![0; 32],
                crate::Facts {
                    computer_dns_name: "m1".into(),
                    ..Default::default()
                },
                1,
            )
            .await
            .unwrap();
        assert_eq!(machine.exclusion_version, None);
        store
            .set_exclusion_version(&machine.id, Some(7))
            .await
            .unwrap();
        let read = store.get_machine(&machine.id).await.unwrap().unwrap();
        assert_eq!(read.exclusion_version, Some(7));
        store
            .set_exclusion_version(&machine.id, None)
            .await
            .unwrap();
        let read = store.get_machine(&machine.id).await.unwrap().unwrap();
        assert_eq!(read.exclusion_version, None);
    }
}
