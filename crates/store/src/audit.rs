//! The audit trail: an append-only, hash-chained record of API calls.
//!
//! Each record's `hash` is the hex SHA-256 of the previous record's hash, a
//! newline, and the record's own fields (its `seq` included) in a fixed
//! order, each escaped and separated by a tab (see [`canonical`]). The first
//! record's previous hash is 64 zeros. The store only ever appends, inside
//! the write transaction, so concurrent appends (even from several
//! processes) chain one after another.
//!
//! Retention: [`Store::prune_audit`] removes the oldest records and leaves
//! a signed [`AuditCheckpoint`] (the last removed record's seq and hash);
//! verification starts from it. Each text field is capped
//! ([`NewAuditEvent::capped`]) so that no request can make a record large.

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
    /// How many calls the record stands for: 1, or more for repeated
    /// refusals folded into one record.
    pub count: i64,
}

/// The most characters each text field of a record keeps; longer text is
/// cut and ends with `…`.
pub const MAX_TARGET_CHARS: usize = 512;
pub const MAX_DETAIL_CHARS: usize = 512;
pub const MAX_PRINCIPAL_CHARS: usize = 256;
/// Method, action, outcome, source address and request id.
pub const MAX_SHORT_CHARS: usize = 64;

/// `text` cut to `max` characters, the last one `…` when cut.
fn cap(text: &mut String, max: usize) {
    if let Some((index, _)) = text.char_indices().nth(max) {
        let keep = text[..index]
            .char_indices()
            .nth(max - 1)
            .map_or(index, |(i, _)| i);
        text.truncate(keep);
        text.push('…');
    }
}

impl NewAuditEvent {
    /// The record with each text field cut to its limit.
    pub fn capped(mut self) -> NewAuditEvent {
        cap(&mut self.target, MAX_TARGET_CHARS);
        cap(&mut self.principal, MAX_PRINCIPAL_CHARS);
        for short in [
            &mut self.id,
            &mut self.source_address,
            &mut self.request_id,
            &mut self.method,
            &mut self.action,
            &mut self.outcome,
        ] {
            cap(short, MAX_SHORT_CHARS);
        }
        if let Some(detail) = &mut self.detail {
            cap(detail, MAX_DETAIL_CHARS);
        }
        self
    }
}

/// Where the chain starts after a prune: the last removed record.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditCheckpoint {
    pub seq: i64,
    pub hash: String,
    /// The removed record's time.
    pub at: i64,
    pub pruned_at: i64,
    /// Base64url RS256 signature of [`AuditCheckpoint::signed_text`] with
    /// the server's token-signing key.
    pub signature: String,
}

impl AuditCheckpoint {
    /// The text the signature covers.
    pub fn signed_text(&self) -> String {
        format!(
            "cordon audit checkpoint v1\n{}\n{}\n{}\n{}",
            self.seq, self.hash, self.at, self.pruned_at
        )
    }
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
     t.method, t.target, t.action, t.outcome, t.status, t.detail, t.prev_hash, t.hash, t.count";
const AUDIT_COLUMN_COUNT: usize = 15;

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
            count: row.get(14)?,
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
    // Audit records belong to no machine group (the default's id is 0).
    in_groups: |ids, _| format!("0 IN ({ids})"),
    small_scope: 0,
    size_of: Some(|a| {
        let e = &a.event;
        // The text fields and the JSON around them.
        e.principal.len()
            + e.target.len()
            + e.detail.as_ref().map_or(0, String::len)
            + e.source_address.len()
            + e.action.len()
            + 400
    }),
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
/// `detail` is `\N`, which no escaped text can be. A `count` other than 1
/// follows as a last field (so records of one call hash as they always did).
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
    if event.count != 1 {
        out.push('\t');
        out.push_str(&event.count.to_string());
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

/// The record `seq`, if it is still there.
pub(crate) fn get_audit(conn: &Connection, seq: i64) -> Result<Option<AuditRecord>> {
    let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_events t WHERE t.seq = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([seq], audit_from_row)
        .optional()?)
}

fn append(conn: &Connection, event: &NewAuditEvent) -> Result<AuditRecord> {
    // The last record's hash; after a prune that removed every record, the
    // checkpoint's.
    let prev_hash: String = conn
        .prepare_cached(
            "SELECT COALESCE((SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1), \
             (SELECT hash FROM audit_checkpoints ORDER BY seq DESC LIMIT 1))",
        )?
        .query_row([], |r| r.get::<_, Option<String>>(0))?
        .unwrap_or_else(|| GENESIS_HASH.to_owned());
    // The row gets its seq from AUTOINCREMENT (never reused, even after a
    // deletion), then its hash, which covers that seq.
    conn.prepare_cached(
        "INSERT INTO audit_events (id, at, principal, source_address, request_id, method, \
         target, action, outcome, status, detail, prev_hash, hash, count) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, '', ?13)",
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
        event.count,
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

fn checkpoint(conn: &Connection) -> Result<Option<AuditCheckpoint>> {
    Ok(conn
        .prepare_cached(
            "SELECT seq, hash, at, pruned_at, signature FROM audit_checkpoints \
             ORDER BY seq DESC LIMIT 1",
        )?
        .query_row([], |r| {
            Ok(AuditCheckpoint {
                seq: r.get(0)?,
                hash: r.get(1)?,
                at: r.get(2)?,
                pruned_at: r.get(3)?,
                signature: r.get(4)?,
            })
        })
        .optional()?)
}

/// Removes at most `limit` of the oldest records, stopping before the
/// first record at or after `before`, and moves the checkpoint to the last
/// one removed (signed by `sign`). The number removed.
fn prune_some(
    conn: &Connection,
    before: i64,
    limit: i64,
    pruned_at: i64,
    sign: &(dyn Fn(&AuditCheckpoint) -> String + Send + Sync),
) -> Result<u64> {
    // Times need not grow with seq (clocks, concurrent writers): keep
    // everything from the first record at or after `before` on.
    let keep_from: Option<i64> = conn.query_row(
        "SELECT MIN(seq) FROM audit_events WHERE at >= ?1",
        [before],
        |r| r.get(0),
    )?;
    let last: Option<(i64, String, i64)> = conn
        .query_row(
            "SELECT seq, hash, at FROM (SELECT seq, hash, at FROM audit_events \
             WHERE seq < COALESCE(?1, 9223372036854775807) ORDER BY seq LIMIT ?2) \
             ORDER BY seq DESC LIMIT 1",
            params![keep_from, limit],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((seq, hash, at)) = last else {
        return Ok(0);
    };
    let removed = conn.execute("DELETE FROM audit_events WHERE seq <= ?1", [seq])?;
    let mut checkpoint = AuditCheckpoint {
        seq,
        hash,
        at,
        pruned_at,
        signature: String::new(),
    };
    checkpoint.signature = sign(&checkpoint);
    conn.execute("DELETE FROM audit_checkpoints", [])?;
    conn.execute(
        "INSERT INTO audit_checkpoints (seq, hash, at, pruned_at, signature) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            checkpoint.seq,
            checkpoint.hash,
            checkpoint.at,
            checkpoint.pruned_at,
            checkpoint.signature
        ],
    )?;
    Ok(removed as u64)
}

/// Walks the chain in `seq` order from the checkpoint, if any; the number
/// of records, or the first bad one.
fn verify(conn: &Connection) -> Result<std::result::Result<u64, AuditBreak>> {
    let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_events t ORDER BY t.seq");
    let start = checkpoint(conn)?;
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query([])?;
    let (mut expected_prev, mut last_seq) = match &start {
        Some(c) => (c.hash.clone(), c.seq),
        None => (GENESIS_HASH.to_owned(), 0i64),
    };
    let start_seq = last_seq;
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
            return broken(if count == 0 && start_seq == 0 {
                format!(
                    "records before it are missing (the chain starts at {})",
                    record.seq
                )
            } else if count == 0 {
                format!(
                    "records are missing before it (the checkpoint of the last prune is record {start_seq})"
                )
            } else {
                format!("records are missing before it (the previous record is {last_seq})")
            });
        }
        if record.prev_hash != expected_prev {
            return broken(if last_seq == 0 {
                "its previous hash is not the start of the chain".to_owned()
            } else if count == 0 {
                format!(
                    "its previous hash does not match the checkpoint of the last prune (record {last_seq})"
                )
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

/// Appends `event`, capped, inside the caller's write (a bulk call's
/// actions and their records in one transaction).
pub(crate) fn append_capped(conn: &Connection, event: NewAuditEvent) -> Result<AuditRecord> {
    append(conn, &event.capped())
}

impl Store {
    /// Appends a record to the audit trail, chained to the last one.
    /// Text fields are capped first ([`NewAuditEvent::capped`]).
    pub async fn append_audit(&self, event: NewAuditEvent) -> Result<AuditRecord> {
        let event = event.capped();
        let observer = self.inner.observer.clone();
        self.write_then(
            move |conn| append(conn, &event),
            move |record| {
                if let Some(observer) = observer.get() {
                    observer.audit_appended(&record);
                }
                record
            },
        )
        .await
    }

    /// Removes the records before the first one at or after `before`
    /// (nanoseconds), oldest first, in batches of 10,000 (so other writes
    /// wait for one batch at most), moving the signed checkpoint along.
    /// The number of records removed.
    pub async fn prune_audit(
        &self,
        before: i64,
        pruned_at: i64,
        sign: std::sync::Arc<dyn Fn(&AuditCheckpoint) -> String + Send + Sync>,
    ) -> Result<u64> {
        let mut total = 0;
        loop {
            let sign = sign.clone();
            let removed = self
                .write(move |conn| prune_some(conn, before, 10_000, pruned_at, &*sign))
                .await?;
            total += removed;
            if removed < 10_000 {
                return Ok(total);
            }
        }
    }

    /// The checkpoint the chain starts from, after a prune.
    pub async fn audit_checkpoint(&self) -> Result<Option<AuditCheckpoint>> {
        self.read(checkpoint).await
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
            count: 1,
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

    /// Runs `body` with a store in a fresh temporary directory (`path` is
    /// its database file), and removes the directory afterwards.
    fn with_store(label: &str, body: impl AsyncFnOnce(&Store, &std::path::Path)) {
        let dir = std::env::temp_dir().join(format!("cordon-store-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cordon.db");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let store = Store::open(&path).unwrap();
            body(&store, &path).await;
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_chain_detects_edits_and_deletions() {
        with_store("audit", async |store, path| {
            let appends: Vec<_> = (1..=5).map(|n| store.append_audit(event(n))).collect();
            for append in appends {
                append.await.unwrap();
            }
            assert_eq!(store.verify_audit().await.unwrap(), Ok(5));
            let page = store.list_audit(Query::default()).await.unwrap();
            assert_eq!(page.items.len(), 5);
            assert_eq!(page.items[0].prev_hash, GENESIS_HASH);
            assert_eq!(page.items[1].prev_hash, page.items[0].hash);

            let raw = Connection::open(path).unwrap();
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
    }

    #[test]
    fn records_are_capped_and_a_pruned_chain_verifies_from_its_checkpoint() {
        with_store("prune", async |store, path| {
            // A 64 KiB path is stored cut to its limit.
            let mut big = event(1);
            big.target = format!("/api/{}", "é".repeat(32 * 1024));
            big.detail = Some("x".repeat(100_000));
            let stored = store.append_audit(big).await.unwrap();
            assert_eq!(stored.event.target.chars().count(), MAX_TARGET_CHARS);
            assert!(stored.event.target.ends_with('…'));
            assert_eq!(
                stored.event.detail.unwrap().chars().count(),
                MAX_DETAIL_CHARS
            );
            for n in 2..=10 {
                let mut e = event(n);
                e.count = if n == 5 { 7 } else { 1 };
                store.append_audit(e).await.unwrap();
            }
            assert_eq!(store.verify_audit().await.unwrap(), Ok(10));

            let sign: std::sync::Arc<dyn Fn(&AuditCheckpoint) -> String + Send + Sync> =
                std::sync::Arc::new(|c: &AuditCheckpoint| format!("signed {}", c.signed_text()));
            // Records at 1..=6 go; the first at or after 7 stays, and all after it.
            assert_eq!(store.prune_audit(7, 99, sign.clone()).await.unwrap(), 6);
            let checkpoint = store.audit_checkpoint().await.unwrap().unwrap();
            assert_eq!(
                (checkpoint.seq, checkpoint.at, checkpoint.pruned_at),
                (6, 6, 99)
            );
            assert_eq!(
                checkpoint.signature,
                format!("signed {}", checkpoint.signed_text())
            );
            let page = store.list_audit(Query::default()).await.unwrap();
            assert_eq!(page.items.len(), 4);
            assert_eq!(page.items[0].seq, 7);
            assert_eq!(page.items[0].prev_hash, checkpoint.hash);
            assert_eq!(store.verify_audit().await.unwrap(), Ok(4));
            // Nothing more before 7.
            assert_eq!(store.prune_audit(7, 100, sign.clone()).await.unwrap(), 0);

            // Removing a record right after the checkpoint is still seen.
            let raw = Connection::open(path).unwrap();
            raw.execute("DELETE FROM audit_events WHERE seq = 7", [])
                .unwrap();
            let broken = store.verify_audit().await.unwrap().unwrap_err();
            assert_eq!(broken.seq, 8);
            assert!(broken.reason.contains("checkpoint"), "{}", broken.reason);

            // Pruning everything: the next record chains to the checkpoint.
            assert_eq!(store.prune_audit(i64::MAX, 101, sign).await.unwrap(), 3);
            assert_eq!(store.verify_audit().await.unwrap(), Ok(0));
            let next = store.append_audit(event(11)).await.unwrap();
            assert_eq!(next.seq, 11);
            let checkpoint = store.audit_checkpoint().await.unwrap().unwrap();
            assert_eq!(next.prev_hash, checkpoint.hash);
            assert_eq!(store.verify_audit().await.unwrap(), Ok(1));
        });
    }
}
