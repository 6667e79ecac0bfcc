//! The Cordon server: the public isolation API, its own OAuth authority and
//! the agent gateway, served over HTTPS on one port.
//!
//! `main.rs` is a thin command-line front; [`start`] is what tests call to
//! run the real server on a free port.

pub mod admission;
pub mod api;
pub mod audit;
pub mod auth;
pub mod authority;
pub mod backup;
pub mod bulk;
pub mod conns;
pub mod console;
pub mod crypto;
pub mod error;
pub mod events;
pub mod exclusions;
pub mod gateway;
pub mod json;
pub mod jwt;
pub mod listen;
pub mod monitoring;
pub mod odata;
pub mod oidc;
pub mod ratelimit;
pub mod rbac;
pub mod signin;
pub mod text;
pub mod throttle;
pub mod tls;
pub mod urls;
pub mod webhooks;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use base64::Engine;
use hyper_util::rt::{TokioIo, TokioTimer};
use tower::Service;

use crate::error::ApiError;

/// How the server gets its TLS certificate.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// Its own CA in the data directory, with these extra names.
    SelfSigned { extra_names: Vec<String> },
    /// The operator's certificate chain and key (PEM files).
    Files { cert: PathBuf, key: PathBuf },
}

/// Everything `cordon serve` is told.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// The host name `--listen` gave (`None`: an address): the default
    /// public URL's host, and a name of the generated certificate.
    pub listen_host: Option<String>,
    /// Canonical base URL; `None`: `https://<listen host>`, where an
    /// unspecified address stands for this machine's host name.
    pub public_url: Option<String>,
    pub tls: TlsSource,
    /// How long a Pending action waits for its machine before `TimeOut`.
    pub action_expiry: Duration,
    /// How long an InProgress action may take before `TimeOut`.
    pub apply_deadline: Duration,
    pub rate_limit_per_minute: u32,
    pub rate_limit_per_hour: u32,
    pub heartbeat_interval: Duration,
    /// Failed sign-ins that lock an account out for a while (0: never).
    pub signin_failures_per_user: u32,
    /// Failed sign-ins that lock a source address out (0: never).
    pub signin_failures_per_source: u32,
    /// Failed client authentications that lock a client id out (0: never).
    pub client_failures_per_client: u32,
    /// Failed client authentications that lock a source address out (0: never).
    pub client_failures_per_source: u32,
    /// External OpenID Connect providers whose access tokens are accepted.
    pub oidc: oidc::OidcSettings,
    /// Enrollment attempts a minute from one source address (0: no limit).
    pub enroll_per_source_per_minute: u32,
    /// Enrollment attempts a minute from everywhere together (0: no limit).
    pub enroll_per_minute: u32,
    /// Caps on connections, in all and per source address.
    pub connections: conns::Limits,
    /// Bounds on the TLS handshakes, session set-ups and enrollments in
    /// progress, and how long work over them waits.
    pub admission: admission::Settings,
    /// How long a connection may take to send a request's head, counted
    /// from its opening or its previous response (the keep-alive idle time).
    pub idle_timeout: Duration,
    /// How long a connection other than an agent session is kept at most:
    /// then it is closed once its request in progress is answered.
    pub max_connection_lifetime: Duration,
    /// How long a connection may take, from its opening, to become an API
    /// connection or an agent session before it is cut.
    pub handshake_timeout: Duration,
    /// Audit records older than this are pruned every hour (`None`: kept).
    pub audit_retention: Option<Duration>,
    /// How long repeated refusals are counted before their record is
    /// written (see `audit::Folding`).
    pub audit_fold_window: Duration,
    /// Create a new CA when the data directory has none even though
    /// machines are enrolled (they trust the missing CA and must all enroll
    /// again). Without it, such a start is refused.
    pub new_ca: bool,
    /// Where `GET /metrics` is served (plain HTTP), if anywhere.
    pub metrics_listen: monitoring::MetricsListen,
    /// Live-event streams (`GET /api/events`) open at once, in all and per
    /// caller.
    pub event_streams: events::Limits,
    /// How often a live-event stream re-checks its caller's access (no
    /// flag: tests shorten it).
    pub event_recheck: Duration,
    /// Events older than this are pruned from the event log, and a
    /// `Last-Event-ID` whose next event is older gets `resync`.
    pub event_retention: Duration,
    /// Events a `Last-Event-ID` may be behind the log's last at most; more,
    /// and the stream gets `resync` instead of a replay (no flag: tests
    /// shorten it).
    pub event_replay_max: usize,
    /// How webhook deliveries are retried (no flags: tests shorten them).
    pub webhooks: webhooks::Settings,
    /// How often the server rereads its token-signing keys, to see a
    /// `cordon keys rotate` (no flag: tests shorten it).
    pub key_reload: Duration,
}

impl Config {
    /// The embedded defaults, with data in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            listen: "127.0.0.1:8443".parse().expect("address"),
            listen_host: None,
            public_url: None,
            tls: TlsSource::SelfSigned {
                extra_names: Vec::new(),
            },
            action_expiry: Duration::from_secs(3 * 24 * 3600),
            apply_deadline: Duration::from_secs(10 * 60),
            rate_limit_per_minute: 100,
            rate_limit_per_hour: 1500,
            heartbeat_interval: Duration::from_secs(30),
            signin_failures_per_user: 5,
            signin_failures_per_source: 20,
            client_failures_per_client: 10,
            client_failures_per_source: 20,
            oidc: oidc::OidcSettings::new(Vec::new()),
            enroll_per_source_per_minute: 30,
            enroll_per_minute: 300,
            connections: conns::Limits::default(),
            admission: admission::Settings::default(),
            idle_timeout: Duration::from_secs(30),
            max_connection_lifetime: Duration::from_secs(10 * 60),
            handshake_timeout: Duration::from_secs(30),
            audit_retention: None,
            audit_fold_window: Duration::from_secs(60),
            new_ca: false,
            metrics_listen: monitoring::MetricsListen::default_address(),
            event_streams: events::Limits::default(),
            event_recheck: events::RECHECK,
            event_retention: events::RETENTION,
            event_replay_max: events::REPLAY_MAX,
            webhooks: webhooks::Settings::default(),
            key_reload: Duration::from_secs(10),
        }
    }
}

/// Shared state of a running server.
pub struct AppState {
    pub config: Config,
    pub store: store::Store,
    pub tenant_id: String,
    /// `<public-url>`, no trailing slash.
    pub public_url: String,
    /// `<public-url>/<tenant>/v2.0`: every token's `iss`.
    pub issuer: String,
    /// The token-signing keys (`cordon keys rotate` changes them; the
    /// server reloads them every `key_reload`).
    pub keys: std::sync::RwLock<Arc<jwt::KeyRing>>,
    pub limiter: ratelimit::RateLimiter,
    /// Enrollment attempts per source address, and in total.
    pub enroll_per_source: ratelimit::RateLimiter,
    pub enroll_total: ratelimit::RateLimiter,
    pub gateway: gateway::Gateway,
    /// Checked when a sign-in names an unknown account, so that response
    /// time doesn't tell which accounts exist.
    pub dummy_hash: String,
    /// Failed sign-ins, per account and source address.
    pub throttle: throttle::Throttle,
    /// Authorization codes not yet exchanged.
    pub codes: signin::Codes,
    /// Failed client authentications (token requests with a client
    /// secret), per client id and source address.
    pub client_throttle: throttle::Throttle,
    /// Slow (PBKDF2) hashes computed at once, at most: users' passwords and
    /// applications' secrets still stored the old way.
    pub slow_hashes: Arc<tokio::sync::Semaphore>,
    /// Verifies tokens of the external providers (none configured: empty).
    pub oidc: oidc::Verifier,
    /// The connections open now, within their caps.
    pub connections: Arc<conns::Connections>,
    /// The expensive work in progress, within its bounds.
    pub admission: admission::Admission,
    /// Repeated refusals counted before they are recorded.
    pub audit_folds: audit::Folding,
    /// The Prometheus metrics (also the store's observer).
    pub metrics: Arc<monitoring::Metrics>,
    /// The live events (`GET /api/events`).
    pub events: Arc<events::Hub>,
}

impl AppState {
    /// The key that signs tokens now.
    pub fn signing_key(&self) -> Arc<jwt::SigningKey> {
        self.key_ring().current()
    }

    /// Every token-signing key.
    pub fn key_ring(&self) -> Arc<jwt::KeyRing> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Checks `secret` against a slow (PBKDF2) hash, waiting for one of the
    /// few slots; `None` if the server is shutting down.
    pub async fn verify_slow_hash(&self, secret: String, encoded: String) -> Option<bool> {
        let slot = self.slow_hashes.clone().acquire_owned().await.ok()?;
        Some(crypto::verify_secret_off_thread(secret, encoded, slot).await)
    }

    /// Thresholds of `healthStatus` as of now.
    pub fn sql_context(&self) -> store::SqlContext {
        health_context(self.config.heartbeat_interval, now_nanos())
    }
}

/// The health thresholds at `now` (nanoseconds) for agents sending a
/// heartbeat every `heartbeat_interval`.
pub fn health_context(heartbeat_interval: Duration, now: i64) -> store::SqlContext {
    let active = heartbeat_interval * 3 + Duration::from_secs(10);
    store::SqlContext {
        active_since: now.saturating_sub(nanos(active)),
        inactive_before: now - Duration::from_secs(7 * 24 * 3600).as_nanos() as i64,
    }
}

/// Information about the TLS connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Base64 TLS exporter value ([`proto::agent::EXPORTER_LABEL`]).
    pub exporter: Option<String>,
}

pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// A duration in nanoseconds, saturating (a duration is never wrapped
/// into a negative time).
pub fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

pub fn unix_seconds() -> i64 {
    now_nanos() / 1_000_000_000
}

/// The base of the absolute URLs the server writes (`@odata.context`,
/// `@odata.nextLink`, discovery): the public URL when `--public-url` is set,
/// whatever the `Host`; otherwise `https://<host the client used>`, or the
/// default public URL when the `Host` header is missing or not a plain
/// host name.
pub fn base_url(headers: &HeaderMap, state: &AppState) -> String {
    if state.config.public_url.is_some() {
        return state.public_url.clone();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '_')
                })
        });
    match host {
        Some(host) => format!("https://{host}"),
        None => state.public_url.clone(),
    }
}

/// The whole HTTP application.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .nest(
            "/api",
            api::routes()
                .merge(events::routes())
                .merge(webhooks::routes()),
        )
        .nest(
            "/api/v1.0",
            api::routes()
                .merge(events::routes())
                .merge(webhooks::routes()),
        )
        .merge(authority::routes())
        .merge(signin::routes())
        .merge(gateway::routes())
        .merge(monitoring::routes())
        .merge(console::routes())
        .fallback(|| async {
            ApiError::not_found("The requested resource was not found.").into_response()
        })
        .layer(axum::middleware::from_fn(conns::classify))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            error::request_context,
        ))
        // Outermost, so that it sees every response as sent, request id included.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::record,
        ))
        .with_state(state)
}

/// A server that is running.
pub struct RunningServer {
    pub local_addr: SocketAddr,
    /// Every address served (`local_addr` first).
    pub listen_addrs: Vec<SocketAddr>,
    /// The names and addresses the generated certificate carries (empty
    /// with the operator's own certificate).
    pub tls_names: Vec<String>,
    pub tenant_id: String,
    pub public_url: String,
    /// Where `GET /metrics` is served (`None`: nowhere).
    pub metrics_addr: Option<SocketAddr>,
    /// Where the generated CA certificate is (self-signed mode).
    pub ca_path: Option<PathBuf>,
    pub state: Arc<AppState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Held while this value lives: a second server on the same data
    /// directory stops with a clear message.
    _lock: DataDirLock,
}

impl RunningServer {
    /// Runs until the accept loop ends (it doesn't, unless aborted).
    pub async fn wait(mut self) {
        if let Some(accept) = self.tasks.pop() {
            let _ = accept.await;
        }
    }

    /// Stops accepting connections and the background tasks.
    pub fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The database's file name inside the data directory.
pub const DATABASE_FILE: &str = "cordon.db";
/// The file `cordon serve` locks while it serves a data directory.
pub const LOCK_FILE: &str = "cordon.lock";

/// Opens the store of an existing data directory; never creates one, so a
/// mistyped `--data-dir` is an error rather than a new, empty tenant.
pub fn open_store(data_dir: &std::path::Path) -> anyhow::Result<store::Store> {
    let database = data_dir.join(DATABASE_FILE);
    if !data_dir.is_dir() {
        anyhow::bail!(
            "there is no data directory at {}; `cordon serve --data-dir {}` creates one \
             (or add --init to this command)",
            absolute(data_dir).display(),
            data_dir.display()
        );
    }
    if !database.is_file() {
        anyhow::bail!(
            "{} is not a Cordon data directory (it has no {DATABASE_FILE}); \
             `cordon serve --data-dir {}` creates one (or add --init to this command)",
            absolute(data_dir).display(),
            data_dir.display()
        );
    }
    open_database(&database, data_dir)
}

/// Opens the store of `data_dir`, creating the directory (mode 0700) and
/// the database when they don't exist yet.
pub fn init_data_dir(data_dir: &std::path::Path) -> anyhow::Result<store::Store> {
    use std::os::unix::fs::OpenOptionsExt;
    create_private_dir(data_dir)?;
    let database = data_dir.join(DATABASE_FILE);
    // Private from its creation (SQLite gives its -wal and -shm files the
    // database's mode), whatever the process's umask.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&database)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot create {}", database.display()));
        }
    }
    open_database(&database, data_dir)
}

/// Opens the database, its changes recorded in the event log (rendered
/// for the default heartbeat interval until `start` installs the
/// server's).
fn open_database(database: &Path, data_dir: &Path) -> anyhow::Result<store::Store> {
    let store = store::Store::open(database)
        .with_context(|| format!("cannot open the database in {}", data_dir.display()))?;
    events::install_renderer(&store, Config::new(data_dir.to_owned()).heartbeat_interval);
    Ok(store)
}

/// `path` made absolute (for messages), as well as can be.
pub fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

pub(crate) fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))
}

/// Makes the data directory 0700 and every file in it 0600 where they are
/// looser (the database holds the token-signing key); returns what it
/// changed, for a warning. Fails when a mode cannot be fixed.
pub fn secure_data_dir(data_dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    let mut fixed = Vec::new();
    let mut tighten = |path: &std::path::Path, wanted: u32| -> anyhow::Result<()> {
        let metadata = std::fs::symlink_metadata(path)
            .with_context(|| format!("cannot read the mode of {}", path.display()))?;
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted)).with_context(
                || {
                    format!(
                        "{} has mode {mode:04o}, open to other users, and it cannot be \
                         changed to {wanted:04o}; fix it (chmod {wanted:o}) and start again",
                        path.display()
                    )
                },
            )?;
            fixed.push(format!(
                "{}: {mode:04o} -> {wanted:04o}",
                absolute(path).display()
            ));
        }
        Ok(())
    };
    tighten(data_dir, 0o700)?;
    let entries = std::fs::read_dir(data_dir)
        .with_context(|| format!("cannot read the data directory {}", data_dir.display()))?;
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            tighten(&entry.path(), 0o600)?;
        }
    }
    Ok(fixed)
}

/// An exclusive lock on a data directory, held while a server serves it.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    /// Takes the lock (`flock` on [`LOCK_FILE`]) and records this process's
    /// id in the file; fails naming the directory and the other server's id
    /// when another server holds it.
    pub fn acquire(data_dir: &std::path::Path) -> anyhow::Result<DataDirLock> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let path = data_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                let who = if pid.is_empty() {
                    "another cordon serve".to_owned()
                } else {
                    format!("another cordon serve (PID {pid})")
                };
                anyhow::bail!(
                    "{who} is already serving the data directory {}; stop it first, or give \
                     this one another --data-dir",
                    absolute(data_dir).display()
                );
            }
            return Err(error).with_context(|| format!("cannot lock {}", path.display()));
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()?;
        Ok(DataDirLock { _file: file })
    }
}

/// A new application in `store` with a new client id and secret (only the
/// secret's hash is kept): returns the client id and the secret.
pub async fn create_app(
    store: &store::Store,
    name: &str,
    permissions: Vec<String>,
) -> anyhow::Result<(String, String)> {
    let client_id = crypto::new_guid();
    let secret = crypto::new_secret();
    store
        .create_app(store::App {
            client_id: client_id.clone(),
            name: name.to_owned(),
            secret_hash: crypto::hash_client_secret(&secret),
            permissions,
            created_at: now_nanos(),
        })
        .await?;
    Ok((client_id, secret))
}

/// A new enroll token in `store` (only its hash is kept), until
/// `expires_at` (Unix nanoseconds) and for `max_uses` enrollments, each
/// without a limit when `None`: returns its id and the token.
pub async fn create_enroll_token(
    store: &store::Store,
    expires_at: Option<i64>,
    max_uses: Option<i64>,
) -> anyhow::Result<(String, String)> {
    let id = crypto::new_guid();
    let token = crypto::new_secret();
    store
        .create_enroll_token(store::EnrollToken {
            id: id.clone(),
            token_hash: crypto::sha256_hex(token.as_bytes()),
            created_at: now_nanos(),
            expires_at,
            max_uses,
        })
        .await?;
    Ok((id, token))
}

/// The tenant id, created on first start.
pub async fn tenant_id(store: &store::Store) -> anyhow::Result<String> {
    Ok(store.meta_or_init("tenant_id", crypto::new_guid).await?)
}

/// The token-signing key, created on first use.
pub async fn signing_key(store: &store::Store) -> anyhow::Result<jwt::SigningKey> {
    let encoded = match store.meta(SIGNING_KEY).await? {
        Some(encoded) => encoded,
        None => {
            let fresh = jwt::SigningKey::generate()?.to_pkcs8_base64();
            store.meta_or_init(SIGNING_KEY, || fresh).await?
        }
    };
    decode_key(&encoded)
}

/// The `meta` key of the current token-signing key (base64 PKCS#8).
const SIGNING_KEY: &str = "signing_key";
/// The `meta` key of the retired ones: a JSON array of
/// `{"key": <base64 PKCS#8>, "retiredAt": <nanoseconds>}`.
const RETIRED_SIGNING_KEYS: &str = "retired_signing_keys";

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredRetiredKey {
    key: String,
    retired_at: i64,
}

fn decode_key(encoded: &str) -> anyhow::Result<jwt::SigningKey> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .context("the stored signing key is not base64")?;
    jwt::SigningKey::from_pkcs8(&der)
}

/// Every token-signing key of the store: the current one (made on first
/// use) and those `cordon keys rotate` retired.
pub async fn key_ring(store: &store::Store) -> anyhow::Result<jwt::KeyRing> {
    let current = signing_key(store).await?;
    let retired: Vec<StoredRetiredKey> = match store.meta(RETIRED_SIGNING_KEYS).await? {
        Some(text) => {
            serde_json::from_str(&text).context("the retired signing keys are damaged")?
        }
        None => Vec::new(),
    };
    let retired = retired
        .iter()
        .map(|r| {
            Ok(jwt::RetiredKey {
                key: Arc::new(decode_key(&r.key)?),
                retired_at: r.retired_at,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(jwt::KeyRing::new(current, retired))
}

/// Makes a new token-signing key the current one; the one it replaces is
/// retired (still verifying tokens for their lifetime). Returns the old and
/// new key ids.
pub async fn rotate_signing_key(store: &store::Store) -> anyhow::Result<(String, String)> {
    // The current key exists (made now if this store never had one).
    let old = signing_key(store).await?;
    let fresh = jwt::SigningKey::generate()?;
    let (encoded, new_kid) = (fresh.to_pkcs8_base64(), fresh.kid().to_owned());
    let expected_kid = old.kid().to_owned();
    let now = now_nanos();
    store
        .update_meta(
            vec![SIGNING_KEY.to_owned(), RETIRED_SIGNING_KEYS.to_owned()],
            move |values| {
                let current = values[0].clone().ok_or("no current signing key")?;
                // Another rotation between the read above and this write
                // would be retired unseen: refuse instead.
                let current_kid = decode_key(&current).map_err(|e| e.to_string())?;
                if current_kid.kid() != expected_kid {
                    return Err("the signing key changed meanwhile; run it again".into());
                }
                let mut retired: Vec<StoredRetiredKey> = match &values[1] {
                    Some(text) => serde_json::from_str(text).map_err(|e| e.to_string())?,
                    None => Vec::new(),
                };
                retired.push(StoredRetiredKey {
                    key: current,
                    retired_at: now,
                });
                let retired = serde_json::to_string(&retired).map_err(|e| e.to_string())?;
                Ok(vec![encoded, retired])
            },
        )
        .await?;
    Ok((old.kid().to_owned(), new_kid))
}

/// Rereads the token-signing keys every `key_reload`, so that a rotation
/// made by `cordon keys rotate` takes effect without a restart.
async fn reload_keys(state: Arc<AppState>) {
    loop {
        tokio::time::sleep(state.config.key_reload).await;
        match key_ring(&state.store).await {
            Ok(ring) => {
                if ring.fingerprint() != state.key_ring().fingerprint() {
                    tracing::info!(
                        kid = ring.current().kid(),
                        "token-signing key rotated: new tokens are signed with the new key"
                    );
                    *state.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not reread the token-signing keys"),
        }
    }
}

/// Starts the server: store, keys, certificate, listener and background
/// tasks. Returns once it accepts connections.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    start_with(config, vec![listener]).await
}

/// Like [`start`], on listeners the caller opened (the first one decides
/// the default public URL). Tests use it to serve on a listener opened in a
/// lab network namespace and another on loopback.
pub async fn start_with(
    config: Config,
    listeners: Vec<std::net::TcpListener>,
) -> anyhow::Result<RunningServer> {
    create_private_dir(&config.data_dir)?;
    let lock = DataDirLock::acquire(&config.data_dir)?;
    let metrics_listener = monitoring::bind(&config.metrics_listen)?;
    let store = init_data_dir(&config.data_dir)?;
    let metrics = Arc::new(monitoring::Metrics::new());
    events::install_renderer(&store, config.heartbeat_interval);
    store.set_observer(metrics.clone());
    let event_position = store
        .event_bounds()
        .await
        .context("cannot read the event log")?
        .last;
    // Counted once, before anything can change an action: from now on
    // every change adjusts the counts.
    let counting = std::time::Instant::now();
    let counts = store
        .action_counts()
        .await
        .context("cannot count the actions")?;
    metrics.set_action_counts(&counts);
    tracing::info!(
        actions = counts.iter().map(|c| c.2).sum::<u64>(),
        elapsed_ms = counting.elapsed().as_millis() as u64,
        "actions counted for the metrics"
    );
    for change in secure_data_dir(&config.data_dir)? {
        tracing::warn!(%change, "the data directory or a file in it was open to other users; made private");
    }
    let tenant_id = tenant_id(&store).await?;
    let keys = key_ring(&store).await?;
    let first = listeners.first().context("no listener")?;
    let local_addr = first.local_addr()?;
    let mut listen_addrs = Vec::new();
    for listener in &listeners {
        listen_addrs.push(listener.local_addr()?);
    }
    let ips: Vec<std::net::IpAddr> = listen_addrs.iter().map(SocketAddr::ip).collect();
    let public_url = match &config.public_url {
        Some(url) => urls::public_url(url).map_err(|e| anyhow::anyhow!("--public-url {e}"))?,
        None => {
            let host = listen::served(config.listen_host.as_deref(), &ips, &[]).url_host;
            format!("https://{host}:{}", local_addr.port())
        }
    };
    let (material, tls_names) = match &config.tls {
        TlsSource::Files { cert, key } => (tls::load_operator(cert, key)?, Vec::new()),
        TlsSource::SelfSigned { extra_names } => {
            let mut extra = Vec::new();
            if config.public_url.is_some() {
                // Checked above: the host as the parser reads it.
                let host = urls::parse(&public_url).map_err(anyhow::Error::msg)?.host;
                extra.push(host);
            }
            extra.extend(extra_names.iter().cloned());
            let names = listen::served(config.listen_host.as_deref(), &ips, &extra).names;
            let guard = tls::NewCaGuard {
                enrolled_machines: store.machine_count().await?,
                allow_new_ca: config.new_ca,
            };
            (
                tls::ensure_self_signed(&config.data_dir, &names, guard)?,
                names,
            )
        }
    };
    let tls_config = tls::server_config(&material)?;
    let issuer = format!("{public_url}/{tenant_id}/v2.0");
    let oidc = oidc::Verifier::new(config.oidc.clone())
        .context("the external identity provider settings are invalid")?;
    let config_signin = (
        config.signin_failures_per_user,
        config.signin_failures_per_source,
    );
    let config_client = (
        config.client_failures_per_client,
        config.client_failures_per_source,
    );
    let files = match conns::raise_file_limit() {
        Ok(files) => files,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the open file limit");
            u64::MAX
        }
    };
    let limits = config.connections.fit(files);
    if limits != config.connections {
        tracing::warn!(
            open_file_limit = files,
            agents = limits.agents,
            api = limits.api,
            handshakes = limits.handshakes,
            "the open file limit is too low for the connection caps; they were scaled down \
             (raise LimitNOFILE)"
        );
    }
    tracing::info!(
        open_file_limit = files,
        agents = limits.agents,
        api = limits.api,
        handshakes = limits.handshakes,
        per_source = limits.per_source,
        "connection caps"
    );
    let connections = conns::Connections::new(limits);
    let admission = admission::Admission::new(&config.admission);
    tracing::info!(
        tls_handshakes = config.admission.tls_handshakes,
        session_setups = config.admission.session_setups,
        enrollments = config.admission.enrollments,
        queue_timeout_ms = config.admission.queue_timeout.as_millis() as u64,
        "work in progress at most"
    );
    let audit_folds = audit::Folding::new(config.audit_fold_window);
    let events = Arc::new(events::Hub::new(
        config.event_streams,
        metrics.clone(),
        event_position,
    ));
    tracing::info!(
        total = config.event_streams.total,
        per_caller = config.event_streams.per_caller,
        "live-event streams at most"
    );
    let state = Arc::new(AppState {
        events,
        audit_folds,
        limiter: ratelimit::RateLimiter::new(
            config.rate_limit_per_minute,
            config.rate_limit_per_hour,
        ),
        enroll_per_source: ratelimit::RateLimiter::new(config.enroll_per_source_per_minute, 0),
        enroll_total: ratelimit::RateLimiter::new(config.enroll_per_minute, 0),
        config,
        store,
        tenant_id: tenant_id.clone(),
        public_url: public_url.clone(),
        issuer,
        keys: std::sync::RwLock::new(Arc::new(keys)),
        gateway: gateway::Gateway::new(metrics.agent_sessions.clone()),
        dummy_hash: crypto::hash_secret("not a secret"),
        throttle: throttle::Throttle::new(config_signin.0, config_signin.1),
        codes: signin::Codes::default(),
        client_throttle: throttle::Throttle::new(config_client.0, config_client.1),
        slow_hashes: Arc::new(tokio::sync::Semaphore::new(4)),
        oidc,
        connections,
        admission,
        metrics: metrics.clone(),
    });
    let mut tasks = vec![
        tokio::spawn(expire_actions(state.clone())),
        tokio::spawn(flush_liveness(state.clone())),
        tokio::spawn(watch_exclusions(state.clone())),
        tokio::spawn(audit_upkeep(state.clone())),
        tokio::spawn(events::run(state.clone())),
        tokio::spawn(webhooks::run(state.clone())),
        tokio::spawn(reload_keys(state.clone())),
    ];
    let metrics_addr = match metrics_listener {
        Some(listener) => {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let address = listener.local_addr()?;
            tracing::info!(%address, "metrics at http://{address}/metrics");
            tasks.push(tokio::spawn(monitoring::serve(listener, metrics)));
            Some(address)
        }
        None => None,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config);
    let router = app(state.clone());
    // The accept loops come last: `wait` waits for the last task.
    for listener in listeners {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tasks.push(tokio::spawn(accept_loop(
            listener,
            acceptor.clone(),
            router.clone(),
            state.clone(),
        )));
    }
    Ok(RunningServer {
        local_addr,
        listen_addrs,
        tls_names,
        tenant_id,
        public_url,
        metrics_addr,
        ca_path: material.ca_path.clone(),
        state,
        tasks,
        _lock: lock,
    })
}

/// Times out actions past their delivery window or apply deadline.
async fn expire_actions(state: Arc<AppState>) {
    let period = Duration::from_secs(1)
        .min(state.config.action_expiry / 2)
        .max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        let now = now_nanos();
        let pending_before = now.saturating_sub(nanos(state.config.action_expiry));
        let in_progress_before = now.saturating_sub(nanos(state.config.apply_deadline));
        match state
            .store
            .expire_actions(pending_before, in_progress_before, now)
            .await
        {
            // The store's observer logs each one (monitoring.rs).
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not expire actions"),
        }
    }
}

/// Events removed from the log in one write.
const EVENT_PRUNE_BATCH: usize = 2_000;
/// How often the event log is pruned.
const EVENT_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Removes the events past their retention, in batches of
/// [`EVENT_PRUNE_BATCH`] (each its own write, so that other writes go
/// between them); the number removed.
pub async fn prune_events(state: &AppState) -> Result<u64, store::StoreError> {
    let before = now_nanos().saturating_sub(nanos(state.config.event_retention));
    let mut removed = 0;
    loop {
        let batch = state.store.prune_events(before, EVENT_PRUNE_BATCH).await?;
        removed += batch;
        if batch < EVENT_PRUNE_BATCH as u64 {
            return Ok(removed);
        }
        tokio::task::yield_now().await;
    }
}

/// Writes the records of folded refusals whose window ended, prunes the
/// event log past its retention (every minute) and the audit trail past
/// its retention (at start, then every hour).
async fn audit_upkeep(state: Arc<AppState>) {
    let tick = Duration::from_secs(5).min(state.config.audit_fold_window);
    let mut next_prune = tokio::time::Instant::now();
    let mut next_event_prune = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        audit::flush_folds(&state, false).await;
        if tokio::time::Instant::now() >= next_event_prune {
            next_event_prune = tokio::time::Instant::now() + EVENT_PRUNE_EVERY;
            match prune_events(&state).await {
                Ok(0) => {}
                Ok(removed) => {
                    state.metrics.events_pruned.inc_by(removed);
                    tracing::info!(
                        removed,
                        "events past their retention pruned from the event log"
                    )
                }
                Err(e) => tracing::warn!(error = %e, "could not prune the event log"),
            }
            match webhooks::prune(&state.store, &state.config.webhooks).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(
                    removed,
                    "finished webhook deliveries past their history pruned"
                ),
                Err(e) => tracing::warn!(error = %e, "could not prune the webhook deliveries"),
            }
        }
        let Some(retention) = state.config.audit_retention else {
            continue;
        };
        if tokio::time::Instant::now() < next_prune {
            continue;
        }
        next_prune = tokio::time::Instant::now() + Duration::from_secs(3600);
        let before = now_nanos().saturating_sub(retention.as_nanos().min(i64::MAX as u128) as i64);
        match audit::prune(
            &state.store,
            state.signing_key(),
            before,
            "server (audit retention)".to_owned(),
            "SERVER",
        )
        .await
        {
            Ok((0, _)) => {}
            Ok((removed, _)) => {
                tracing::info!(removed, "audit records past their retention pruned")
            }
            Err(e) => tracing::warn!(error = %e, "could not prune the audit trail"),
        }
    }
}

/// Writes heartbeats to the store in batches and closes revoked sessions.
async fn flush_liveness(state: Arc<AppState>) {
    let mut rounds = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        state.gateway.flush(&state.store).await;
        rounds += 1;
        if rounds.is_multiple_of(5) {
            state.gateway.close_revoked(&state.store).await;
        }
    }
}

/// Pushes the exclusion rules to every agent session when their version
/// changed without this server pushing it: `cordon exclusion add|remove`
/// runs in another process, on the same database.
async fn watch_exclusions(state: Arc<AppState>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match state.store.exclusion_version().await {
            Ok(version) if version > state.gateway.exclusions_pushed() => {
                exclusions::publish(&state).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not read the exclusion rule version"),
        }
    }
}

/// How long a connection closing at the end of its lifetime may take to
/// finish the request it is serving.
const CLOSING_GRACE: Duration = Duration::from_secs(30);

/// How long a TLS handshake keeps its place among those in progress
/// (admission): its cryptography is done within milliseconds; the rest is
/// the client's round trip.
const HANDSHAKE_PLACE_HOLD: Duration = Duration::from_secs(1);

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    state: Arc<AppState>,
) {
    let log = &state.connections.log;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait, don't spin.
                if let Some(suppressed) = log.allow("accept failed") {
                    tracing::warn!(error = %e, suppressed, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A full handshake share still takes agents announcing themselves.
        let admitted = match state.connections.admit(peer.ip()) {
            Err(conns::Refusal::Handshakes) => state.connections.admit_announced(peer.ip()),
            admitted => admitted,
        };
        let slot = match admitted {
            Ok(slot) => Arc::new(slot),
            Err(refusal) => {
                if let Some(suppressed) = log.allow(refusal.as_str()) {
                    tracing::warn!(%peer, reason = refusal.as_str(), suppressed, "connection refused");
                }
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let idle_timeout = state.config.idle_timeout;
        let lifetime = state.config.max_connection_lifetime;
        let handshake_timeout = state.config.handshake_timeout;
        let connections = state.connections.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let handshake = async {
                let start =
                    tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
                        .await?;
                let announced = start.client_hello().alpn().is_some_and(|mut offered| {
                    offered.any(|protocol| protocol == proto::agent::SESSION_ALPN)
                });
                match slot.kind() {
                    conns::Kind::Handshake if announced => {
                        let _ = slot.announce_agent();
                    }
                    conns::Kind::AnnouncedAgent if !announced => {
                        // Taken while the handshake share was full, for agents only.
                        let refusal = conns::Refusal::Handshakes;
                        if let Some(suppressed) = connections.log.allow(refusal.as_str()) {
                            tracing::warn!(%peer, reason = refusal.as_str(), suppressed, "connection refused");
                        }
                        return Err(std::io::Error::other("refused"));
                    }
                    _ => {}
                }
                // The handshake's cryptography waits for its place; past
                // the queue timeout the connection is closed.
                let gate = if announced {
                    &state.admission.tls_agents
                } else {
                    &state.admission.tls_others
                };
                let place = gate
                    .enter()
                    .await
                    .map_err(|_| std::io::Error::other("too many TLS handshakes in progress"))?;
                // The server's cryptography runs as the handshake starts
                // (on the ClientHello already read); then it waits for the
                // client's answer. The place is held for at most
                // HANDSHAKE_PLACE_HOLD, so a client that stalls can't keep it.
                let accept = start.into_stream(acceptor.config().clone());
                tokio::pin!(accept);
                tokio::select! {
                    done = &mut accept => done,
                    _ = tokio::time::sleep(HANDSHAKE_PLACE_HOLD) => {
                        drop(place);
                        accept.await
                    }
                }
            };
            // Ten seconds for the handshake, besides its wait for a place.
            let tls_deadline = Duration::from_secs(10) + state.config.admission.queue_timeout;
            let tls = match tokio::time::timeout(tls_deadline, handshake).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let exporter = tls
                .get_ref()
                .1
                .export_keying_material([0u8; 32], proto::agent::EXPORTER_LABEL, None)
                .ok()
                .map(|ekm| base64::engine::general_purpose::STANDARD.encode(ekm));
            let info = ConnInfo { peer, exporter };
            let watch = slot.clone();
            let conn_slot = conns::ConnSlot(slot);
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(info.clone());
                    conns::on_request_head(&conn_slot.0, &mut request);
                    request.extensions_mut().insert(conn_slot.clone());
                    let mut router = router.clone();
                    async move { router.call(request.map(Body::new)).await }
                },
            );
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(idle_timeout)
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades();
            tokio::pin!(connection);
            // An agent's session leaves this future when it upgrades, so
            // the lifetime bounds everything else. A connection still not
            // known as an API client or agent by its handshake deadline
            // (it sent nothing, or only failed session requests) is cut.
            let handshake_deadline =
                tokio::time::sleep(handshake_timeout.saturating_sub(watch.age()));
            let lifetime_over = tokio::time::sleep(lifetime);
            tokio::pin!(handshake_deadline, lifetime_over);
            let mut handshake_checked = false;
            let result = loop {
                tokio::select! {
                    result = connection.as_mut() => break result,
                    _ = &mut handshake_deadline, if !handshake_checked => {
                        handshake_checked = true;
                        if matches!(watch.kind(), conns::Kind::Handshake | conns::Kind::AnnouncedAgent) {
                            tracing::debug!(%peer, "connection cut: no request within the handshake deadline");
                            break Ok(());
                        }
                    }
                    _ = &mut lifetime_over => {
                        connection.as_mut().graceful_shutdown();
                        break tokio::time::timeout(CLOSING_GRACE, connection.as_mut())
                            .await
                            .unwrap_or(Ok(()));
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
