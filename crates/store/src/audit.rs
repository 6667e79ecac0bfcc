//! The audit trail: an append-only, hash-chained record of API calls.
//!
//! Each record's `hash` is the hex SHA-256 of the previous record's hash, a
//! newline, and the record's own fields (its `seq` included) in a fixed
//! order, each escaped and separated by a tab (see [`canonical`]). The first
//! record's previous hash is 64 zeros. The store only ever appends, inside
//! the write transaction, so concurrent appends (even from several
//! processes) chain one after another.

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::query::{FieldSql, Kind, Page, Query, SqlContext};
use crate::records::{Table, list};
use crate::{Result, Store};

/// The previous hash of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An audit record to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEvent {
    pub id: String,
    /// Nanoseconds since the Unix epoch.
    pub at: i64,
    pub principal: String,
    pub source_address: String,
    pub request_id: String,
    pub method: String,
    pub target: String,
    pub action: String,
    /// `Succeeded`, `Refused` or `Failed`.
    pub outcome: String,
    pub status: i64,
    pub detail: Option<String>,
}

/// A stored audit record.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub seq: i64,
    pub event: NewAuditEvent,
    pub prev_hash: String,
    pub hash: String,
}

/// The first record that breaks the chain, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditBreak {
    pub seq: i64,
    pub id: String,
    pub reason: String,
}

/// Filterable and sortable fields of audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditField {
    Id,
    At,
    Principal,
    Action,
    Outcome,
    Status,
    RequestId,
}

impl FieldSql for AuditField {
    fn expr(&self, _ctx: &SqlContext) -> String {
        match self {
            AuditField::Id => "t.id",
            AuditField::At => "t.at",
            AuditField::Principal => "t.principal",
            AuditField::Action => "t.action",
            AuditField::Outcome => "t.outcome",
            AuditField::Status => "t.status",
            AuditField::RequestId => "t.request_id",
        }
        .to_owned()
    }
    fn kind(&self) -> Kind {
        match self {
            AuditField::At => Kind::Time,
            AuditField::Status => Kind::Int,
            _ => Kind::Text,
        }
    }
}

const AUDIT_COLUMNS: &str = "t.seq, t.id, t.at, t.principal, t.source_address, t.request_id, \
     t.method, t.target, t.action, t.outcome, t.status, t.detail, t.prev_hash, t.hash";
const AUDIT_COLUMN_COUNT: usize = 14;

fn audit_from_row(row: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        seq: row.get(0)?,
        event: NewAuditEvent {
            id: row.get(1)?,
            at: row.get(2)?,
            principal: row.get(3)?,
            source_address: row.get(4)?,
            request_id: row.get(5)?,
            method: row.get(6)?,
            target: row.get(7)?,
            action: row.get(8)?,
            outcome: row.get(9)?,
            status: row.get(10)?,
            detail: row.get(11)?,
        },
        prev_hash: row.get(12)?,
        hash: row.get(13)?,
    })
}

const AUDIT: Table<AuditRecord> = Table {
    name: "audit_events",
    columns: AUDIT_COLUMNS,
    column_count: AUDIT_COLUMN_COUNT,
    from_row: audit_from_row,
    seq_of: |a| a.seq,
    // Audit records belong to no machine group.
    group_expr: "0",
};

/// Appends `text` escaped: `\` → `\\`, tab → `\t`, newline → `\n`,
/// carriage return → `\r`. An escaped field holds no tab or newline, and a
/// backslash in it is always followed by `\`, `t`, `n` or `r`.
fn push_escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// The record's fields in their fixed order, tab-separated; a missing
/// `detail` is `\N`, which no escaped text can be.
pub fn canonical(seq: i64, event: &NewAuditEvent) -> String {
    let mut out = String::new();
    out.push_str(&seq.to_string());
    for text in [
        event.id.as_str(),
        &event.at.to_string(),
        &event.principal,
        &event.source_address,
        &event.request_id,
        &event.method,
        &event.target,
        &event.action,
        &event.outcome,
        &event.status.to_string(),
    ] {
        out.push('\t');
        push_escaped(&mut out, text);
    }
    out.push('\t');
    match &event.detail {
        Some(detail) => push_escaped(&mut out, detail),
        None => out.push_str("\\N"),
    }
    out
}

/// hex(SHA-256(prev_hash + "\n" + canonical(seq, event))).
pub fn chain_hash(prev_hash: &str, seq: i64, event: &NewAuditEvent) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(prev_hash.as_bytes());
    ctx.update(b"\n");
    ctx.update(canonical(seq, event).as_bytes());
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn append(conn: &Connection, event: &NewAuditEvent) -> Result<AuditRecord> {
    let prev_hash: String = conn
        .prepare_cached("SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?
        .unwrap_or_else(|| GENESIS_HASH.to_owned());
    // The row gets its seq from AUTOINCREMENT (never reused, even after a
    // deletion), then its hash, which covers that seq.
    conn.prepare_cached(
        "INSERT INTO audit_events (id, at, principal, source_address, request_id, method, \
         target, action, outcome, status, detail, prev_hash, hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, '')",
    )?
    .execute(params![
        event.id,
        event.at,
        event.principal,
        event.source_address,
        event.request_id,
        event.method,
        event.target,
        event.action,
        event.outcome,
        event.status,
        event.detail,
        prev_hash,
    ])?;
    let seq = conn.last_insert_rowid();
    let hash = chain_hash(&prev_hash, seq, event);
    conn.prepare_cached("UPDATE audit_events SET hash = ?2 WHERE seq = ?1")?
        .execute(params![seq, hash])?;
    Ok(AuditRecord {
        seq,
        event: event.clone(),
        prev_hash,
        hash,
    })
}

/// Walks the chain in `seq` order; the number of records, or the first bad one.
fn verify(conn: &Connection) -> Result<std::result::Result<u64, AuditBreak>> {
    let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_events t ORDER BY t.seq");
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query([])?;
    let mut expected_prev = GENESIS_HASH.to_owned();
    let mut last_seq = 0i64;
    let mut count = 0u64;
    while let Some(row) = rows.next()? {
        let record = audit_from_row(row)?;
        let broken = |reason: String| {
            Ok(Err(AuditBreak {
                seq: record.seq,
                id: record.event.id.clone(),
                reason,
            }))
        };
        if record.seq != last_seq + 1 {
            return broken(if last_seq == 0 {
                format!(
                    "records before it are missing (the chain starts at {})",
                    record.seq
                )
            } else {
                format!("records are missing before it (the previous record is {last_seq})")
            });
        }
        if record.prev_hash != expected_prev {
            return broken(if last_seq == 0 {
                "its previous hash is not the start of the chain".to_owned()
            } else {
                format!("its previous hash does not match the hash of record {last_seq}")
            });
        }
        if chain_hash(&record.prev_hash, record.seq, &record.event) != record.hash {
            return broken("its fields do not match its hash (the record was altered)".to_owned());
        }
        expected_prev = record.hash;
        last_seq = record.seq;
        count += 1;
    }
    Ok(Ok(count))
}

impl Store {
    /// Appends a record to the audit trail, chained to the last one.
    pub async fn append_audit(&self, event: NewAuditEvent) -> Result<AuditRecord> {
        self.write(move |conn| append(conn, &event)).await
    }

    /// A page of audit records.
    pub async fn list_audit(&self, query: Query<AuditField>) -> Result<Page<AuditRecord>> {
        self.read(move |conn| list(conn, &AUDIT, &query, &SqlContext::default()))
            .await
    }

    /// Recomputes the whole chain: `Ok(Ok(n))` when its `n` records are
    /// intact, `Ok(Err(..))` naming the first record that is not.
    pub async fn verify_audit(&self) -> Result<std::result::Result<u64, AuditBreak>> {
        self.read(verify).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: i64) -> NewAuditEvent {
        NewAuditEvent {
            id: format!("id-{n}"),
            at: n,
            principal: "app\t(x)".into(),
            source_address: "127.0.0.1".into(),
            request_id: format!("r{n}"),
            method: "POST".into(),
            target: "/api/machines/x/isolate".into(),
            action: "isolate".into(),
            outcome: "Succeeded".into(),
            status: 201,
            detail: None,
        }
    }

    #[test]
    fn escaping_keeps_fields_apart() {
        let mut a = event(1);
        a.principal = "a\tb".into();
        let mut b = event(1);
        b.principal = "a".into();
        b.source_address = "b\t127.0.0.1".into();
        assert_ne!(canonical(1, &a), canonical(1, &b));
        let mut c = event(1);
        c.detail = Some("\\N".into());
        assert_ne!(canonical(1, &c), canonical(1, &event(1)));
    }

    #[test]
    fn the_chain_detects_edits_and_deletions() {
        let dir = std::env::temp_dir().join(format!("cordon-store-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cordon.db");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let store = Store::open(&path).unwrap();
            let appends: Vec<_> = (1..=5).map(|n| store.append_audit(event(n))).collect();
            for append in appends {
                append.await.unwrap();
            }
            assert_eq!(store.verify_audit().await.unwrap(), Ok(5));
            let page = store.list_audit(Query::default()).await.unwrap();
            assert_eq!(page.items.len(), 5);
            assert_eq!(page.items[0].prev_hash, GENESIS_HASH);
            assert_eq!(page.items[1].prev_hash, page.items[0].hash);

            let raw = Connection::open(&path).unwrap();
            raw.execute("UPDATE audit_events SET target = 'x' WHERE seq = 3", [])
                .unwrap();
            let broken = store.verify_audit().await.unwrap().unwrap_err();
            assert_eq!(broken.seq, 3);
            raw.execute(
                "UPDATE audit_events SET target = '/api/machines/x/isolate' WHERE seq = 3",
                [],
            )
            .unwrap();
            assert_eq!(store.verify_audit().await.unwrap(), Ok(5));
            raw.execute("DELETE FROM audit_events WHERE seq = 2", [])
                .unwrap();
            let broken = store.verify_audit().await.unwrap().unwrap_err();
            assert_eq!(broken.seq, 3);
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
