//! The Cordon server: the public isolation API, its own OAuth authority and
//! the agent gateway, served over HTTPS on one port.
//!
//! `main.rs` is a thin command-line front; [`start`] is what tests call to
//! run the real server on a free port.

pub mod api;
pub mod audit;
pub mod auth;
pub mod authority;
pub mod conns;
pub mod crypto;
pub mod error;
pub mod exclusions;
pub mod gateway;
pub mod jwt;
pub mod odata;
pub mod oidc;
pub mod ratelimit;
pub mod rbac;
pub mod signin;
pub mod throttle;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// Canonical base URL; `None`: `https://<listen address>`.
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
    /// Caps on connections, in all and per source address.
    pub connections: conns::Limits,
    /// How long a connection may take to send a request's head, counted
    /// from its opening or its previous response (the keep-alive idle time).
    pub idle_timeout: Duration,
    /// How long a connection other than an agent session is kept at most:
    /// then it is closed once its request in progress is answered.
    pub max_connection_lifetime: Duration,
    /// How long a connection may take, from its opening, to become an API
    /// connection or an agent session before it is cut.
    pub handshake_timeout: Duration,
}

impl Config {
    /// The embedded defaults, with data in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            listen: "127.0.0.1:8443".parse().expect("address"),
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
            connections: conns::Limits::default(),
            idle_timeout: Duration::from_secs(30),
            max_connection_lifetime: Duration::from_secs(10 * 60),
            handshake_timeout: Duration::from_secs(30),
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
    pub signing_key: jwt::SigningKey,
    pub limiter: ratelimit::RateLimiter,
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
}

impl AppState {
    /// Checks `secret` against a slow (PBKDF2) hash, waiting for one of the
    /// few slots; `None` if the server is shutting down.
    pub async fn verify_slow_hash(&self, secret: String, encoded: String) -> Option<bool> {
        let slot = self.slow_hashes.clone().acquire_owned().await.ok()?;
        Some(crypto::verify_secret_off_thread(secret, encoded, slot).await)
    }

    /// Thresholds of `healthStatus` as of now.
    pub fn sql_context(&self) -> store::SqlContext {
        let now = now_nanos();
        let active = self.config.heartbeat_interval * 3 + Duration::from_secs(10);
        store::SqlContext {
            active_since: now - active.as_nanos() as i64,
            inactive_before: now - Duration::from_secs(7 * 24 * 3600).as_nanos() as i64,
        }
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

pub fn unix_seconds() -> i64 {
    now_nanos() / 1_000_000_000
}

/// `https://<host the client used>`, or the public URL when the `Host`
/// header is missing or not a plain host name.
pub fn base_url(headers: &HeaderMap, state: &AppState) -> String {
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
        .nest("/api", api::routes())
        .nest("/api/v1.0", api::routes())
        .merge(authority::routes())
        .merge(signin::routes())
        .merge(gateway::routes())
        .fallback(|| async {
            ApiError::not_found("The requested resource was not found.").into_response()
        })
        .layer(axum::middleware::from_fn(conns::classify))
        .layer(axum::middleware::from_fn(error::request_context))
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
    pub tenant_id: String,
    pub public_url: String,
    /// Where the generated CA certificate is (self-signed mode).
    pub ca_path: Option<PathBuf>,
    pub state: Arc<AppState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
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

/// Opens the store in `data_dir`, creating the directory.
pub fn open_store(data_dir: &std::path::Path) -> anyhow::Result<store::Store> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    store::Store::open(&data_dir.join("cordon.db"))
        .with_context(|| format!("cannot open the database in {}", data_dir.display()))
}

/// The tenant id, created on first start.
pub async fn tenant_id(store: &store::Store) -> anyhow::Result<String> {
    Ok(store.meta_or_init("tenant_id", crypto::new_guid).await?)
}

async fn signing_key(store: &store::Store) -> anyhow::Result<jwt::SigningKey> {
    let encoded = match store.meta("signing_key").await? {
        Some(encoded) => encoded,
        None => {
            let fresh = jwt::SigningKey::generate()?.to_pkcs8_base64();
            store.meta_or_init("signing_key", || fresh).await?
        }
    };
    let der = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .context("the stored signing key is not base64")?;
    jwt::SigningKey::from_pkcs8(&der)
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
    let store = open_store(&config.data_dir)?;
    let tenant_id = tenant_id(&store).await?;
    let signing_key = signing_key(&store).await?;
    let first = listeners.first().context("no listener")?;
    let local_addr = first.local_addr()?;
    let listen_host = match local_addr.ip() {
        ip if ip.is_unspecified() => "localhost".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    };
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("https://{listen_host}:{}", local_addr.port()))
        .trim_end_matches('/')
        .to_owned();
    let material = match &config.tls {
        TlsSource::Files { cert, key } => tls::load_operator(cert, key)?,
        TlsSource::SelfSigned { extra_names } => {
            let mut names = vec!["localhost".to_owned()];
            for listener in &listeners {
                let ip = listener.local_addr()?.ip();
                if ip.is_unspecified() {
                    names.push("127.0.0.1".into());
                    names.push("::1".into());
                } else {
                    names.push(ip.to_string());
                }
            }
            if let Some(host) = public_url
                .strip_prefix("https://")
                .and_then(|rest| rest.split('/').next())
            {
                let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
                names.push(host.trim_matches(|c| c == '[' || c == ']').to_owned());
            }
            names.extend(extra_names.iter().cloned());
            let mut unique = Vec::new();
            for name in names {
                if !unique.contains(&name) {
                    unique.push(name);
                }
            }
            tls::ensure_self_signed(&config.data_dir, &unique)?
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
    let state = Arc::new(AppState {
        limiter: ratelimit::RateLimiter::new(
            config.rate_limit_per_minute,
            config.rate_limit_per_hour,
        ),
        config,
        store,
        tenant_id: tenant_id.clone(),
        public_url: public_url.clone(),
        issuer,
        signing_key,
        gateway: gateway::Gateway::default(),
        dummy_hash: crypto::hash_secret("not a secret"),
        throttle: throttle::Throttle::new(config_signin.0, config_signin.1),
        codes: signin::Codes::default(),
        client_throttle: throttle::Throttle::new(config_client.0, config_client.1),
        slow_hashes: Arc::new(tokio::sync::Semaphore::new(4)),
        oidc,
        connections,
    });
    let mut tasks = vec![
        tokio::spawn(expire_actions(state.clone())),
        tokio::spawn(flush_liveness(state.clone())),
        tokio::spawn(watch_exclusions(state.clone())),
    ];
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
        tenant_id,
        public_url,
        ca_path: material.ca_path.clone(),
        state,
        tasks,
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
        let pending_before = now - state.config.action_expiry.as_nanos() as i64;
        let in_progress_before = now - state.config.apply_deadline.as_nanos() as i64;
        match state
            .store
            .expire_actions(pending_before, in_progress_before, now)
            .await
        {
            Ok(expired) => {
                for action in expired {
                    tracing::info!(action_id = %action.id, machine_id = %action.machine_id, "action timed out");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not expire actions"),
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
                start.into_stream(acceptor.config().clone()).await
            };
            let tls = match tokio::time::timeout(Duration::from_secs(10), handshake).await {
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
