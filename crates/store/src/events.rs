//! The event log (migration 9): one row per change worth telling, written
//! in the transaction of that change.
//!
//! How changes are caught: the writer connection has temporary triggers
//! (they exist only on that connection, never in the database file) that
//! note, in the temporary table `changes`, every action inserted or whose
//! status changed, every machine whose isolation state or scope moved,
//! every exclusion rule inserted, updated or deleted and every audit
//! record inserted. After each write job, still inside its savepoint,
//! [`record`] turns those notes into rows of `events`: the job and its
//! events commit together or not at all, whatever code path made the
//! change.
//!
//! The body of an event is rendered once, when it is written, by the
//! [`EventRenderer`] the process installed (the server renders the public
//! entities of the API): the store only names the event, decides its
//! audience and keeps the text. A store without a renderer (the benchmark
//! tool) records no events.

use std::collections::HashSet;

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::{ActionRecord, AuditRecord, ExclusionRuleRecord, MachineRecord, Result, Store};

/// An action was created: the action as created.
pub const ACTION_CREATED: &str = "machineAction.created";
/// An action reached a final status (Succeeded, Failed, TimeOut, Cancelled).
pub const ACTION_COMPLETED: &str = "machineAction.completed";
/// An action changed status without finishing (`InProgress`).
pub const ACTION_UPDATED: &str = "machineAction.updated";
/// A machine's isolation state or scope moved: the machine as it is then.
pub const ISOLATION_CHANGED: &str = "machine.isolationChanged";
/// An exclusion rule was created, updated or deleted.
pub const EXCLUSION_CHANGED: &str = "exclusionRule.changed";
/// An audit record was appended.
pub const AUDIT_APPENDED: &str = "audit.appended";
/// A machine's agent found its isolation rules tampered with (and put
/// them back): the machine, with what the agent found.
pub const TAMPER_DETECTED: &str = "machine.tamperDetected";

/// Every event type, as webhooks subscribe to them.
pub const EVENT_TYPES: [&str; 7] = [
    ACTION_CREATED,
    ACTION_UPDATED,
    ACTION_COMPLETED,
    ISOLATION_CHANGED,
    TAMPER_DETECTED,
    EXCLUSION_CHANGED,
    AUDIT_APPENDED,
];

const FINAL_STATUSES: [&str; 4] = ["Succeeded", "Failed", "TimeOut", "Cancelled"];

/// What an event is about, as the store has it at the event.
#[derive(Debug)]
pub enum EventSubject<'a> {
    /// An action (created, or after its change of status).
    Action(&'a ActionRecord),
    /// A machine after its isolation moved.
    Machine(&'a MachineRecord),
    /// An exclusion rule: `change` is `created`, `updated` or `deleted`
    /// (then `rule` is `None`).
    ExclusionRule {
        id: &'a str,
        change: &'static str,
        rule: Option<&'a ExclusionRuleRecord>,
    },
    /// An audit record.
    Audit(&'a AuditRecord),
    /// A machine whose agent reported tampering, and what it reported.
    Tamper {
        machine: &'a MachineRecord,
        detail: &'a str,
    },
}

/// Renders the body of an event: called on the writer thread, inside the
/// transaction of the change, so it must be quick and must not touch the
/// store. An error fails the write (a change is never committed without
/// its event).
pub trait EventRenderer: Send + Sync {
    /// The body of the event of type `event_type` at `at` (nanoseconds
    /// since the Unix epoch) about `subject`.
    fn render(
        &self,
        event_type: &str,
        at: i64,
        subject: &EventSubject<'_>,
    ) -> std::result::Result<String, String>;
}

/// Who may see an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventAudience {
    /// Callers reaching the machine group (`None`: only callers reaching
    /// every group).
    Machine(Option<i64>),
    /// Callers who may change settings.
    Settings,
    /// Callers who may read the audit trail.
    Audit,
}

/// One row of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// The durable event id: increasing, never reused.
    pub seq: i64,
    pub event_type: String,
    /// Nanoseconds since the Unix epoch.
    pub at: i64,
    pub machine_id: Option<String>,
    pub audience: EventAudience,
    pub body: String,
}

/// Where the log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventBounds {
    /// The id of the last event ever written (0: none yet), pruned or not.
    pub last: i64,
}

/// The temporary table and triggers of the writer connection. Created
/// on a schema that has the event log (migration 9 and later).
pub(crate) const CAPTURE: &str = "
PRAGMA temp_store = MEMORY;
CREATE TEMP TABLE IF NOT EXISTS changes (
    n    INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    id   TEXT NOT NULL,
    old1 TEXT,
    old2 TEXT
);
CREATE TEMP TRIGGER IF NOT EXISTS capture_action_created AFTER INSERT ON main.actions
BEGIN INSERT INTO changes (kind, id) VALUES ('action', NEW.id); END;
CREATE TEMP TRIGGER IF NOT EXISTS capture_action_status AFTER UPDATE OF status ON main.actions
WHEN OLD.status IS NOT NEW.status
BEGIN INSERT INTO changes (kind, id, old1) VALUES ('action', NEW.id, OLD.status); END;
CREATE TEMP TRIGGER IF NOT EXISTS capture_isolation
AFTER UPDATE OF isolation_state, isolation_scope ON main.machines
WHEN OLD.isolation_state IS NOT NEW.isolation_state OR OLD.isolation_scope IS NOT NEW.isolation_scope
BEGIN INSERT INTO changes (kind, id, old1, old2)
      VALUES ('machine', NEW.id, OLD.isolation_state, OLD.isolation_scope); END;
CREATE TEMP TRIGGER IF NOT EXISTS capture_rule_created AFTER INSERT ON main.exclusion_rules
BEGIN INSERT INTO changes (kind, id, old1) VALUES ('rule', NEW.id, 'created'); END;
CREATE TEMP TRIGGER IF NOT EXISTS capture_rule_updated AFTER UPDATE ON main.exclusion_rules
BEGIN INSERT INTO changes (kind, id, old1) VALUES ('rule', NEW.id, 'updated'); END;
CREATE TEMP TRIGGER IF NOT EXISTS capture_rule_deleted AFTER DELETE ON main.exclusion_rules
BEGIN INSERT INTO changes (kind, id, old1) VALUES ('rule', OLD.id, 'deleted'); END;
CREATE TEMP TRIGGER IF NOT EXISTS capture_audit AFTER INSERT ON main.audit_events
BEGIN INSERT INTO changes (kind, id) VALUES ('audit', NEW.seq); END;
CREATE TEMP TRIGGER IF NOT EXISTS capture_tamper AFTER UPDATE OF tamper_count ON main.machines
WHEN NEW.tamper_count > OLD.tamper_count
BEGIN INSERT INTO changes (kind, id) VALUES ('tamper', NEW.id); END;
";

/// The schema version from which the log exists.
pub(crate) const SINCE_VERSION: usize = 9;
/// The schema version from which events also queue webhook deliveries.
pub(crate) const WEBHOOKS_SINCE_VERSION: usize = 10;

/// What one write job recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Recorded {
    pub events: usize,
    pub deliveries: usize,
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(i64::MAX as u128) as i64)
}

fn machine_group(conn: &Connection, machine_id: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT rbac_group_id FROM machines WHERE id = ?1")?
        .query_row([machine_id], |r| r.get(0))
        .optional()?)
}

/// Turns the changes the triggers noted during a job into events and, with
/// `outbox`, each event into one delivery per webhook subscribed to its
/// type. Runs inside the job's savepoint: an error undoes the job.
pub(crate) fn record(
    conn: &Connection,
    renderer: Option<&dyn EventRenderer>,
    outbox: bool,
) -> Result<Recorded> {
    let noted: Vec<(String, String, Option<String>, Option<String>)> = conn
        .prepare_cached("SELECT kind, id, old1, old2 FROM temp.changes ORDER BY n")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    if noted.is_empty() {
        return Ok(Recorded::default());
    }
    conn.prepare_cached("DELETE FROM temp.changes")?
        .execute([])?;
    let Some(renderer) = renderer else {
        return Ok(Recorded::default());
    };
    let at = now_nanos();
    let mut machines_seen = HashSet::new();
    let mut insert = conn.prepare_cached(
        "INSERT INTO events (type, at, machine_id, group_id, audience, body) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    // One delivery per webhook subscribed to the type; its id is the
    // `webhook-id` of every attempt.
    let mut queue = if outbox {
        Some(conn.prepare_cached(
            "INSERT INTO webhook_deliveries \
             (id, webhook_id, event_seq, event_type, body, created_at, next_attempt_at) \
             SELECT 'msg_' || lower(hex(randomblob(16))), id, ?1, ?2, ?3, ?4, ?4 \
             FROM webhooks WHERE instr(' ' || events || ' ', ' ' || ?2 || ' ') > 0",
        )?)
    } else {
        None
    };
    let mut recorded = Recorded::default();
    let mut write = |event_type: &str,
                     machine: Option<(&str, Option<i64>)>,
                     audience: &str,
                     subject: EventSubject<'_>|
     -> Result<()> {
        let body = renderer
            .render(event_type, at, &subject)
            .map_err(|e| crate::StoreError::Commit(format!("cannot render an event: {e}")))?;
        insert.execute(params![
            event_type,
            at,
            machine.map(|m| m.0),
            machine.and_then(|m| m.1),
            audience,
            body
        ])?;
        recorded.events += 1;
        if let Some(queue) = queue.as_mut() {
            let seq = conn.last_insert_rowid();
            recorded.deliveries += queue.execute(params![seq, event_type, body, at])?;
        }
        Ok(())
    };
    for (kind, id, old1, old2) in noted {
        match kind.as_str() {
            "action" => {
                let Some(action) = crate::records::get_action(conn, &id)? else {
                    continue;
                };
                let event_type = match old1 {
                    None => ACTION_CREATED,
                    Some(_) if FINAL_STATUSES.contains(&action.status.as_str()) => ACTION_COMPLETED,
                    Some(_) => ACTION_UPDATED,
                };
                let group = machine_group(conn, &action.machine_id)?;
                write(
                    event_type,
                    Some((&action.machine_id, group)),
                    "machine",
                    EventSubject::Action(&action),
                )?;
            }
            "machine" => {
                // Once per job, as the machine is at its end, and only if
                // it did move from where it was before the job.
                if !machines_seen.insert(id.clone()) {
                    continue;
                }
                let Some(machine) = crate::records::get_machine_by_id(conn, &id)? else {
                    continue;
                };
                if machine.isolation_state == old1.unwrap_or_default()
                    && machine.isolation_scope == old2
                {
                    continue;
                }
                write(
                    ISOLATION_CHANGED,
                    Some((&machine.id, Some(machine.rbac_group_id))),
                    "machine",
                    EventSubject::Machine(&machine),
                )?;
            }
            "rule" => {
                let change = match old1.as_deref() {
                    Some("created") => "created",
                    Some("deleted") => "deleted",
                    _ => "updated",
                };
                let rule = if change == "deleted" {
                    None
                } else {
                    crate::exclusions::get_rule(conn, &id)?
                };
                write(
                    EXCLUSION_CHANGED,
                    None,
                    "settings",
                    EventSubject::ExclusionRule {
                        id: &id,
                        change,
                        rule: rule.as_ref(),
                    },
                )?;
            }
            "audit" => {
                let Ok(seq) = id.parse::<i64>() else { continue };
                let Some(record) = crate::audit::get_audit(conn, seq)? else {
                    continue;
                };
                write(AUDIT_APPENDED, None, "audit", EventSubject::Audit(&record))?;
            }
            "tamper" => {
                let Some(machine) = crate::records::get_machine_by_id(conn, &id)? else {
                    continue;
                };
                let detail: Option<String> = conn
                    .prepare_cached("SELECT last_tamper_detail FROM machines WHERE id = ?1")?
                    .query_row([&id], |r| r.get(0))?;
                write(
                    TAMPER_DETECTED,
                    Some((&machine.id, Some(machine.rbac_group_id))),
                    "machine",
                    EventSubject::Tamper {
                        machine: &machine,
                        detail: detail.as_deref().unwrap_or(""),
                    },
                )?;
            }
            _ => {}
        }
    }
    Ok(recorded)
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    let audience: String = row.get(5)?;
    let group: Option<i64> = row.get(4)?;
    Ok(StoredEvent {
        seq: row.get(0)?,
        event_type: row.get(1)?,
        at: row.get(2)?,
        machine_id: row.get(3)?,
        audience: match audience.as_str() {
            "settings" => EventAudience::Settings,
            "audit" => EventAudience::Audit,
            _ => EventAudience::Machine(group),
        },
        body: row.get(6)?,
    })
}

impl Store {
    /// Installs the renderer of event bodies, replacing any before it:
    /// from now on every write records its events.
    pub fn set_event_renderer(&self, renderer: std::sync::Arc<dyn EventRenderer>) {
        *self
            .inner
            .renderer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(renderer);
    }

    /// Where the log stands.
    pub async fn event_bounds(&self) -> Result<EventBounds> {
        self.read(|conn| {
            let last: Option<i64> = conn
                .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = 'events'")?
                .query_row([], |r| r.get(0))
                .optional()?;
            Ok(EventBounds {
                last: last.unwrap_or(0),
            })
        })
        .await
    }

    /// The events after id `after` up to id `upto` (both ends: `after`
    /// excluded, `upto` included), in order, `limit` at most.
    pub async fn events_after(
        &self,
        after: i64,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT seq, type, at, machine_id, group_id, audience, body FROM events \
                     WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
                )?
                .query_map(
                    params![after, upto, limit.min(i64::MAX as usize) as i64],
                    event_from_row,
                )?
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Removes up to `batch` of the oldest events written before `before`
    /// (nanoseconds); the number removed. One bounded write: a caller
    /// removing more calls again.
    pub async fn prune_events(&self, before: i64, batch: usize) -> Result<u64> {
        let batch = batch.min(i64::MAX as usize) as i64;
        self.write(move |conn| {
            let removed = conn
                .prepare_cached(
                    "DELETE FROM events WHERE seq IN \
                     (SELECT seq FROM events WHERE at < ?1 ORDER BY at LIMIT ?2)",
                )?
                .execute(params![before, batch])?;
            Ok(removed as u64)
        })
        .await
    }

    /// How many events the log holds.
    pub async fn event_count(&self) -> Result<u64> {
        self.read(|conn| {
            Ok(conn.query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0))? as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{ExclusionRuleFields, NewAction, NewAuditEvent, Outcome, StoreError};

    struct TempDb(std::path::PathBuf);

    impl TempDb {
        fn new(label: &str) -> TempDb {
            let dir = std::env::temp_dir().join(format!(
                "cordon-store-events-{label}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDb(dir)
        }
        fn path(&self) -> std::path::PathBuf {
            self.0.join("cordon.db")
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Renders `<type> <what the subject is at the event>`; fails when
    /// told to.
    struct Plain {
        fail: bool,
    }

    impl EventRenderer for Plain {
        fn render(
            &self,
            event_type: &str,
            _at: i64,
            subject: &EventSubject<'_>,
        ) -> std::result::Result<String, String> {
            if self.fail {
                return Err("refused".into());
            }
            let what = match subject {
                EventSubject::Action(a) => a.status.clone(),
                EventSubject::Machine(m) => {
                    format!(
                        "{}/{}",
                        m.isolation_state,
                        m.isolation_scope.as_deref().unwrap_or("-")
                    )
                }
                EventSubject::ExclusionRule { change, rule, .. } => {
                    format!("{change}/{}", rule.map_or("-", |r| r.fields.name.as_str()))
                }
                EventSubject::Audit(r) => r.event.action.clone(),
                EventSubject::Tamper { detail, .. } => (*detail).to_owned(),
            };
            Ok(format!("{event_type} {what}"))
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    async fn machine(store: &Store, id: &str, group: i64) {
        let id = id.to_owned();
        store
            .write(move |conn| {
                conn.execute(
                    "INSERT INTO machines (id, public_key, computer_dns_name, first_seen, last_seen, \
                     rbac_group_id) VALUES (?1, ?2, ?1, 1, 1, ?3)",
                    params![id, id.as_bytes(), group],
                )?;
                Ok(())
            })
            .await
            .unwrap();
    }

    fn isolate(id: &str, machine: &str) -> NewAction {
        NewAction {
            id: id.into(),
            action_type: "Isolate".into(),
            title: None,
            requestor: "soar".into(),
            requestor_comment: "outbreak".into(),
            machine_id: machine.into(),
            scope: Some("Full".into()),
            external_id: None,
            request_source: "PublicApi".into(),
            now: 10,
        }
    }

    fn audit(action: &str) -> NewAuditEvent {
        NewAuditEvent {
            id: format!("audit-{action}"),
            at: 20,
            principal: "p".into(),
            source_address: String::new(),
            request_id: String::new(),
            method: "POST".into(),
            target: "/api/x".into(),
            action: action.into(),
            outcome: "Succeeded".into(),
            status: 200,
            detail: None,
            count: 1,
        }
    }

    fn bodies(events: &[StoredEvent]) -> Vec<&str> {
        events.iter().map(|e| e.body.as_str()).collect()
    }

    /// Each change writes its event, as the subject was at that moment,
    /// in order, with the machine's group as audience; a write that fails
    /// writes none.
    #[test]
    fn every_change_writes_its_event_as_of_that_moment() {
        let db = TempDb::new("changes");
        let runtime = runtime();
        runtime.block_on(async {
            let store = Store::open(&db.path()).unwrap();
            store.set_event_renderer(Arc::new(Plain { fail: false }));
            machine(&store, "m1", 3).await;
            store.create_action(isolate("a1", "m1")).await.unwrap();
            // Refused (one in flight): nothing written.
            assert!(matches!(
                store.create_action(isolate("a2", "m1")).await,
                Err(StoreError::ActiveExists(_))
            ));
            store.start_action("m1", "a1", 11).await.unwrap();
            let outcome = Outcome {
                succeeded: true,
                error_hresult: 0,
                reason: None,
                enforced_scope: Some("Full".into()),
            };
            store.finish_action("m1", "a1", outcome, 12).await.unwrap();
            store.append_audit(audit("machine.isolate")).await.unwrap();
            let rule = store
                .create_exclusion_rule(
                    "r1".into(),
                    ExclusionRuleFields {
                        name: "ssh".into(),
                        systemd_unit: Some("sshd.service".into()),
                        ..Default::default()
                    },
                    13,
                )
                .await
                .unwrap();
            store.delete_exclusion_rule(&rule.id).await.unwrap();
            // What the agent reports in force outside of any action.
            store.set_enforced("m1", None).await.unwrap();
            // Not an isolation change: no event.
            store.set_enforced("m1", None).await.unwrap();

            let events = store.events_after(0, i64::MAX, 100).await.unwrap();
            assert_eq!(
                bodies(&events),
                [
                    "machineAction.created Pending",
                    "machine.isolationChanged Isolating/-",
                    "machineAction.updated InProgress",
                    "machineAction.completed Succeeded",
                    "machine.isolationChanged Isolated/Full",
                    "audit.appended machine.isolate",
                    "exclusionRule.changed created/ssh",
                    "exclusionRule.changed deleted/-",
                    "machine.isolationChanged NotIsolated/-",
                ]
            );
            let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
            assert_eq!(events[0].event_type, ACTION_CREATED);
            assert_eq!(events[0].machine_id.as_deref(), Some("m1"));
            assert_eq!(events[0].audience, EventAudience::Machine(Some(3)));
            assert_eq!(events[5].audience, EventAudience::Audit);
            assert_eq!(events[5].machine_id, None);
            assert_eq!(events[6].audience, EventAudience::Settings);
            assert_eq!(store.event_bounds().await.unwrap().last, 9);
            // Pages, from a position.
            let page = store.events_after(2, 5, 2).await.unwrap();
            assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
        });
    }

    /// The event is in the action's transaction: an action that exists
    /// always has its event, even when the process stops at once after
    /// the commit (nothing after it is needed), and a change whose event
    /// cannot be written is not made.
    #[test]
    fn an_action_never_exists_without_its_event() {
        let db = TempDb::new("atomic");
        let runtime = runtime();
        runtime.block_on(async {
            let store = Store::open(&db.path()).unwrap();
            store.set_event_renderer(Arc::new(Plain { fail: true }));
            machine(&store, "m1", 0).await;
            assert!(store.create_action(isolate("a1", "m1")).await.is_err());
            assert_eq!(store.get_action("a1").await.unwrap(), None);
            let machine = store.get_machine("m1").await.unwrap().unwrap();
            assert_eq!(machine.isolation_state, "NotIsolated");

            store.set_event_renderer(Arc::new(Plain { fail: false }));
            store.create_action(isolate("a2", "m1")).await.unwrap();
            // Dropped right after the commit, as a killed process would be.
            drop(store);
        });
        runtime.block_on(async {
            let store = Store::open(&db.path()).unwrap();
            assert!(store.get_action("a2").await.unwrap().is_some());
            let events = store.events_after(0, i64::MAX, 100).await.unwrap();
            assert_eq!(
                bodies(&events),
                [
                    "machineAction.created Pending",
                    "machine.isolationChanged Isolating/-"
                ]
            );
        });
    }

    /// Pruning removes the oldest events in bounded batches; ids are never
    /// reused, even once every event is gone.
    #[test]
    fn pruning_is_bounded_and_ids_are_never_reused() {
        let db = TempDb::new("prune");
        let runtime = runtime();
        runtime.block_on(async {
            let store = Store::open(&db.path()).unwrap();
            store.set_event_renderer(Arc::new(Plain { fail: false }));
            for n in 0..5 {
                store.append_audit(audit(&format!("a{n}"))).await.unwrap();
            }
            let cutoff = now_nanos() + 1;
            assert_eq!(store.prune_events(cutoff, 2).await.unwrap(), 2);
            assert_eq!(store.event_count().await.unwrap(), 3);
            assert_eq!(store.prune_events(cutoff, 10).await.unwrap(), 3);
            assert_eq!(store.event_count().await.unwrap(), 0);
            assert_eq!(store.event_bounds().await.unwrap().last, 5);
            store.append_audit(audit("after")).await.unwrap();
            let events = store.events_after(0, i64::MAX, 10).await.unwrap();
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].seq, 6);
            // Nothing newer than the cutoff is removed.
            assert_eq!(store.prune_events(cutoff, 10).await.unwrap(), 0);
        });
    }

    /// A database written by a newer Cordon is refused, untouched.
    #[test]
    fn a_newer_schema_is_refused() {
        let db = TempDb::new("newer");
        drop(Store::open(&db.path()).unwrap());
        let conn = Connection::open(db.path()).unwrap();
        conn.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(conn);
        match Store::open(&db.path()) {
            Err(StoreError::NewerSchema(99)) => {}
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a newer schema was opened"),
        }
    }
}
