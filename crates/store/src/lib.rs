//! Persistence for Cordon behind one interface.
//!
//! The store is SQLite in WAL mode. Every write goes through one writer
//! thread that commits in groups: it takes every write waiting in its queue,
//! runs each inside its own savepoint, commits them with one `fsync`
//! (`synchronous=FULL`), and only then answers the callers. An answer of
//! `Ok` therefore means the write is on disk, which is what lets the server
//! return `201` only for actions that survive a crash. Reads run on a small
//! pool of connections on the blocking thread pool.
//!
//! Types here are plain data; none of them is serialized.

mod audit;
mod backup;
mod events;
mod exclusions;
mod people;
#[cfg(test)]
mod plans;
mod query;
mod records;
pub(crate) mod webhooks;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

/// The most characters an audit record's `detail` keeps.
pub use audit::MAX_DETAIL_CHARS;
pub use audit::{AuditBreak, AuditCheckpoint, AuditField, AuditRecord, NewAuditEvent};
pub use backup::{BackupSummary, inspect_backup, restore_database};
pub use events::{
    ACTION_COMPLETED, ACTION_CREATED, ACTION_UPDATED, AUDIT_APPENDED, EVENT_TYPES,
    EXCLUSION_CHANGED, EventAudience, EventBounds, EventRenderer, EventSubject, ISOLATION_CHANGED,
    StoredEvent, TAMPER_DETECTED,
};
pub use exclusions::{ExclusionRuleFields, ExclusionRuleRecord, ExclusionRuleSet};
pub use people::{
    DEFAULT_GROUP_ID, DEFAULT_GROUP_NAME, GroupRecord, NewGroup, RoleRecord, UserRecord,
};
pub use query::{CmpOp, Cursor, Direction, FieldSql, Filter, Kind, Page, Query, SqlContext, Value};
pub use records::*;
pub use webhooks::{
    AfterAttempt, AttemptRecord, DELETE_BATCH, DeliveryRecord, MAX_WEBHOOKS, WebhookRecord,
};

/// Errors of the store. Domain outcomes have their own variants so that the
/// server can map them to the contract's error codes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The machine, action, app or token does not exist.
    #[error("not found")]
    NotFound,
    /// The machine already has an isolation-family action in flight (its id).
    #[error("action {0} is already in progress")]
    ActiveExists(String),
    /// The action is not in a state that allows the change (its status).
    #[error("action is {0}")]
    WrongStatus(String),
    /// An enroll token that is unknown, expired, used up or revoked.
    #[error("enroll token rejected: {0}")]
    TokenRejected(&'static str),
    /// The public key is already enrolled (the id of its machine).
    #[error("this public key is already enrolled as machine {0}")]
    KeyEnrolled(String),
    /// Another record already holds a value that must be unique (the name
    /// of an exclusion rule, as that rule spells it).
    #[error("'{0}' is already taken")]
    Conflict(String),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the store is closed")]
    Closed,
    /// A file given to the store is not what it should be (what is wrong).
    #[error("{0}")]
    Invalid(String),
    /// A limit on how many records of a kind may exist was reached (the
    /// limit).
    #[error("at most {0} may exist")]
    TooMany(usize),
    /// The database was written by a newer Cordon (its schema version).
    #[error(
        "the database has schema version {0}, newer than this Cordon knows ({known}); \
         run the Cordon version that wrote it",
        known = MIGRATIONS.len()
    )]
    NewerSchema(i64),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What the store tells the process that opened it, for its metrics and
/// logs: it keeps the store free of any metrics library. Calls come from
/// the writer thread, after the commit they belong to, so they must be
/// quick and never block.
pub trait StoreObserver: Send + Sync {
    /// A write transaction (a group of writes) committed in `elapsed`.
    fn committed(&self, _elapsed: Duration) {}
    /// An action was created or changed status; called once per change,
    /// only once it is durable, whether or not its caller still waits.
    fn action_changed(&self, _change: &ActionChange) {}
    /// An audit record was appended; called once per record, only once it
    /// is durable.
    fn audit_appended(&self, _record: &AuditRecord) {}
    /// A commit wrote events to the event log (`events`): they can be read.
    fn events_recorded(&self) {}
    /// A commit queued webhook deliveries: they can be sent.
    fn webhook_deliveries_queued(&self) {}
}

/// An action's change of status, as committed.
#[derive(Debug, Clone)]
pub struct ActionChange {
    /// The action as it is now.
    pub action: ActionRecord,
    /// Its status before (`None`: it was just created).
    pub from: Option<String>,
}

type Observer = Arc<OnceLock<Arc<dyn StoreObserver>>>;

type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Reply + Send>;

/// A handle on the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<mpsc::Sender<Job>>,
    readers: Mutex<Vec<Connection>>,
    observer: Observer,
    /// Renders the bodies of events ([`Store::set_event_renderer`]).
    renderer: Mutex<Option<Arc<dyn EventRenderer>>>,
    /// The schema has the event log, and the writer captures changes.
    events: bool,
    /// The schema has webhooks: events queue their deliveries.
    webhooks: bool,
}

impl Drop for Inner {
    /// Closes the readers one by one; then the writer's channel closes and
    /// the writer thread closes its connection.
    fn drop(&mut self) {
        let readers = std::mem::take(self.readers.get_mut().unwrap_or_else(|p| p.into_inner()));
        for conn in readers {
            close_connection(conn);
        }
    }
}

const MIGRATIONS: &[&str] = &[
    include_str!("schema.sql"),
    include_str!("migration2.sql"),
    include_str!("migration3.sql"),
    include_str!("migration4.sql"),
    include_str!("migration5.sql"),
    include_str!("migration6_enroll_tokens.sql"),
    include_str!("migration7_audit_retention.sql"),
    include_str!("migration8_scale_indexes.sql"),
    include_str!("migration9_events.sql"),
    include_str!("migration10_webhooks.sql"),
];

/// Held while a connection opens or closes. The bundled SQLite (3.51.1)
/// can deadlock when two connections to one file open or close at the same
/// moment in one process (a lock-order inversion in its unix VFS between
/// the global mutex and the file's lock mutex, fixed in SQLite 3.51.2): an
/// admin command that had read and written hung on exit, its reader and
/// its writer closing together. Statements never take that path, so
/// serializing opens and closes is enough.
static LIFECYCLE: Mutex<()> = Mutex::new(());

fn lifecycle() -> std::sync::MutexGuard<'static, ()> {
    LIFECYCLE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn close_connection(conn: Connection) {
    let _guard = lifecycle();
    drop(conn);
}

fn open_connection(path: &Path) -> Result<Connection> {
    let _guard = lifecycle();
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
    )?;
    Ok(conn)
}

/// Brings the schema up to migration `target` (1-based; the last one at
/// most), every missing migration in one transaction: a failure leaves the
/// database as it was.
fn migrate(conn: &mut Connection, target: usize) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > MIGRATIONS.len() as i64 {
        return Err(StoreError::NewerSchema(version));
    }
    let upto = target.min(MIGRATIONS.len());
    for (index, script) in MIGRATIONS
        .iter()
        .enumerate()
        .take(upto)
        .skip(version as usize)
    {
        tx.execute_batch(script)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", index + 1))?;
    }
    tx.commit()?;
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and starts
    /// the writer thread. Several processes may open the same file: the
    /// server and the admin commands do.
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_migrated_to(path, MIGRATIONS.len())
    }

    /// The number of the latest migration: the schema version
    /// [`Store::open`] brings a database to.
    pub fn schema_version() -> usize {
        MIGRATIONS.len()
    }

    /// Like [`Store::open`], migrating only up to migration `version`: for
    /// `cordon-bench store`, which measures an older server on a store of
    /// the older schema before it migrates it. Not for serving.
    #[doc(hidden)]
    pub fn open_migrated_to(path: &Path, version: usize) -> Result<Store> {
        let mut conn = open_connection(path)?;
        migrate(&mut conn, version)?;
        let events = version.min(MIGRATIONS.len()) >= events::SINCE_VERSION;
        let webhooks = version.min(MIGRATIONS.len()) >= events::WEBHOOKS_SINCE_VERSION;
        if events {
            conn.execute_batch(events::CAPTURE)?;
        }
        let (sender, receiver) = mpsc::channel::<Job>();
        let observer = Observer::default();
        let writer_observer = observer.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(conn, receiver, writer_observer))
            .map_err(|e| StoreError::Commit(e.to_string()))?;
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writer: Mutex::new(sender),
                readers: Mutex::new(Vec::new()),
                observer,
                renderer: Mutex::new(None),
                events,
                webhooks,
            }),
        })
    }

    /// Sets the observer told of every commit and action change from now
    /// on; `false` (and nothing changed) when one is set already.
    pub fn set_observer(&self, observer: Arc<dyn StoreObserver>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// Whether the writer takes work: a job that changes nothing goes
    /// through its queue and a group commit (a writer stuck on its disk, or
    /// gone, never answers; the caller bounds the wait).
    pub async fn writer_answers(&self) -> Result<()> {
        self.write(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }

    /// Runs `f` in the next group commit; resolves once it is durable.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.write_then(f, |value| value).await
    }

    /// Like [`Store::write`] for a write that changes actions: `f` also
    /// returns the changes, which the observer is told of once they are
    /// committed (from the writer thread, so even when the caller stopped
    /// waiting).
    pub(crate) async fn write_actions<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<(T, Vec<ActionChange>)> + Send + 'static,
    {
        let observer = self.inner.observer.clone();
        self.write_then(f, move |(value, changes)| {
            if let Some(observer) = observer.get() {
                for change in &changes {
                    observer.action_changed(change);
                }
            }
            value
        })
        .await
    }

    /// Runs `f` in the next group commit, then `committed` on its value in
    /// the writer thread once the commit succeeded.
    async fn write_then<U, T, F, C>(&self, f: F, committed: C) -> Result<T>
    where
        U: Send + 'static,
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<U> + Send + 'static,
        C: FnOnce(U) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let renderer = self
            .inner
            .events
            .then(|| {
                self.inner
                    .renderer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            })
            .flatten();
        let capture = self.inner.events;
        let outbox = self.inner.webhooks;
        let observer = self.inner.observer.clone();
        let job: Job = Box::new(move |conn| {
            let mut recorded = events::Recorded::default();
            let outcome = match conn.execute_batch("SAVEPOINT job") {
                Err(e) => Err(StoreError::from(e)),
                Ok(()) => {
                    // The change and its events, in one savepoint.
                    let outcome = f(conn).and_then(|value| {
                        if capture {
                            recorded = events::record(conn, renderer.as_deref(), outbox)?;
                        }
                        Ok(value)
                    });
                    let end = if outcome.is_ok() {
                        "RELEASE job"
                    } else {
                        "ROLLBACK TO job; RELEASE job"
                    };
                    match conn.execute_batch(end) {
                        Ok(()) => outcome,
                        Err(e) => Err(StoreError::from(e)),
                    }
                }
            };
            Box::new(move |commit: Result<(), String>| {
                if commit.is_ok()
                    && let Some(observer) = observer.get()
                {
                    if recorded.events > 0 {
                        observer.events_recorded();
                    }
                    if recorded.deliveries > 0 {
                        observer.webhook_deliveries_queued();
                    }
                }
                let _ = tx.send(match commit {
                    Ok(()) => outcome.map(committed),
                    Err(e) => Err(StoreError::Commit(e)),
                });
            })
        });
        self.inner
            .writer
            .lock()
            .expect("writer lock")
            .send(job)
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on a read connection on the blocking pool. When the
    /// returned future is dropped before it ends (the client went away),
    /// the statement running is interrupted, so an abandoned query stops
    /// using the CPU.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        let running = Arc::new(Mutex::new(Running::default()));
        let guard = InterruptOnDrop(Some(running.clone()));
        let outcome = tokio::task::spawn_blocking(move || {
            let pooled = inner.readers.lock().expect("reader pool").pop();
            let conn = match pooled {
                Some(conn) => conn,
                None => open_connection(&inner.path)?,
            };
            let abandoned = {
                let mut running = running.lock().unwrap_or_else(|p| p.into_inner());
                running.handle = Some(conn.get_interrupt_handle());
                running.abandoned
            };
            let outcome = if abandoned {
                Err(StoreError::Closed)
            } else {
                f(&conn)
            };
            // Under the lock: once the connection goes back to the pool,
            // nothing can interrupt it on this read's behalf.
            running.lock().unwrap_or_else(|p| p.into_inner()).handle = None;
            let mut pool = inner.readers.lock().expect("reader pool");
            if pool.len() < 16 {
                pool.push(conn);
            } else {
                drop(pool);
                close_connection(conn);
            }
            outcome
        })
        .await
        .map_err(|_| StoreError::Closed)?;
        guard.disarm();
        outcome
    }

    /// Reads values of the `meta` table (`None`: absent) and writes the
    /// values `change` makes of them, in one write transaction: a
    /// read-modify-write no other writer can come between. `change`'s error
    /// fails the write, which then changes nothing.
    pub async fn update_meta<F>(&self, keys: Vec<String>, change: F) -> Result<()>
    where
        F: FnOnce(Vec<Option<String>>) -> std::result::Result<Vec<String>, String> + Send + 'static,
    {
        self.write(move |conn| {
            let mut current = Vec::with_capacity(keys.len());
            for key in &keys {
                current.push(
                    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                        .optional()?,
                );
            }
            let values = change(current).map_err(StoreError::Commit)?;
            for (key, value) in keys.iter().zip(values) {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![key, value],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// Reads a value of the `meta` table, creating it with `init` when absent.
    pub async fn meta_or_init(&self, key: &str, init: impl FnOnce() -> String) -> Result<String> {
        let key = key.to_owned();
        let fresh = init();
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                params![key, fresh],
            )?;
            Ok(conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))?)
        })
        .await
    }

    /// Reads a value of the `meta` table.
    pub async fn meta(&self, key: &str) -> Result<Option<String>> {
        let key = key.to_owned();
        self.read(move |conn| {
            Ok(conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()?)
        })
        .await
    }
}

/// A read in progress, as seen by its future.
#[derive(Default)]
struct Running {
    /// The connection's interrupt handle while the read uses it.
    handle: Option<rusqlite::InterruptHandle>,
    /// The future was dropped: don't start.
    abandoned: bool,
}

/// Interrupts the read's statement when the future waiting for it is
/// dropped.
struct InterruptOnDrop(Option<Arc<Mutex<Running>>>);

impl InterruptOnDrop {
    /// The read ended: nothing to interrupt.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for InterruptOnDrop {
    fn drop(&mut self) {
        let Some(running) = &self.0 else {
            return;
        };
        let mut running = running.lock().unwrap_or_else(|p| p.into_inner());
        running.abandoned = true;
        if let Some(handle) = &running.handle {
            handle.interrupt();
            tracing::debug!("store: a read was abandoned; its statement is interrupted");
        }
    }
}

fn writer_loop(conn: Connection, receiver: mpsc::Receiver<Job>, observer: Observer) {
    const MAX_GROUP: usize = 512;
    while let Ok(first) = receiver.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            // Run nothing: dropping the jobs tells every caller the write
            // failed (`StoreError::Closed`), and nothing was changed.
            tracing::error!(error = %e, "store: cannot begin a write transaction");
            continue;
        }
        let replies: Vec<Reply> = jobs.into_iter().map(|job| job(&conn)).collect();
        let commit_started = Instant::now();
        let committed = conn.execute_batch("COMMIT").map_err(|e| e.to_string());
        match &committed {
            Ok(()) => {
                if let Some(observer) = observer.get() {
                    observer.committed(commit_started.elapsed());
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store: group commit failed");
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
        for reply in replies {
            reply(committed.clone());
        }
    }
    close_connection(conn);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read whose future is dropped (its client went away) stops at
    /// once instead of running its statement to the end.
    #[test]
    fn an_abandoned_read_is_interrupted() {
        let dir = std::env::temp_dir().join(format!("cordon-store-abandon-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store = Store::open(&dir.join("cordon.db")).unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        runtime.block_on(async {
            // Counting to a billion takes SQLite minutes.
            let slow = store.read(move |conn| {
                let counted = conn.query_row(
                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c \
                     WHERE x < 1000000000) SELECT count(*) FROM c",
                    [],
                    |r| r.get::<_, i64>(0),
                );
                let _ = done_tx.send(counted.is_err());
                Ok(())
            });
            let abandoned = tokio::time::timeout(std::time::Duration::from_millis(300), slow).await;
            assert!(abandoned.is_err(), "the query is slow");
        });
        let Ok(interrupted) = done_rx.recv_timeout(std::time::Duration::from_secs(10)) else {
            // Don't wait for the statement when the runtime is dropped.
            runtime.shutdown_background();
            panic!("the abandoned statement still runs after 10 seconds");
        };
        assert!(interrupted);
        // The connection goes back to the pool and serves the next read.
        runtime.block_on(async {
            assert_eq!(store.meta("nothing").await.unwrap(), None);
        });
        drop(store);
        runtime.shutdown_background();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store used and dropped, again and again, as each admin command
    /// does: its connections close one after another, never at once (two
    /// closing at once can deadlock inside SQLite 3.51.1).
    #[test]
    fn a_store_closes_without_deadlock() {
        let dir = std::env::temp_dir().join(format!("cordon-store-close-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cordon.db");
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            for round in 0..2000 {
                let store = Store::open(&path).unwrap();
                runtime.block_on(async {
                    let key = format!("k{round}");
                    store.meta_or_init(&key, || "v".into()).await.unwrap();
                    assert!(store.meta(&key).await.unwrap().is_some());
                });
                drop(store);
            }
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("no deadlock");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
