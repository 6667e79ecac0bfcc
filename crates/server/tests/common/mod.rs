//! The test harness: the real server on a free port, spoken to over HTTPS
//! with the project's own client, and test agents built from the agent
//! library.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agent::{HttpsClient, Identity, Reply, Session};
use http::Method;
use proto::agent::{AgentMessage, Enforced, ExclusionSpec, ServerMessage};
use serde_json::Value;
use server::{Config, RunningServer};

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "cordon-test-{label}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct TestServer {
    pub server: RunningServer,
    pub dir: TempDir,
    pub url: String,
    pub ca: PathBuf,
    pub client_id: String,
    pub client_secret: String,
}

/// Rate limits (enrollment's too) and the metrics listener off unless a
/// test turns them on.
pub fn test_config(dir: &Path) -> Config {
    let mut config = Config::new(dir.to_owned());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.rate_limit_per_minute = 0;
    config.rate_limit_per_hour = 0;
    config.enroll_per_source_per_minute = 0;
    config.enroll_per_minute = 0;
    // Never the default metrics port (tests run side by side); a test
    // that reads the metrics asks for 127.0.0.1:0.
    config.metrics_listen = server::monitoring::MetricsListen::Off;
    config
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_in(TempDir::new("server"), tweak).await
    }

    /// A server on the data directory `dir` (one a stopped server used:
    /// a restart).
    pub async fn start_in(dir: TempDir, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = test_config(&dir.0);
        tweak(&mut config);
        let server = server::start(config).await.expect("server starts");
        let url = format!("https://localhost:{}", server.local_addr.port());
        let ca = server.ca_path.clone().expect("self-signed CA");
        let (client_id, client_secret) = create_app(
            &server.state.store,
            "Test SOAR",
            &["Machine.Isolate", "Machine.Read.All"],
        )
        .await;
        TestServer {
            server,
            dir,
            url,
            ca,
            client_id,
            client_secret,
        }
    }

    pub fn tenant(&self) -> &str {
        &self.server.tenant_id
    }

    pub fn store(&self) -> &store::Store {
        &self.server.state.store
    }

    pub fn https(&self) -> HttpsClient {
        HttpsClient::new(agent::https::tls_config(&self.ca).unwrap(), &self.url).unwrap()
    }

    /// A token for the test app (both permissions).
    pub async fn token(&self) -> String {
        self.token_for(&self.client_id.clone(), &self.client_secret.clone())
            .await
    }

    pub async fn token_for(&self, client_id: &str, secret: &str) -> String {
        self.token_for_resource(
            client_id,
            secret,
            "https://api.securitycenter.microsoft.com",
        )
        .await
    }

    /// A client-credentials token of an app for `resource`.
    pub async fn token_for_resource(
        &self,
        client_id: &str,
        secret: &str,
        resource: &str,
    ) -> String {
        let scope = format!("{resource}/.default");
        self.token_from(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret),
            ("scope", &scope),
        ])
        .await
    }

    /// The access token the v2 token endpoint answers to `fields`.
    pub async fn token_from(&self, fields: &[(&str, &str)]) -> String {
        let reply = self
            .https()
            .request(
                Method::POST,
                &format!("/{}/oauth2/v2.0/token", self.tenant()),
                &[("content-type", "application/x-www-form-urlencoded")],
                form(fields),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        reply.json().unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// A user's token for the console (client `cordon-console`, password
    /// grant, every delegated permission).
    pub async fn user_token(&self, upn: &str, password: &str) -> String {
        self.token_from(&[
            ("grant_type", "password"),
            ("client_id", "cordon-console"),
            ("username", upn),
            ("password", password),
            ("scope", "https://api.securitycenter.microsoft.com/.default"),
        ])
        .await
    }

    /// An API client holding a user's console token.
    pub async fn user_api(&self, upn: &str, password: &str) -> Api {
        Api {
            http: self.https(),
            token: self.user_token(upn, password).await,
        }
    }

    /// An API client holding a token of the test app.
    pub async fn api(&self) -> Api {
        Api {
            http: self.https(),
            token: self.token().await,
        }
    }

    pub async fn enroll_token(&self) -> String {
        server::create_enroll_token(self.store(), None, None)
            .await
            .unwrap()
            .1
    }

    /// Enrolls a test agent named `name`.
    pub async fn enroll(&self, name: &str) -> TestAgent {
        let state = TempDir::new("agent");
        let token = self.enroll_token().await;
        let identity = agent::enroll(&self.url, &token, &self.ca, &state.0, Some(name))
            .await
            .expect("enrollment");
        TestAgent {
            identity,
            state,
            name: name.to_owned(),
        }
    }
}

pub async fn create_app(
    store: &store::Store,
    name: &str,
    permissions: &[&str],
) -> (String, String) {
    server::create_app(
        store,
        name,
        permissions.iter().map(|p| p.to_string()).collect(),
    )
    .await
    .unwrap()
}

/// Creates a user who signs in with `password` (display name
/// `Display <upn>`); returns their object id.
pub async fn create_user(
    server: &TestServer,
    upn: &str,
    password: &str,
    role: &str,
    user_groups: &[&str],
) -> String {
    let id = server::crypto::new_guid();
    server
        .store()
        .create_user(store::UserRecord {
            id: id.clone(),
            upn: upn.into(),
            display_name: format!("Display {upn}"),
            password_hash: server::crypto::hash_secret(password),
            role: role.into(),
            user_groups: user_groups.iter().map(|g| g.to_string()).collect(),
            disabled: false,
            created_at: server::now_nanos(),
        })
        .await
        .unwrap();
    id
}

/// A machine group of the machines whose name begins with `prefix`, open
/// to the members of `user_group`; returns its id.
pub async fn create_prefix_group(
    server: &TestServer,
    name: &str,
    rank: i64,
    prefix: &str,
    user_group: &str,
) -> i64 {
    server
        .store()
        .create_group(store::NewGroup {
            name: name.into(),
            rank,
            match_tag: None,
            match_name_prefix: Some(prefix.into()),
            match_os: None,
            user_groups: vec![user_group.into()],
            now: server::now_nanos(),
        })
        .await
        .unwrap()
        .id
}

pub fn form(fields: &[(&str, &str)]) -> Vec<u8> {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
        .into_bytes()
}

/// The public API, with a bearer token.
pub struct Api {
    pub http: HttpsClient,
    pub token: String,
}

impl Api {
    pub async fn get(&mut self, path: &str) -> Reply {
        let auth = format!("Bearer {}", self.token);
        self.http
            .request(Method::GET, path, &[("authorization", &auth)], Vec::new())
            .await
            .unwrap()
    }

    pub async fn post(&mut self, path: &str, body: Value) -> Reply {
        self.post_raw(path, "application/json", body.to_string().into_bytes())
            .await
    }

    pub async fn post_raw(&mut self, path: &str, content_type: &str, body: Vec<u8>) -> Reply {
        self.send(Method::POST, path, content_type, body).await
    }

    pub async fn patch(&mut self, path: &str, body: Value) -> Reply {
        self.send(
            Method::PATCH,
            path,
            "application/json",
            body.to_string().into_bytes(),
        )
        .await
    }

    pub async fn delete(&mut self, path: &str) -> Reply {
        let auth = format!("Bearer {}", self.token);
        self.http
            .request(
                Method::DELETE,
                path,
                &[("authorization", &auth)],
                Vec::new(),
            )
            .await
            .unwrap()
    }

    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Reply {
        let auth = format!("Bearer {}", self.token);
        self.http
            .request(
                method,
                path,
                &[("authorization", &auth), ("content-type", content_type)],
                body,
            )
            .await
            .unwrap()
    }

    pub async fn isolate(&mut self, machine_id: &str) -> Reply {
        self.post(
            &format!("/api/machines/{machine_id}/isolate"),
            serde_json::json!({"Comment": "test isolation", "IsolationType": "Full"}),
        )
        .await
    }

    /// Isolates `machine_id` (expecting 201) and returns the action's id.
    pub async fn isolate_action(&mut self, machine_id: &str) -> String {
        let reply = self.isolate(machine_id).await;
        assert_eq!(reply.status, 201, "{:?}", reply.body);
        reply.json().unwrap()["id"].as_str().unwrap().to_owned()
    }

    pub async fn unisolate(&mut self, machine_id: &str) -> Reply {
        self.post(
            &format!("/api/machines/{machine_id}/unisolate"),
            serde_json::json!({"Comment": "test release"}),
        )
        .await
    }

    pub async fn action(&mut self, id: &str) -> Value {
        let reply = self.get(&format!("/api/machineactions/{id}")).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        reply.json().unwrap()
    }

    pub async fn machine(&mut self, id: &str) -> Value {
        let reply = self.get(&format!("/api/machines/{id}")).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        reply.json().unwrap()
    }

    /// Polls an action until it reaches `status` (at most 10 s).
    pub async fn wait_status(&mut self, id: &str, status: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let action = self.action(id).await;
            if action["status"] == status || tokio::time::Instant::now() > deadline {
                assert_eq!(action["status"], status, "{action}");
                return action;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Asserts an error reply in the contract's format and returns its code.
pub fn assert_error(reply: &Reply, status: u16, code: &str) -> Value {
    assert_eq!(
        reply.status.as_u16(),
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let body = reply.json().unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(
        body["error"]["target"].as_str(),
        reply.header("request-id"),
        "target is the request id"
    );
    body
}

pub struct TestAgent {
    pub identity: Identity,
    pub state: TempDir,
    pub name: String,
}

impl TestAgent {
    pub fn machine_id(&self) -> String {
        self.identity.machine_id.clone()
    }

    /// Opens a session and takes the exclusion rules the server sends
    /// right after its welcome, so that the next message is what the test
    /// is about.
    pub async fn connect(&self) -> Session {
        self.connect_with_exclusions().await.0
    }

    /// Opens a session; also returns the exclusion rules (version and
    /// rules) the server sends right after its welcome.
    pub async fn connect_with_exclusions(&self) -> (Session, (i64, Vec<ExclusionSpec>)) {
        let mut session = Session::open(
            &self.identity,
            agent::host_facts(Some(&self.name)),
            Enforced::NotIsolated,
        )
        .await
        .expect("session opens");
        let exclusions = exclusions_of(next(&mut session).await);
        (session, exclusions)
    }
}

/// The version and rules of an `exclusions` message.
pub fn exclusions_of(message: ServerMessage) -> (i64, Vec<ExclusionSpec>) {
    match message {
        ServerMessage::Exclusions { version, rules } => (version, rules),
        other => panic!("expected exclusion rules, got {other:?}"),
    }
}

/// The next message of a session, within 5 seconds.
pub async fn next(session: &mut Session) -> ServerMessage {
    tokio::time::timeout(Duration::from_secs(5), session.recv())
        .await
        .expect("a message within 5 s")
        .expect("session open")
}

/// Acknowledges, expects Proceed, and reports the outcome.
pub async fn execute(session: &mut Session, action_id: &str, succeeded: bool, enforced: Enforced) {
    session
        .send(&AgentMessage::Ack {
            action_id: action_id.into(),
        })
        .await
        .unwrap();
    assert_eq!(
        next(session).await,
        ServerMessage::Proceed {
            action_id: action_id.into()
        }
    );
    report(session, action_id, succeeded, enforced).await;
}

/// Sends an action's outcome as the agent would after applying it (a
/// failure with an HRESULT and a reason); whether the server accepts it
/// depends on what came before.
pub async fn report(session: &mut Session, action_id: &str, succeeded: bool, enforced: Enforced) {
    session
        .send(&AgentMessage::Result {
            action_id: action_id.into(),
            succeeded,
            error_h_result: if succeeded { 0 } else { 5 },
            reason: (!succeeded).then(|| "could not apply the ruleset".into()),
            enforced,
        })
        .await
        .unwrap();
}

/// The pushed action's id.
pub fn action_id_of(message: &ServerMessage) -> String {
    match message {
        ServerMessage::Action(order) => order.action_id.clone(),
        other => panic!("expected an action, got {other:?}"),
    }
}

/// A TLS connection to the server from the loopback address `local` (any
/// of 127.0.0.0/8), so that a test can act as several source addresses.
pub async fn tls_from(
    server: &TestServer,
    local: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{local}:0").parse().expect("an IPv4 address"))?;
    let tcp = socket.connect(server.server.local_addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(agent::https::tls_config(&server.ca).unwrap())
        .connect(name, tcp)
        .await
}

/// An HTTP/1.1 client on one connection from a chosen loopback address.
pub struct ClientFrom {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
}

impl ClientFrom {
    pub async fn connect(server: &TestServer, local: &str) -> anyhow::Result<ClientFrom> {
        let tls = tls_from(server, local).await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(ClientFrom { sender })
    }

    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> anyhow::Result<Reply> {
        use http_body_util::BodyExt;
        let mut builder = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await?.to_bytes(),
        })
    }
}

/// `count` machines named `<prefix><i>`, enrolled straight through the
/// store (fast); their ids in order.
pub async fn enroll_many(server: &TestServer, prefix: &str, count: usize) -> Vec<String> {
    static KEYS: AtomicU64 = AtomicU64::new(1);
    let token_hash = server::crypto::sha256_hex(server.enroll_token().await.as_bytes());
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..count {
        let store = server.store().clone();
        let token_hash = token_hash.clone();
        let name = format!("{prefix}{i}");
        // One key per machine: a key enrolls once.
        let key = KEYS.fetch_add(1, Ordering::Relaxed).to_le_bytes().repeat(4);
        writes.spawn(async move {
            let machine = store
                .enroll_machine(
                    token_hash,
                    server::crypto::new_machine_id(),
                    key,
                    store::Facts {
                        computer_dns_name: name,
                        ..Default::default()
                    },
                    server::now_nanos(),
                )
                .await
                .unwrap();
            (i, machine.id)
        });
    }
    let mut ids = vec![String::new(); count];
    while let Some(joined) = writes.join_next().await {
        let (i, id) = joined.unwrap();
        ids[i] = id;
    }
    ids
}

/// A client-credentials token of the application `app` (as `cordon app
/// create --json` prints it) from the server at `url`.
pub async fn app_token(url: &str, ca: &Path, app: &Value) -> String {
    let mut http = agent::HttpsClient::new(agent::https::tls_config(ca).unwrap(), url).unwrap();
    let reply = http
        .request(
            http::Method::POST,
            &format!("/{}/oauth2/v2.0/token", app["tenantId"].as_str().unwrap()),
            &[("content-type", "application/x-www-form-urlencoded")],
            form(&[
                ("grant_type", "client_credentials"),
                ("client_id", app["clientId"].as_str().unwrap()),
                ("client_secret", app["clientSecret"].as_str().unwrap()),
                ("scope", "https://api.securitycenter.microsoft.com/.default"),
            ]),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.json().unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `cordon ARGS` on the data directory `data_dir`, as a user types it.
pub async fn cordon_cli(args: &[&str], data_dir: &Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_cordon"))
        .args(args)
        .env("CORDON_DATA_DIR", data_dir)
        .output()
        .await
        .unwrap()
}

// ---- `cordon serve` as a process ------------------------------------------

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `cordon serve` process, killed on drop.
pub struct Served {
    pub child: std::process::Child,
    pub url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(data_dir: &Path) -> Served {
    serve_on(data_dir, free_port())
}

pub fn serve_on(data_dir: &Path, port: u16) -> Served {
    serve_with(data_dir, port, &[])
}

/// `cordon serve` with extra arguments.
pub fn serve_with(data_dir: &Path, port: u16, extra: &[&str]) -> Served {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cordon"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env("CORDON_DATA_DIR", data_dir)
        .env("CORDON_RATE_LIMIT_PER_MINUTE", "0")
        .env("CORDON_RATE_LIMIT_PER_HOUR", "0")
        .env("CORDON_ENROLL_LIMIT_PER_SOURCE", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let mut printed = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("CA file:") {
            break;
        }
    }
    assert!(printed.contains("Tenant id:"), "{printed}");
    assert!(printed.contains("  Console:   https://"), "{printed}");
    assert!(
        printed.contains(&data_dir.join("ca.pem").display().to_string()),
        "{printed}"
    );
    std::thread::spawn(move || for _ in lines {});
    Served {
        child,
        url: format!("https://localhost:{port}"),
    }
}
