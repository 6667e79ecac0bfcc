//! Health endpoints, the metrics listener and the logs, over real HTTP:
//! what a load balancer, Prometheus and a log collector see.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use http::Method;
use proto::agent::Enforced;
use server::monitoring::MetricsListen;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server whose metrics listener is on a free loopback port.
async fn with_metrics() -> (TestServer, SocketAddr) {
    let server = TestServer::start_with(|c| {
        c.metrics_listen = MetricsListen::Given("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let address = server.server.metrics_addr.expect("metrics are served");
    (server, address)
}

/// One plain HTTP/1.1 request; the status and the body.
async fn plain_http(address: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {answer}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The scraped samples: `name{labels}` as exposed, to its value.
struct Scrape {
    text: String,
    samples: HashMap<String, f64>,
}

impl Scrape {
    /// The sample's value; a series not exposed yet counts 0.
    fn value(&self, series: &str) -> f64 {
        self.samples.get(series).copied().unwrap_or(0.0)
    }
}

async fn scrape(address: SocketAddr) -> Scrape {
    let (status, text) = plain_http(address, "GET", "/metrics").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample line");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect();
    Scrape { text, samples }
}

/// Scrapes until `series` has `value` (at most 10 s).
async fn wait_for(address: SocketAddr, series: &str, value: f64) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let scraped = scrape(address).await;
        if scraped.value(series) == value {
            return scraped;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is not {value}:\n{}",
            scraped.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The action state change lines logged in this test binary (target
/// `cordon::action`), as JSON objects.
fn action_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter(tracing_subscriber::EnvFilter::new("cordon::action=info"))
            .with_writer(move || SharedWriter(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        log
    })
    .clone()
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged_changes_of(log: &Mutex<Vec<u8>>, action_id: &str) -> Vec<serde_json::Value> {
    let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|l| l["action_id"] == action_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_answer_without_a_token_and_are_not_audited() {
    let server = TestServer::start().await;
    let mut http = server.https();
    for (path, body) in [("/healthz", "ok\n"), ("/readyz", "ready\n")] {
        let reply = http
            .request(Method::GET, path, &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(&reply.body[..], body.as_bytes(), "{path}");
        assert_eq!(reply.header("cache-control"), Some("no-store"), "{path}");
        assert!(reply.header("request-id").is_some(), "{path}");
    }
    let audit = server
        .store()
        .list_audit(store::Query::default())
        .await
        .unwrap();
    assert!(
        audit
            .items
            .iter()
            .all(|r| !r.event.target.ends_with("/healthz") && !r.event.target.ends_with("/readyz")),
        "health checks are not audited: {:?}",
        audit.items
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_store_cannot_be_read() {
    let server = TestServer::start().await;
    let mut http = server.https();
    let database = server.dir.0.join(server::DATABASE_FILE);
    // The database is broken under the server (by another process): the
    // table every readiness check reads is gone.
    let conn = rusqlite::Connection::open(&database).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch("ALTER TABLE meta RENAME TO meta_moved")
        .unwrap();
    // A result from before may be reused for a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = std::time::Instant::now();
    let reply = http
        .request(Method::GET, "/readyz", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(reply.status, 503, "{:?}", reply.body);
    assert!(
        String::from_utf8_lossy(&reply.body).contains("store does not answer"),
        "{:?}",
        reply.body
    );
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the check answers within its timeout"
    );
    // The process itself is up.
    let reply = http
        .request(Method::GET, "/healthz", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    // Repaired: ready again.
    conn.execute_batch("ALTER TABLE meta_moved RENAME TO meta")
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let reply = http
            .request(Method::GET, "/readyz", &[], Vec::new())
            .await
            .unwrap();
        if reply.status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {} once the store answers again",
            reply.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_sessions_actions_and_requests() {
    let log = action_log();
    let (server, address) = with_metrics().await;
    let first = scrape(address).await;
    assert_eq!(first.value("cordon_agent_sessions"), 0.0, "{}", first.text);
    let version = format!(
        "cordon_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(first.value(&version), 1.0, "{}", first.text);

    let agent = server.enroll("metrics-1").await;
    let machine_id = agent.machine_id();
    let mut session = agent.connect().await;
    wait_for(address, "cordon_agent_sessions", 1.0).await;

    let succeeded = "cordon_action_completion_seconds_count{type=\"Isolate\",status=\"Succeeded\"}";
    let before = scrape(address).await.value(succeeded);
    let mut api = server.api().await;
    let action_id = api.isolate_action(&machine_id).await;
    let pending = scrape(address).await;
    assert_eq!(
        pending.value("cordon_machine_actions{type=\"Isolate\",status=\"Pending\"}"),
        1.0,
        "{}",
        pending.text
    );
    let pushed = next(&mut session).await;
    assert_eq!(action_id_of(&pushed), action_id);
    execute(&mut session, &action_id, true, Enforced::Full).await;
    api.wait_status(&action_id, "Succeeded").await;

    let done = scrape(address).await;
    assert_eq!(done.value(succeeded), before + 1.0, "{}", done.text);
    for (status, count) in [("Pending", 0.0), ("InProgress", 0.0), ("Succeeded", 1.0)] {
        let series = format!("cordon_machine_actions{{type=\"Isolate\",status=\"{status}\"}}");
        assert_eq!(done.value(&series), count, "{series}:\n{}", done.text);
    }
    let isolated = "cordon_http_requests_total{method=\"POST\",route=\"/api/machines/{id}/isolate\",status=\"201\"}";
    assert_eq!(done.value(isolated), 1.0, "{}", done.text);
    assert!(
        done.value(
            "cordon_http_request_duration_seconds_count{route=\"/api/machineactions/{id}\"}"
        ) >= 1.0,
        "{}",
        done.text
    );
    assert!(
        done.value("cordon_store_commit_seconds_count") >= 1.0,
        "{}",
        done.text
    );
    assert!(
        !done.text.contains(&machine_id) && !done.text.contains(&action_id),
        "no label holds an id:\n{}",
        done.text
    );

    // A path that matches no route is counted under one label.
    let reply = api.get(&format!("/api/nothing/{machine_id}")).await;
    assert_eq!(reply.status, 404);
    let unmatched = scrape(address).await;
    assert!(
        unmatched
            .value("cordon_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"}")
            >= 1.0,
        "{}",
        unmatched.text
    );
    assert!(
        !unmatched.text.contains("/api/nothing"),
        "{}",
        unmatched.text
    );

    // The agent leaves.
    drop(session);
    wait_for(address, "cordon_agent_sessions", 0.0).await;

    // A cancelled action counts as one too, under its own status.
    let cancelled =
        "cordon_action_completion_seconds_count{type=\"Unisolate\",status=\"Cancelled\"}";
    let reply = api.unisolate(&machine_id).await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    let release_id = reply.json().unwrap()["id"].as_str().unwrap().to_owned();
    let reply = api
        .post(
            &format!("/api/machineactions/{release_id}/cancel"),
            serde_json::json!({"Comment": "not yet"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let after = scrape(address).await;
    assert_eq!(after.value(cancelled), 1.0, "{}", after.text);
    assert_eq!(
        after.value("cordon_machine_actions{type=\"Unisolate\",status=\"Cancelled\"}"),
        1.0,
        "{}",
        after.text
    );
    assert_eq!(
        after.value("cordon_machine_actions{type=\"Unisolate\",status=\"Pending\"}"),
        0.0,
        "{}",
        after.text
    );

    // One log line for each change, with what a reader needs.
    let lines = logged_changes_of(&log, &action_id);
    let steps: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["from"].as_str().unwrap_or("").to_owned(),
                l["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("".to_owned(), "Pending".to_owned()),
            ("Pending".to_owned(), "InProgress".to_owned()),
            ("InProgress".to_owned(), "Succeeded".to_owned()),
        ],
        "{lines:?}"
    );
    for line in &lines {
        assert_eq!(line["machine_id"], machine_id.as_str(), "{line}");
        assert_eq!(line["action_type"], "Isolate", "{line}");
        assert_eq!(line["requestor"], "Test SOAR", "{line}");
    }
    let cancel_lines = logged_changes_of(&log, &release_id);
    let last = cancel_lines.last().expect("the cancellation is logged");
    assert_eq!(last["to"], "Cancelled", "{cancel_lines:?}");
    assert_eq!(last["changed_by"], "Test SOAR", "{cancel_lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_in_the_store_at_start_are_counted() {
    let (server, _) = with_metrics().await;
    let agent = server.enroll("counted-1").await;
    let mut api = server.api().await;
    api.isolate_action(&agent.machine_id()).await;
    // A new server on the same data directory counts it once at start.
    let dir = server.dir.0.clone();
    let TestServer {
        server: running,
        dir: kept,
        ..
    } = server;
    drop(running);
    let mut config = test_config(&dir);
    config.metrics_listen = MetricsListen::Given("127.0.0.1:0".parse().unwrap());
    let again = server::start(config).await.expect("starts again");
    let scraped = scrape(again.metrics_addr.unwrap()).await;
    assert_eq!(
        scraped.value("cordon_machine_actions{type=\"Isolate\",status=\"Pending\"}"),
        1.0,
        "{}",
        scraped.text
    );
    drop(again);
    drop(kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_serves_only_get_metrics() {
    let (_server, address) = with_metrics().await;
    assert_eq!(plain_http(address, "GET", "/").await.0, 404);
    assert_eq!(plain_http(address, "GET", "/metricsx").await.0, 404);
    assert_eq!(plain_http(address, "GET", "/api/machines").await.0, 404);
    assert_eq!(plain_http(address, "POST", "/metrics").await.0, 405);
    let (status, body) = plain_http(address, "GET", "/metrics?name=x").await;
    assert_eq!(status, 200);
    assert!(body.contains("cordon_agent_sessions"), "{body}");
}

/// A store that can be read but not written (another process holds its
/// write lock, as a writer stuck on its disk would) is not ready either:
/// isolations are writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_store_cannot_be_written() {
    let server = TestServer::start().await;
    let mut http = server.https();
    let ready = |reply: &agent::Reply| {
        (
            reply.status.as_u16(),
            String::from_utf8_lossy(&reply.body).into_owned(),
        )
    };
    let reply = http
        .request(Method::GET, "/readyz", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(ready(&reply).0, 200);
    let database = server.dir.0.join(server::DATABASE_FILE);
    let conn = rusqlite::Connection::open(&database).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = http
        .request(Method::GET, "/readyz", &[], Vec::new())
        .await
        .unwrap();
    let (status, body) = ready(&reply);
    assert_eq!(status, 503, "{body}");
    // Reads still work meanwhile.
    let reply = http
        .request(Method::GET, "/healthz", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    conn.execute_batch("COMMIT").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let reply = http
            .request(Method::GET, "/readyz", &[], Vec::new())
            .await
            .unwrap();
        if reply.status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "ready again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whoever holds the listener's 8 connections can't keep them: each
/// serves one request, and one that sends nothing is closed within
/// seconds, so a scrape waiting behind them gets its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_connections_are_short_and_cannot_be_held() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_server, address) = with_metrics().await;
    // One request a connection: the server closes it after its answer.
    let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("closed after one answer")
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    // Eight idle connections take every place; a scrape still gets in.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    let (status, _) = tokio::time::timeout(
        Duration::from_secs(8),
        plain_http(address, "GET", "/metrics"),
    )
    .await
    .expect("the scrape got a place within seconds");
    assert_eq!(status, 200);
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_port_does_not_serve_metrics() {
    let (server, _) = with_metrics().await;
    let mut http = server.https();
    let reply = http
        .request(Method::GET, "/metrics", &[], Vec::new())
        .await
        .unwrap();
    assert_error(&reply, 404, "ResourceNotFound");
    let mut api = server.api().await;
    let reply = api.get("/metrics").await;
    assert_error(&reply, 404, "ResourceNotFound");
    assert!(!String::from_utf8_lossy(&reply.body).contains("cordon_"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_off_binds_nothing_and_a_taken_address_is_handled() {
    // Off: nothing served.
    let off = TestServer::start().await;
    assert_eq!(off.server.metrics_addr, None);

    // A free default address is served.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free_addr = free.local_addr().unwrap();
    drop(free);
    let served =
        TestServer::start_with(|c| c.metrics_listen = MetricsListen::Default(free_addr)).await;
    assert_eq!(served.server.metrics_addr, Some(free_addr));

    // The default address taken (another server on this host): the server
    // runs without metrics.
    let skipped =
        TestServer::start_with(|c| c.metrics_listen = MetricsListen::Default(free_addr)).await;
    assert_eq!(skipped.server.metrics_addr, None);
    let reply = skipped
        .https()
        .request(Method::GET, "/healthz", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(reply.status, 200);

    // The address given explicitly and taken: the server does not start.
    let dir = TempDir::new("metrics-taken");
    let mut config = test_config(&dir.0);
    config.metrics_listen = MetricsListen::Given(free_addr);
    let error = match server::start(config).await {
        Ok(_) => panic!("started although {free_addr} is taken"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains(&format!("cannot serve metrics on {free_addr}"))
            && error.contains("--metrics-listen"),
        "{error}"
    );
}

/// `cordon serve` with `extra` arguments, its standard error in `log`;
/// returns the process and the API port once it serves.
fn serve_binary(
    data_dir: &std::path::Path,
    log: &std::path::Path,
    extra: &[&str],
) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cordon"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("CORDON_DATA_DIR", data_dir)
        .env("CORDON_LOG", "info")
        .env_remove("CORDON_LOG_FORMAT")
        .env_remove("CORDON_METRICS_LISTEN")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut printed = String::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("CA file:") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (child, printed)
}

/// A log pipe nobody reads (a stuck collector) never holds the server up:
/// the lines are written by a thread of their own, and dropped once its
/// buffer is full. 3,000 requests log far more than a pipe holds (64 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pipe_nobody_reads_does_not_stop_the_server() {
    let dir = TempDir::new("stucklog");
    let data = dir.0.join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cordon"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
        ])
        .env("CORDON_DATA_DIR", &data)
        .env("CORDON_LOG", "info")
        .env_remove("CORDON_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Held open and never read.
    let _stderr = child.stderr.take().unwrap();
    let mut port = None;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("Cordon is serving on https://127.0.0.1:") {
            port = Some(rest.trim().to_owned());
        }
        if line.contains("CA file:") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let url = format!("https://localhost:{}", port.expect("the address printed"));
    let mut http = agent::HttpsClient::new(
        agent::https::tls_config(&data.join("ca.pem")).unwrap(),
        &url,
    )
    .unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(120), async {
        for _ in 0..3000 {
            let reply = http
                .request(Method::GET, "/api/machines", &[], Vec::new())
                .await
                .unwrap();
            assert_eq!(reply.status, 401);
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        answered.is_ok(),
        "the server stopped answering behind its log pipe"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line_with_route_status_and_request_id() {
    let dir = TempDir::new("jsonlog");
    let log = dir.0.join("serve.log");
    let data = dir.0.join("data");
    let (mut child, printed) = serve_binary(
        &data,
        &log,
        &["--log-format", "json", "--metrics-listen", "off"],
    );
    assert!(!printed.contains("Metrics:"), "{printed}");
    let port = printed
        .lines()
        .find_map(|l| l.strip_prefix("Cordon is serving on https://127.0.0.1:"))
        .unwrap_or_else(|| panic!("{printed}"))
        .trim()
        .to_owned();
    let url = format!("https://localhost:{port}");
    let mut http = agent::HttpsClient::new(
        agent::https::tls_config(&data.join("ca.pem")).unwrap(),
        &url,
    )
    .unwrap();
    let machine = "0123456789abcdef0123456789abcdef01234567";
    let secret = "sEcReT-in-the-query";
    let reply = http
        .request(
            Method::GET,
            &format!("/api/machines/{machine}?access_token={secret}"),
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 401);
    let request_id = reply.header("request-id").unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let served = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["message"] == "served" && l["span"]["request_id"] == request_id.as_str());
        if let Some(line) = found {
            break line;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(served["span"]["route"], "/api/machines/{id}", "{served}");
    assert_eq!(served["span"]["method"], "GET", "{served}");
    assert_eq!(served["status"], 401, "{served}");
    assert!(served["duration_ms"].as_f64().is_some(), "{served}");
    assert_eq!(served["level"], "INFO", "{served}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(secret),
        "a query string is never logged:\n{text}"
    );
    assert!(!served.to_string().contains(machine), "{served}");
    for line in text.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.is_object()),
            "not a JSON object: {line}"
        );
    }
}

#[test]
fn serve_refuses_a_given_metrics_address_that_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new("metrics-refused");
    let output = Command::new(env!("CARGO_BIN_EXE_cordon"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &address,
        ])
        .env("CORDON_DATA_DIR", dir.0.join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot serve metrics on {address}")),
        "{stderr}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_cordon"))
        .args(["serve", "--metrics-listen", "localhost"])
        .env("CORDON_DATA_DIR", dir.0.join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--metrics-listen"), "{stderr}");
    assert!(stderr.contains("127.0.0.1:9464"), "{stderr}");
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_timed_out_actions_are_counted_under_their_status() {
    let server = TestServer::start_with(|c| {
        c.metrics_listen = MetricsListen::Given("127.0.0.1:0".parse().unwrap());
        c.action_expiry = Duration::from_millis(1500);
    })
    .await;
    let address = server.server.metrics_addr.unwrap();
    let mut api = server.api().await;

    // Nobody takes it: TimeOut, from the expiry sweeper.
    let absent = server.enroll("absent-1").await;
    let action_id = api.isolate_action(&absent.machine_id()).await;
    api.wait_status(&action_id, "TimeOut").await;
    let scraped = wait_for(
        address,
        "cordon_action_completion_seconds_count{type=\"Isolate\",status=\"TimeOut\"}",
        1.0,
    )
    .await;
    assert_eq!(
        scraped.value("cordon_machine_actions{type=\"Isolate\",status=\"TimeOut\"}"),
        1.0,
        "{}",
        scraped.text
    );
    // It waited its delivery window at least.
    assert!(
        scraped.value("cordon_action_completion_seconds_sum{type=\"Isolate\",status=\"TimeOut\"}")
            >= 1.5,
        "{}",
        scraped.text
    );

    // The agent reports a failure: Failed.
    let agent = server.enroll("failing-1").await;
    let mut session = agent.connect().await;
    let action_id = api.isolate_action(&agent.machine_id()).await;
    assert_eq!(action_id_of(&next(&mut session).await), action_id);
    execute(&mut session, &action_id, false, Enforced::NotIsolated).await;
    api.wait_status(&action_id, "Failed").await;
    let scraped = scrape(address).await;
    assert_eq!(
        scraped.value("cordon_action_completion_seconds_count{type=\"Isolate\",status=\"Failed\"}"),
        1.0,
        "{}",
        scraped.text
    );
    for status in ["Pending", "InProgress", "Succeeded", "Cancelled"] {
        let series = format!("cordon_machine_actions{{type=\"Isolate\",status=\"{status}\"}}");
        assert_eq!(scraped.value(&series), 0.0, "{series}:\n{}", scraped.text);
    }
}
