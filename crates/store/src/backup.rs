//! Backups: a consistent copy of the whole database taken while the server
//! runs, with the files of the data directory that belong with it (the
//! CA), and its restore into a stopped server's data directory.
//!
//! The copy is SQLite's online backup API run in one step: it reads the
//! database in one read transaction, so it is the database as of one
//! moment (every write acknowledged before it began is in it), and in WAL
//! mode writers go on meanwhile. The data directory's files ride in the
//! copy's table `backup_files`, so that one file holds everything a restore
//! needs; the restore takes that table out again.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::{MIGRATIONS, Result, Store, StoreError};

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// The database's schema version.
    pub schema_version: i64,
    /// The tenant id (`meta`), if the database has one.
    pub tenant_id: Option<String>,
    pub machines: i64,
    pub actions: i64,
    /// The data directory files carried along (names).
    pub files: Vec<String>,
}

const FILES_TABLE: &str = "backup_files";

fn summary(conn: &Connection) -> Result<BackupSummary> {
    let schema_version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let tenant_id: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'tenant_id'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let machines = conn.query_row("SELECT count(*) FROM machines", [], |r| r.get(0))?;
    let actions = conn.query_row("SELECT count(*) FROM actions", [], |r| r.get(0))?;
    let has_files: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [FILES_TABLE],
        |r| r.get(0),
    )?;
    let files = if has_files {
        conn.prepare(&format!("SELECT name FROM {FILES_TABLE} ORDER BY name"))?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    } else {
        Vec::new()
    };
    Ok(BackupSummary {
        schema_version,
        tenant_id,
        machines,
        actions,
        files,
    })
}

/// Copies `from` into the new database `to` in one step of the online
/// backup API (every page at once: one read transaction on `from`, so the
/// copy is of one moment). A busy or locked database is tried again for up
/// to ten seconds.
fn copy(from: &Connection, to: &mut Connection) -> Result<()> {
    use rusqlite::backup::StepResult;
    let backup = rusqlite::backup::Backup::new(from, to)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match backup.step(-1)? {
            StepResult::Done => return Ok(()),
            StepResult::More => {}
            StepResult::Busy | StepResult::Locked => {
                if std::time::Instant::now() > deadline {
                    return Err(StoreError::Commit(
                        "the database stayed locked for 10 s; try again".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {}
        }
    }
}

impl Store {
    /// Writes a consistent copy of the database, with `files` (name and
    /// content) in its table `backup_files`, to `to`, a new file (never
    /// over an existing one; created 0600). The caller makes `to` durable
    /// and moves it into place.
    pub async fn backup_to(
        &self,
        to: &Path,
        files: Vec<(String, Vec<u8>)>,
    ) -> Result<BackupSummary> {
        let to = to.to_owned();
        self.read(move |conn| {
            {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&to)
                    .map_err(|e| StoreError::Invalid(format!("{}: {e}", to.display())))?;
            }
            let mut copy_conn = Connection::open(&to)?;
            copy(conn, &mut copy_conn)?;
            // The copy is a plain file: no WAL beside it.
            copy_conn.execute_batch("PRAGMA journal_mode = DELETE;")?;
            let tx = copy_conn.transaction()?;
            tx.execute_batch(&format!(
                "CREATE TABLE {FILES_TABLE} (name TEXT PRIMARY KEY, content BLOB NOT NULL)"
            ))?;
            for (name, content) in &files {
                tx.execute(
                    &format!("INSERT INTO {FILES_TABLE} (name, content) VALUES (?1, ?2)"),
                    params![name, content],
                )?;
            }
            tx.commit()?;
            let summary = summary(&copy_conn)?;
            drop(copy_conn);
            Ok(summary)
        })
        .await
    }
}

/// Checks that `backup` is a backup this Cordon can restore; what it holds.
pub fn inspect_backup(backup: &Path) -> Result<BackupSummary> {
    if let Err(e) = std::fs::File::open(backup) {
        return Err(StoreError::Invalid(format!("cannot read it: {e}")));
    }
    let conn = Connection::open_with_flags(
        backup,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| StoreError::Invalid(format!("not a readable database: {e}")))?;
    if check != "ok" {
        return Err(StoreError::Invalid(format!(
            "the database is damaged: {check}"
        )));
    }
    let summary =
        summary(&conn).map_err(|e| StoreError::Invalid(format!("not a Cordon database: {e}")))?;
    if summary.schema_version > MIGRATIONS.len() as i64 {
        return Err(StoreError::NewerSchema(summary.schema_version));
    }
    if summary.tenant_id.is_none() {
        return Err(StoreError::Invalid(
            "not a Cordon database: it has no tenant id".into(),
        ));
    }
    Ok(summary)
}

/// Restores `backup` into the new database file `to` (never over an
/// existing one; created 0600), without its `backup_files` table; returns
/// those files (name and content). The caller makes `to` durable and moves
/// it into place.
pub fn restore_database(backup: &Path, to: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    inspect_backup(backup)?;
    let source = Connection::open_with_flags(
        backup,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let files: Vec<(String, Vec<u8>)> = match source.prepare(&format!(
        "SELECT name, content FROM {FILES_TABLE} ORDER BY name"
    )) {
        Ok(mut statement) => statement
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?,
        // A copy made by other means (sqlite3's .backup): no files.
        Err(_) => Vec::new(),
    };
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to)
            .map_err(|e| StoreError::Invalid(format!("{}: {e}", to.display())))?;
    }
    let mut restored = Connection::open(to)?;
    copy(&source, &mut restored)?;
    restored.execute_batch(&format!(
        "DROP TABLE IF EXISTS {FILES_TABLE}; PRAGMA journal_mode = WAL;"
    ))?;
    drop(restored);
    Ok(files)
}
