//! `cordon backup` and `cordon restore`: one file that holds the database,
//! as of one moment, and the data directory's TLS files (the CA above all:
//! enrolled agents trust only it).
//!
//! A backup runs while the server serves (SQLite's online backup in one
//! read transaction: writers go on). A restore needs the server stopped
//! (it takes the data directory's lock) and never deletes anything: what it
//! replaces is renamed `<name>.replaced-<time>` beside it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use store::BackupSummary;

use crate::{DATABASE_FILE, DataDirLock, absolute};

/// The data directory's files a backup carries: the CA and the server
/// certificate, with their keys.
pub const DATA_FILES: [&str; 4] = ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"];

fn fsync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

fn fsync_file(path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", path.display()))
}

/// A time for file names: `20261202T110300Z`.
fn stamp() -> String {
    let text = proto::time::format_utc(crate::now_nanos());
    text.chars()
        .take(19)
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .collect::<String>()
        + "Z"
}

/// Writes a backup of the data directory `data_dir` (whose store is
/// `store`) to `to`, a new file: never over an existing one. The file is
/// private (0600): it holds the token-signing key and the CA's key.
pub async fn backup(
    data_dir: &Path,
    store: &store::Store,
    to: &Path,
) -> anyhow::Result<BackupSummary> {
    if to.exists() {
        bail!(
            "{} exists already; a backup never replaces a file (give a new name)",
            to.display()
        );
    }
    let name = to
        .file_name()
        .with_context(|| format!("{} is not a file name", to.display()))?
        .to_string_lossy()
        .into_owned();
    let dir = match to.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let partial = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let mut files = Vec::new();
    for file in DATA_FILES {
        let path = data_dir.join(file);
        match std::fs::read(&path) {
            Ok(content) => files.push((file.to_owned(), content)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
    let written = async {
        let summary = store
            .backup_to(&partial, files)
            .await
            .with_context(|| format!("cannot write the backup to {}", partial.display()))?;
        fsync_file(&partial)?;
        // Create-new semantics: a hard link fails if `to` appeared meanwhile.
        std::fs::hard_link(&partial, to)
            .with_context(|| format!("cannot create {}", to.display()))?;
        fsync_dir(&dir)?;
        anyhow::Ok(summary)
    }
    .await;
    let _ = std::fs::remove_file(&partial);
    written
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    pub summary: BackupSummary,
    /// Files that were replaced, and the names they were moved to.
    pub moved_aside: Vec<(String, String)>,
}

/// Restores the backup `from` into the data directory `data_dir` (created
/// if missing). Refused while a server serves the directory.
pub fn restore(data_dir: &Path, from: &Path) -> anyhow::Result<Restored> {
    let summary = store::inspect_backup(from)
        .with_context(|| format!("{} is not a backup this Cordon can restore", from.display()))?;
    crate::create_private_dir(data_dir)?;
    let _lock = DataDirLock::acquire(data_dir)?;
    let partial = data_dir.join(format!(".{DATABASE_FILE}.restoring"));
    let _ = std::fs::remove_file(&partial);
    let files = store::restore_database(from, &partial)
        .with_context(|| format!("cannot restore {}", from.display()))?;
    fsync_file(&partial)?;
    let stamp = stamp();
    let mut moved_aside = Vec::new();
    let mut move_aside = |name: &str, to: String| -> anyhow::Result<()> {
        let path = data_dir.join(name);
        if path.exists() {
            std::fs::rename(&path, data_dir.join(&to))
                .with_context(|| format!("cannot move {} aside", path.display()))?;
            moved_aside.push((name.to_owned(), to));
        }
        Ok(())
    };
    // The database with its WAL, renamed alike so they still go together.
    let replaced = format!("{DATABASE_FILE}.replaced-{stamp}");
    for suffix in ["-wal", "-shm", ""] {
        move_aside(
            &format!("{DATABASE_FILE}{suffix}"),
            format!("{replaced}{suffix}"),
        )?;
    }
    std::fs::rename(&partial, data_dir.join(DATABASE_FILE))
        .context("cannot move the restored database into place")?;
    for (name, content) in files {
        if !DATA_FILES.contains(&name.as_str()) {
            continue;
        }
        let path = data_dir.join(&name);
        if std::fs::read(&path).is_ok_and(|current| current == content) {
            continue;
        }
        move_aside(&name, format!("{name}.replaced-{stamp}"))?;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.write_all(&content)?;
        file.sync_all()?;
    }
    fsync_dir(data_dir)?;
    tracing::info!(
        data_dir = %absolute(data_dir).display(),
        from = %from.display(),
        "restored a backup"
    );
    Ok(Restored {
        summary,
        moved_aside,
    })
}
