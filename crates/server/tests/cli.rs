//! The `cordon` binary: `serve`, the admin commands, and durability across
//! a SIGKILL.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn cordon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cordon"))
}

fn run_json(args: &[&str]) -> Value {
    let output = cordon().args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn serve_help_documents_every_environment_variable() {
    let output = cordon().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    // Each option's block of the long help, from its `--flag` line to the next.
    let mut blocks: Vec<String> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("--") || trimmed.starts_with("-h") {
            blocks.push(String::new());
        }
        if let Some(block) = blocks.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    let options: Vec<&String> = blocks.iter().filter(|b| !b.contains("--help")).collect();
    assert!(options.len() >= 15, "{help}");
    for block in options {
        assert!(
            block.contains("[env: CORDON_"),
            "no environment variable:\n{block}"
        );
    }
    for var in ["CORDON_DATA_DIR", "CORDON_LISTEN", "CORDON_OIDC_ISSUER"] {
        assert!(help.contains(var), "{var} missing from:\n{help}");
    }
    let output = cordon()
        .args(["serve", "--public-url", "http://plain.example"])
        .env(
            "CORDON_DATA_DIR",
            std::env::temp_dir().join("cordon-unused"),
        )
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("https://"));
}

/// Runs `cordon serve --listen LISTEN` on `data_dir`; returns the process
/// and what it printed up to the CA file's line.
fn serve_listen(data_dir: &Path, listen: &str) -> (Served, String) {
    serve_listen_with(data_dir, listen, &[])
}

/// [`serve_listen`] with extra arguments.
fn serve_listen_with(data_dir: &Path, listen: &str, extra: &[&str]) -> (Served, String) {
    let mut child = cordon()
        .args(["serve", "--listen", listen])
        .args(extra)
        .env("CORDON_DATA_DIR", data_dir)
        .env_remove("CORDON_PUBLIC_URL")
        .env_remove("CORDON_TLS_SAN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("CA file:") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let url = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("URL:"))
        .unwrap_or_else(|| panic!("no URL in {printed}"))
        .trim()
        .to_owned();
    (Served { child, url }, printed)
}

/// A TLS handshake with the server on 127.0.0.1:`port`, verifying its
/// certificate for `name` against the CA.
async fn handshake(ca: &Path, port: u16, name: &str) -> Result<(), String> {
    let config = agent::https::tls_config(ca).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_and_url_fit_the_listen_address() {
    let dir = TempDir::new("listen");
    let data = dir.0.join("data");
    let ca = data.join("ca.pem");
    let port = free_port();
    let host = server::listen::host_name();

    let (served, _) = serve_listen(&data, &format!("127.0.0.1:{port}"));
    assert_eq!(served.url, format!("https://127.0.0.1:{port}"));
    if let Some(host) = &host {
        assert!(handshake(&ca, port, host).await.is_err(), "{host}");
    }
    drop(served);
    let ca_files = (
        std::fs::read(&ca).unwrap(),
        std::fs::read(data.join("ca-key.pem")).unwrap(),
    );
    let first_cert = std::fs::read(data.join("server.pem")).unwrap();

    // Every address: the host name and each local address, from the same CA.
    let (served, printed) = serve_listen(&data, &format!("0.0.0.0:{port}"));
    let host = host.unwrap_or_else(|| "localhost".into());
    assert_eq!(served.url, format!("https://{host}:{port}"), "{printed}");
    assert!(
        printed.contains("--tls-san") && printed.contains("--public-url"),
        "{printed}"
    );
    handshake(&ca, port, &host).await.unwrap();
    handshake(&ca, port, "localhost").await.unwrap();
    let locals = server::listen::local_addresses("0.0.0.0".parse().unwrap());
    assert!(!locals.is_empty());
    for ip in locals {
        assert!(printed.contains(&ip.to_string()), "{ip}: {printed}");
        handshake(&ca, port, &ip.to_string()).await.unwrap();
    }
    drop(served);
    assert_eq!(
        (
            std::fs::read(&ca).unwrap(),
            std::fs::read(data.join("ca-key.pem")).unwrap()
        ),
        ca_files,
        "the CA is kept"
    );
    assert_ne!(std::fs::read(data.join("server.pem")).unwrap(), first_cert);

    // A host name: served on what it resolves to, under that name.
    let (served, printed) = serve_listen(&data, &format!("localhost:{port}"));
    assert_eq!(served.url, format!("https://localhost:{port}"), "{printed}");
    let mut http =
        agent::HttpsClient::new(agent::https::tls_config(&ca).unwrap(), &served.url).unwrap();
    let reply = http
        .request(http::Method::GET, "/api/machines", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(reply.status, 401);
}

#[test]
fn a_listen_address_that_is_not_host_and_port_is_refused_clearly() {
    for (listen, expect) in [
        ("localhost", "use HOST:PORT"),
        ("localhost:99999", "is not a port"),
        ("::1:8443", "brackets"),
        ("no such host:8443", "use HOST:PORT"),
    ] {
        let output = cordon()
            .args(["serve", "--listen", listen])
            .env(
                "CORDON_DATA_DIR",
                std::env::temp_dir().join("cordon-unused"),
            )
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{listen}");
        let error = String::from_utf8_lossy(&output.stderr);
        assert!(error.contains(expect), "{listen}: {error}");
    }
}

/// Runs `cordon serve` with `args` and expects it to exit with an error
/// within ten seconds (killed if it served instead); returns its stderr.
fn serve_refused(data_dir: &Path, args: &[&str]) -> String {
    let mut child = cordon()
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(args)
        .env("CORDON_DATA_DIR", data_dir)
        .env_remove("CORDON_PUBLIC_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} was accepted: the server started");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{args:?}: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_url_that_is_not_a_plain_https_url_is_refused_clearly() {
    let dir = TempDir::new("public-url");
    let data = dir.0.join("data");
    for (url, expect) in [
        ("https://u:p@x", "user info"),
        ("https://x:8443.evil.com", "port"),
        ("https://x:99999", "port"),
        ("https://", "not an absolute URL"),
        ("https://x/a?b", "query"),
        ("https://x/a#f", "fragment"),
        ("https://x/a/../b", ".."),
        ("http://x", "https://"),
    ] {
        let error = serve_refused(&data, &["--public-url", url]);
        assert!(error.contains("--public-url"), "{url}: {error}");
        assert!(error.contains(expect), "{url}: {error}");
        assert!(error.contains("absolute https URL"), "{url}: {error}");
    }
    assert!(
        !data.join("server.pem").exists(),
        "no certificate was issued"
    );

    // A good one with a path (and a trailing slash, trimmed) serves, under
    // a certificate that names its host.
    let port = free_port();
    let public = format!("https://Cordon.Example.com:{port}/cordon/");
    let (served, printed) = serve_listen_with(
        &data,
        &format!("127.0.0.1:{port}"),
        &["--public-url", &public],
    );
    assert_eq!(
        served.url,
        format!("https://Cordon.Example.com:{port}/cordon"),
        "{printed}"
    );
    assert!(printed.contains("cordon.example.com"), "{printed}");
    handshake(&data.join("ca.pem"), port, "cordon.example.com")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_logged_under_the_request_target() {
    let dir = TempDir::new("reqlog");
    let log = dir.0.join("serve.log");
    let port = free_port();
    let mut child = cordon()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("CORDON_DATA_DIR", dir.0.join("data"))
        .env("CORDON_LOG", "info")
        .env_remove("CORDON_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let ca = dir.0.join("data").join("ca.pem");
    let url = format!("https://localhost:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let served = loop {
        if ca.exists()
            && let Ok(mut http) =
                agent::HttpsClient::new(agent::https::tls_config(&ca).unwrap(), &url)
            && let Ok(reply) = http
                .request(http::Method::GET, "/api/machines", &[], Vec::new())
                .await
        {
            assert_eq!(reply.status, 401);
            let text = std::fs::read_to_string(&log).unwrap();
            if let Some(line) = text.lines().find(|l| l.contains("served")) {
                break line.to_owned();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(served.contains("cordon::request"), "{served}");
    assert!(!served.contains("server::error"), "{served}");
    assert!(served.contains("status=401"), "{served}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_work_beside_a_running_server() {
    let dir = TempDir::new("cli");
    let data = dir.0.to_str().unwrap().to_owned();
    let served = serve(&dir.0);
    let ca = dir.0.join("ca.pem");

    let app = run_json(&[
        "app",
        "create",
        "--data-dir",
        &data,
        "--name",
        "Playbook",
        "--permission",
        "Machine.Isolate",
        "--permission",
        "Machine.Read.All",
        "--json",
    ]);
    let secret = app["clientSecret"].as_str().unwrap();
    assert!(!secret.starts_with('-'));
    assert!(app["tenantId"].as_str().unwrap().len() == 36);
    // Only a hash of the secret is stored.
    let db = std::fs::read(dir.0.join("cordon.db")).unwrap();
    let wal = std::fs::read(dir.0.join("cordon.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "secret stored in clear"
        );
    }
    let list = run_json(&["app", "list", "--data-dir", &data, "--json"]);
    assert_eq!(list[0]["clientId"], app["clientId"]);
    assert_eq!(
        list[0]["permissions"],
        serde_json::json!(["Machine.Isolate", "Machine.Read.All"])
    );
    let bad = cordon()
        .args([
            "app",
            "create",
            "--data-dir",
            &data,
            "--name",
            "x",
            "--permission",
            "Machine.Everything",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    let token = app_token(&served.url, &ca, &app).await;
    let enroll = run_json(&[
        "enroll-token",
        "create",
        "--data-dir",
        &data,
        "--expires-in",
        "24h",
        "--max-uses",
        "2",
        "--json",
    ]);
    let enroll_token = enroll["token"].as_str().unwrap();
    assert!(!enroll_token.starts_with('-'));
    for name in ["a1", "a2"] {
        let state = TempDir::new("agent");
        agent::enroll(&served.url, enroll_token, &ca, &state.0, Some(name))
            .await
            .unwrap();
    }
    let state = TempDir::new("agent");
    let err = agent::enroll(&served.url, enroll_token, &ca, &state.0, Some("a3"))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("used up"), "{err}");
    let machines = run_json(&["machine", "list", "--data-dir", &data, "--json"]);
    assert_eq!(machines.as_array().unwrap().len(), 2);

    let mut api = Api {
        http: agent::HttpsClient::new(agent::https::tls_config(&ca).unwrap(), &served.url).unwrap(),
        token,
    };
    assert_eq!(api.get("/api/machines").await.status, 200);
    let output = cordon()
        .args([
            "app",
            "delete",
            "--data-dir",
            &data,
            app["clientId"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_error(&api.get("/api/machines").await, 401, "Unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_actions_survive_a_sigkill() {
    let dir = TempDir::new("durable");
    let data = dir.0.to_str().unwrap().to_owned();
    let ca = dir.0.join("ca.pem");
    let served = serve(&dir.0);
    let app = run_json(&[
        "app",
        "create",
        "--data-dir",
        &data,
        "--name",
        "Playbook",
        "--permission",
        "Machine.Isolate",
        "--permission",
        "Machine.Read.All",
        "--json",
    ]);
    let enroll = run_json(&[
        "enroll-token",
        "create",
        "--data-dir",
        &data,
        "--max-uses",
        "40",
        "--json",
    ]);
    let mut machines = Vec::new();
    let mut states = Vec::new();
    for i in 0..40 {
        let state = TempDir::new("agent");
        let identity = agent::enroll(
            &served.url,
            enroll["token"].as_str().unwrap(),
            &ca,
            &state.0,
            Some(&format!("d{i}")),
        )
        .await
        .unwrap();
        machines.push(identity.machine_id);
        states.push(state);
    }
    let token = app_token(&served.url, &ca, &app).await;

    // A burst of isolate requests; the server dies the moment the last 201 arrives.
    let mut tasks = Vec::new();
    for machine in machines.clone() {
        let mut api = Api {
            http: agent::HttpsClient::new(agent::https::tls_config(&ca).unwrap(), &served.url)
                .unwrap(),
            token: token.clone(),
        };
        tasks.push(tokio::spawn(async move { api.isolate(&machine).await }));
    }
    let mut acknowledged = Vec::new();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 201, "{:?}", reply.body);
        acknowledged.push(reply.json().unwrap()["id"].as_str().unwrap().to_owned());
    }
    let port: u16 = served.url.rsplit(':').next().unwrap().parse().unwrap();
    let pid = served.child.id();
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    drop(served);

    // Same address, so the tokens' issuer is the same.
    let served = serve_on(&dir.0, port);
    let mut api = Api {
        http: agent::HttpsClient::new(agent::https::tls_config(&ca).unwrap(), &served.url).unwrap(),
        token: token.clone(),
    };
    for id in &acknowledged {
        let action = api.action(id).await;
        assert_eq!(action["status"], "Pending", "{action}");
    }
    let list = api
        .get("/api/machineactions?$count=true")
        .await
        .json()
        .unwrap();
    assert_eq!(list["@odata.count"], 40);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

fn run_fails(args: &[&str]) -> String {
    let output = cordon().args(args).output().unwrap();
    assert!(!output.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The next message of a session, which must be the exclusion rules, within 2 s.
async fn next_exclusions(session: &mut agent::Session) -> (i64, Vec<proto::agent::ExclusionSpec>) {
    let message = tokio::time::timeout(Duration::from_secs(2), session.recv())
        .await
        .expect("exclusion rules within 2 s")
        .expect("session open");
    exclusions_of(message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusion_commands_reach_connected_agents() {
    let dir = TempDir::new("exclusion-cli");
    let data = dir.0.to_str().unwrap().to_owned();
    let served = serve(&dir.0);
    let ca = dir.0.join("ca.pem");
    let enroll = run_json(&["enroll-token", "create", "--data-dir", &data, "--json"]);
    let state = TempDir::new("agent");
    let identity = agent::enroll(
        &served.url,
        enroll["token"].as_str().unwrap(),
        &ca,
        &state.0,
        Some("e1"),
    )
    .await
    .unwrap();
    let mut session = agent::Session::open(
        &identity,
        agent::host_facts(Some("e1")),
        proto::agent::Enforced::NotIsolated,
    )
    .await
    .unwrap();
    assert_eq!(next_exclusions(&mut session).await, (0, vec![]));

    // Added in another process: the server notices and pushes within 2 s.
    let rule = run_json(&[
        "exclusion",
        "add",
        "--data-dir",
        &data,
        "--name",
        "Monitoring",
        "--description",
        "Prometheus scrapes",
        "--direction",
        "inbound",
        "--remote-address",
        "198.18.0.0/24,fd00::1",
        "--remote-address",
        "10.9.8.7",
        "--remote-port",
        "9100",
        "--remote-port",
        "9200-9300",
        "--json",
    ]);
    assert_eq!(rule["name"], "Monitoring");
    assert_eq!(rule["direction"], "Inbound");
    assert_eq!(
        rule["remoteAddresses"],
        serde_json::json!(["198.18.0.0/24", "fd00::1/128", "10.9.8.7/32"])
    );
    assert_eq!(
        rule["remotePorts"],
        serde_json::json!(["9100", "9200-9300"])
    );
    assert_eq!(rule["version"], 1);
    let (version, rules) = next_exclusions(&mut session).await;
    assert_eq!(version, 1);
    assert_eq!(rules[0].id, rule["id"].as_str().unwrap());
    assert_eq!(rules[0].remote_addresses.len(), 3);

    // The API's own checks and messages.
    for (args, says) in [
        (
            vec!["--name", "monitoring", "--remote-port", "22"],
            "already exists",
        ),
        (
            vec!["--name", "x", "--executable", "bin/sh"],
            "absolute path",
        ),
        (
            vec!["--name", "x", "--remote-address", "10.0.0.0/40"],
            "10.0.0.0/40",
        ),
        (
            vec!["--name", "x", "--remote-port", "0"],
            "RemotePorts: '0'",
        ),
        (
            vec!["--name", "x", "--direction", "Inbound"],
            "at least one condition",
        ),
        (vec!["--name", "x", "--unit", "sshd"], "SystemdUnit"),
    ] {
        let mut full = vec!["exclusion", "add", "--data-dir", &data];
        full.extend(args);
        let stderr = run_fails(&full);
        assert!(stderr.contains(says), "{full:?}: {stderr}");
    }

    run_json(&[
        "exclusion",
        "add",
        "--data-dir",
        &data,
        "--name",
        "Backups",
        "--executable",
        "/usr/bin/restic",
        "--json",
    ]);
    assert_eq!(next_exclusions(&mut session).await.0, 2);
    let list = run_json(&["exclusion", "list", "--data-dir", &data, "--json"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Monitoring", "Backups"]);
    let text = cordon()
        .args(["exclusion", "list", "--data-dir", &data])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("Monitoring") && text.contains("/usr/bin/restic"),
        "{text}"
    );

    // Removed by name (any case) and by id.
    let removed = cordon()
        .args(["exclusion", "remove", "--data-dir", &data, "MONITORING"])
        .output()
        .unwrap();
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    let (version, rules) = next_exclusions(&mut session).await;
    assert_eq!((version, rules.len()), (3, 1));
    let backups = list[1]["id"].as_str().unwrap();
    let removed = cordon()
        .args(["exclusion", "remove", "--data-dir", &data, backups])
        .output()
        .unwrap();
    assert!(removed.status.success());
    assert_eq!(next_exclusions(&mut session).await, (4, vec![]));
    let stderr = run_fails(&["exclusion", "remove", "--data-dir", &data, "Backups"]);
    assert!(stderr.contains("no exclusion rule"), "{stderr}");
}

/// The mode bits of `path`.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `cordon.db` holds the token-signing key: with a 0755 directory and 0644
/// files any local user could read it and mint tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_and_its_files_are_private() {
    let parent = TempDir::new("modes");
    let fresh = parent.0.join("fresh");
    let served = serve(&fresh);
    let data = fresh.to_str().unwrap().to_owned();
    run_json(&["app", "list", "--data-dir", &data, "--json"]);
    assert_eq!(mode(&fresh), 0o700);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&fresh).unwrap() {
        let entry = entry.unwrap();
        names.push(entry.file_name().to_string_lossy().into_owned());
        assert_eq!(mode(&entry.path()), 0o600, "{:?}", entry.path());
    }
    for expected in [
        "cordon.db",
        "cordon.db-wal",
        "ca.pem",
        "ca-key.pem",
        "server-key.pem",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    drop(served);

    // Found looser (an older version, a restored backup): fixed at start.
    use std::os::unix::fs::PermissionsExt;
    let loose = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    loose(&fresh, 0o755);
    loose(&fresh.join("cordon.db"), 0o644);
    loose(&fresh.join("ca-key.pem"), 0o644);
    let _served = serve(&fresh);
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&fresh.join("cordon.db")), 0o600);
    assert_eq!(mode(&fresh.join("ca-key.pem")), 0o600);
}

/// Admin commands run from the wrong folder once made a new, empty tenant
/// and exited 0.
#[test]
fn admin_commands_never_create_a_data_directory() {
    let parent = TempDir::new("no-implicit");
    let missing = parent.0.join("typo");
    let missing_text = missing.to_str().unwrap().to_owned();
    let stderr = run_fails(&["app", "list", "--data-dir", &missing_text]);
    assert!(stderr.contains(&missing_text), "{stderr}");
    assert!(stderr.contains("cordon serve --data-dir"), "{stderr}");
    assert!(!missing.exists(), "the command created {missing:?}");

    // A directory that is not Cordon's (no database): refused, left alone.
    let stderr = run_fails(&[
        "enroll-token",
        "create",
        "--data-dir",
        &parent.0.to_string_lossy(),
    ]);
    assert!(stderr.contains("no cordon.db"), "{stderr}");
    assert!(!parent.0.join("cordon.db").exists());

    // --init creates it; every command says which directory and tenant it used.
    let output = cordon()
        .args([
            "app",
            "list",
            "--init",
            "--json",
            "--data-dir",
            &missing_text,
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        serde_json::from_slice::<Value>(&output.stdout).unwrap(),
        serde_json::json!([])
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with(&format!("data directory: {missing_text}, tenant: ")),
        "{stderr}"
    );
    assert_eq!(mode(&missing), 0o700);
    assert_eq!(mode(&missing.join("cordon.db")), 0o600);
    let again = cordon()
        .args(["app", "list", "--data-dir", &missing_text])
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(String::from_utf8_lossy(&again.stderr), stderr);
}

/// A second `cordon serve` on a data directory another one serves.
#[test]
fn a_second_server_on_the_same_data_directory_is_refused() {
    let dir = TempDir::new("locked");
    let served = serve(&dir.0);
    let output = cordon()
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .env("CORDON_DATA_DIR", &dir.0)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already serving"), "{stderr}");
    assert!(stderr.contains(&dir.0.display().to_string()), "{stderr}");
    assert!(
        stderr.contains(&format!("PID {}", served.child.id())),
        "{stderr}"
    );
    // Admin commands still work beside it.
    run_json(&[
        "app",
        "list",
        "--data-dir",
        &dir.0.to_string_lossy(),
        "--json",
    ]);
    drop(served);
    let _served = serve(&dir.0);
}

/// Tokens once defaulted to unlimited uses and no expiry, `--expires-in 24`
/// meant 24 seconds, and nothing could withdraw one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_tokens_default_to_one_use_and_a_day_and_can_be_revoked() {
    let dir = TempDir::new("enroll-tokens");
    let data = dir.0.to_str().unwrap().to_owned();
    let served = serve(&dir.0);
    let ca = dir.0.join("ca.pem");

    let stderr = run_fails(&[
        "enroll-token",
        "create",
        "--data-dir",
        &data,
        "--expires-in",
        "24",
    ]);
    assert!(
        stderr.contains("no unit") && stderr.contains("24h"),
        "{stderr}"
    );
    let stderr = run_fails(&[
        "enroll-token",
        "create",
        "--data-dir",
        &data,
        "--expires-in",
        "0s",
    ]);
    assert!(stderr.contains("zero"), "{stderr}");
    let stderr = run_fails(&[
        "enroll-token",
        "create",
        "--data-dir",
        &data,
        "--max-uses",
        "0",
    ]);
    assert!(stderr.contains("--max-uses"), "{stderr}");
    // A typo in another duration flag is caught the same way.
    let stderr = run_fails(&["serve", "--data-dir", &data, "--apply-deadline", "600"]);
    assert!(stderr.contains("no unit"), "{stderr}");

    let created = run_json(&["enroll-token", "create", "--data-dir", &data, "--json"]);
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["maxUses"], 1);
    let expires = proto::time::parse_utc(created["expires"].as_str().unwrap()).unwrap();
    let in_a_day = server::now_nanos() + 24 * 3600 * 1_000_000_000;
    assert!((expires - in_a_day).abs() < 60 * 1_000_000_000, "{created}");

    let listed = run_json(&["enroll-token", "list", "--data-dir", &data, "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["status"], "Active");
    assert_eq!(listed[0]["usesLeft"], 1);
    let text = serde_json::to_string(&listed).unwrap();
    assert!(!text.contains(created["token"].as_str().unwrap()), "{text}");

    let token = created["token"].as_str().unwrap();
    let state = TempDir::new("agent");
    agent::enroll(&served.url, token, &ca, &state.0, Some("t1"))
        .await
        .unwrap();
    let state = TempDir::new("agent");
    let err = agent::enroll(&served.url, token, &ca, &state.0, Some("t2"))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("used up"), "{err}");
    let listed = run_json(&["enroll-token", "list", "--data-dir", &data, "--json"]);
    assert_eq!(listed[0]["status"], "UsedUp");
    assert_eq!(listed[0]["usesLeft"], 0);

    // Revoked: refused at once, by the server that is running.
    let second = run_json(&[
        "enroll-token",
        "create",
        "--data-dir",
        &data,
        "--max-uses",
        "5",
        "--expires-in",
        "7d",
        "--json",
    ]);
    let second_id = second["id"].as_str().unwrap();
    let output = cordon()
        .args(["enroll-token", "revoke", "--data-dir", &data, second_id])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains(second_id));
    let state = TempDir::new("agent");
    let err = agent::enroll(
        &served.url,
        second["token"].as_str().unwrap(),
        &ca,
        &state.0,
        None,
    )
    .await
    .err()
    .unwrap();
    assert!(err.to_string().contains("revoked"), "{err}");
    let listed = run_json(&["enroll-token", "list", "--data-dir", &data, "--json"]);
    assert_eq!(listed[1]["status"], "Revoked");
    assert_eq!(listed[1]["usesLeft"], 0);
    assert!(listed[1]["revoked"].is_string());
    let text = cordon()
        .args(["enroll-token", "list", "--data-dir", &data])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&id) && text.contains("Revoked"), "{text}");

    let stderr = run_fails(&["enroll-token", "revoke", "--data-dir", &data, "no-such-id"]);
    assert!(
        stderr.contains("no enroll token has id 'no-such-id'"),
        "{stderr}"
    );
}

/// The connection caps and the client-authentication throttle are set by
/// flags, each with its environment variable, and bad values are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flags_reach_the_server() {
    let output = cordon().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for var in [
        "CORDON_CLIENT_FAILURES_PER_CLIENT",
        "CORDON_CLIENT_FAILURES_PER_SOURCE",
        "CORDON_MAX_AGENT_CONNECTIONS",
        "CORDON_MAX_API_CONNECTIONS",
        "CORDON_MAX_HANDSHAKES",
        "CORDON_MAX_CONNECTIONS_PER_SOURCE",
        "CORDON_CONNECTION_IDLE_TIMEOUT",
        "CORDON_CONNECTION_MAX_LIFETIME",
        "CORDON_MAX_TLS_HANDSHAKES_IN_PROGRESS",
        "CORDON_MAX_SESSION_SETUPS_IN_PROGRESS",
        "CORDON_MAX_ENROLLMENTS_IN_PROGRESS",
        "CORDON_ADMISSION_QUEUE_TIMEOUT",
        "CORDON_ADMISSION_MAX_RETRY_AFTER",
        "CORDON_MAX_EVENT_STREAMS",
        "CORDON_MAX_EVENT_STREAMS_PER_CALLER",
    ] {
        assert!(help.contains(var), "{var} missing from:\n{help}");
    }
    let unused = std::env::temp_dir().join("cordon-unused");
    for (args, env, says) in [
        (
            vec!["--max-api-connections", "0"],
            None,
            "--max-api-connections must be at least 1",
        ),
        (
            vec![],
            Some(("CORDON_CONNECTION_IDLE_TIMEOUT", "0s")),
            "--connection-idle-timeout",
        ),
        (
            vec!["--connection-max-lifetime", "99d"],
            None,
            "--connection-max-lifetime",
        ),
        (vec!["--max-handshakes", "many"], None, "invalid value"),
        (
            vec![],
            Some(("CORDON_MAX_EVENT_STREAMS_PER_CALLER", "0")),
            "--max-event-streams-per-caller must be at least 1",
        ),
        (
            vec!["--max-session-setups-in-progress", "0"],
            None,
            "invalid value '0' for '--max-session-setups-in-progress",
        ),
        (
            vec![],
            Some(("CORDON_MAX_TLS_HANDSHAKES_IN_PROGRESS", "100001")),
            "invalid value '100001'",
        ),
        (
            vec![],
            Some(("CORDON_ADMISSION_QUEUE_TIMEOUT", "31s")),
            "--admission-queue-timeout must be between 10ms and 30s",
        ),
        (
            vec!["--admission-max-retry-after", "10m"],
            None,
            "--admission-max-retry-after must be between 1s and 5m",
        ),
    ] {
        let mut command = cordon();
        command
            .arg("serve")
            .args(&args)
            .env("CORDON_DATA_DIR", &unused);
        if let Some((name, value)) = env {
            command.env(name, value);
        }
        let output = command.output().unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }

    let dir = TempDir::new("cli-caps");
    let port = free_port();
    let served = serve_with(
        &dir.0,
        port,
        &[
            "--max-connections-per-source",
            "2",
            "--max-tls-handshakes-in-progress",
            "4",
            "--max-session-setups-in-progress",
            "8",
            "--max-enrollments-in-progress",
            "2",
            "--admission-queue-timeout",
            "2s",
            "--admission-max-retry-after",
            "10s",
        ],
    );
    let ca = dir.0.join("ca.pem");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut http =
            agent::HttpsClient::new(agent::https::tls_config(&ca).unwrap(), &served.url).unwrap();
        let reply = http
            .request(http::Method::GET, "/agent/v1/health", &[], Vec::new())
            .await
            .unwrap();
        assert!(reply.status.is_success(), "{:?}", reply.status);
        held.push(http);
    }
    let mut third =
        agent::HttpsClient::new(agent::https::tls_config(&ca).unwrap(), &served.url).unwrap();
    assert!(
        third
            .request(http::Method::GET, "/agent/v1/health", &[], Vec::new())
            .await
            .is_err(),
        "a third connection from the same address was served"
    );
    drop(held);
}

/// Durations that parse but make no sense for a server are refused with the
/// range that works (a retention of 1ms would empty the audit trail every
/// hour).
#[test]
fn nonsense_durations_are_refused_with_their_range() {
    let dir = TempDir::new("ranges");
    let data = dir.0.join("data");
    let data = data.to_str().unwrap();
    for (flag, value, says) in [
        ("--audit-retention", "1ms", "between 1h and 100 years"),
        ("--heartbeat-interval", "1000d", "between 1s and 1h"),
        ("--connection-max-lifetime", "1ms", "between 1s and 30d"),
        ("--action-expiry", "999d", "between 1s and 365d"),
        ("--event-retention", "0s", "is zero"),
        ("--event-retention", "30s", "between 1m and 365d"),
    ] {
        let stderr = run_fails(&["serve", "--data-dir", data, flag, value]);
        assert!(
            stderr.contains(flag) && stderr.contains(says),
            "{flag} {value}: {stderr}"
        );
    }
    assert!(
        !dir.0.join("data").exists(),
        "a refused serve created its data directory"
    );
    // A unit is required.
    let stderr = run_fails(&["serve", "--data-dir", data, "--event-retention", "24"]);
    assert!(stderr.contains("has no unit"), "{stderr}");
    let stderr = run_fails(&["audit", "prune", "--data-dir", data, "--before", "0d"]);
    assert!(stderr.contains("is zero"), "{stderr}");
}

/// `rm cordon-data/*.pem` once made `cordon serve` create a new CA without a
/// word, so every enrolled agent lost the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ca_with_enrolled_machines_is_refused_unless_new_ca() {
    let dir = TempDir::new("lost-ca");
    let data = dir.0.to_str().unwrap().to_owned();
    let ca = dir.0.join("ca.pem");
    let served = serve(&dir.0);
    let enroll = run_json(&["enroll-token", "create", "--data-dir", &data, "--json"]);
    let state = TempDir::new("agent");
    agent::enroll(
        &served.url,
        enroll["token"].as_str().unwrap(),
        &ca,
        &state.0,
        Some("lost1"),
    )
    .await
    .unwrap();
    drop(served);
    let old_ca = std::fs::read(&ca).unwrap();
    for name in ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"] {
        std::fs::remove_file(dir.0.join(name)).unwrap();
    }

    let mut child = cordon()
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .env("CORDON_DATA_DIR", &dir.0)
        .env_remove("CORDON_NEW_CA")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cordon serve started without its CA");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for needle in [
        "no CA",
        "1 enrolled machine",
        "ca-key.pem",
        "backup",
        "--new-ca",
    ] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    assert!(!ca.exists(), "a CA was made: {stderr}");

    // The explicit override makes a new CA (the old agents are lost).
    let port = free_port();
    let _served = serve_with(&dir.0, port, &["--new-ca"]);
    assert_ne!(std::fs::read(&ca).unwrap(), old_ca);
}

/// `cordon app create --name "$(printf 'a\033[31mred\nnewline')"` once
/// succeeded: the name then reached `app list`, the audit log's principal and
/// the token's `app_displayname` raw, escapes and all. Users, roles and
/// groups refused control characters but took bidirectional overrides.
#[test]
fn names_with_control_or_format_characters_are_refused() {
    let dir = TempDir::new("unsafe-names");
    let data = dir.0.to_str().unwrap().to_owned();
    let bad_names = [
        "a\u{1b}[31mred\nnewline",
        "tab\there",
        "c1\u{9b}31m",
        "admin\u{202E}gpj.exe",
        "isolate\u{2066}x\u{2069}",
        "zero\u{200B}width",
        "\u{FEFF}bom",
        "line\u{2028}sep",
    ];
    for name in bad_names {
        let stderr = run_fails(&[
            "app",
            "create",
            "--data-dir",
            &data,
            "--init",
            "--name",
            name,
            "--permission",
            "Machine.Isolate",
        ]);
        assert!(
            stderr.contains("--name must not contain control"),
            "{name:?}: {stderr}"
        );
        for args in [
            vec!["user", "create", "--name", name, "--role", "Viewer"],
            vec![
                "role",
                "create",
                "--name",
                name,
                "--permission",
                "View data",
            ],
            vec!["group", "create", "--name", name, "--rank", "1"],
        ] {
            let mut full = args.clone();
            full.extend(["--data-dir", &data]);
            let stderr = run_fails(&full);
            assert!(
                stderr.contains("must not contain control characters"),
                "{full:?}: {stderr}"
            );
        }
    }
    let apps = run_json(&["app", "list", "--data-dir", &data, "--init", "--json"]);
    assert_eq!(apps.as_array().map(Vec::len), Some(0), "{apps}");
    // Letters of any script, accents and emoji are fine.
    run_json(&[
        "app",
        "create",
        "--data-dir",
        &data,
        "--name",
        "Zoë's playbook 東京 🛡️",
        "--permission",
        "Machine.Isolate",
        "--json",
    ]);
}
