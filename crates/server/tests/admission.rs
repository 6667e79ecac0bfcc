//! Admission control under reconnect storms: with a handful of session
//! set-ups or enrollments allowed in progress, a burst of hundreds gets in
//! whole, and the only refusals anyone sees are "come back later" with a
//! time to come back, which the agent's retry policy honours.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::retry::RetryPolicy;
use agent::session::Refused;
use agent::{Identity, Session};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use http::Method;
use proto::agent::{Enforced, EnrollRequest};
use tokio::sync::Barrier;

/// A server that takes two set-ups (and two enrollments) at once, lets
/// the rest wait 100 ms, and asks those turned away to come back within
/// 2 s; no cap on connections from one address (every test agent is on
/// 127.0.0.1), and room for every TLS handshake of a burst (their bound
/// is not what these tests are about).
async fn small_server() -> TestServer {
    TestServer::start_with(|config| {
        config.connections.per_source = 0;
        config.admission.tls_handshakes = 1_000;
        config.admission.session_setups = 2;
        config.admission.enrollments = 2;
        config.admission.queue_timeout = Duration::from_millis(100);
        config.admission.max_retry_after = Duration::from_secs(2);
    })
    .await
}

/// `count` machines enrolled straight through `store` with `token`
/// (fast), named `<prefix>-<i>`: their ids and keys.
async fn enroll_in_store(
    store: &store::Store,
    token: &str,
    count: usize,
    prefix: &str,
) -> Vec<(String, Ed25519KeyPair)> {
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..count {
        let store = store.clone();
        let token_hash = server::crypto::sha256_hex(token.as_bytes());
        let name = format!("{prefix}-{i}");
        writes.spawn(async move {
            let pkcs8 =
                Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).unwrap();
            let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
            let machine = store
                .enroll_machine(
                    token_hash,
                    server::crypto::new_machine_id(),
                    key.public_key().as_ref().to_vec(),
                    store::Facts {
                        computer_dns_name: name,
                        ..Default::default()
                    },
                    server::now_nanos(),
                )
                .await
                .unwrap();
            (machine.id, key)
        });
    }
    let mut keys = Vec::new();
    while let Some(joined) = writes.join_next().await {
        keys.push(joined.unwrap());
    }
    keys
}

/// `count` machines enrolled straight through the store (fast), as the
/// identities their agents hold.
async fn enrolled_identities(server: &TestServer, count: usize) -> Vec<Identity> {
    let token = server.enroll_token().await;
    let tls = agent::https::tls_config(&server.ca).unwrap();
    enroll_in_store(server.store(), &token, count, "storm")
        .await
        .into_iter()
        .map(|(machine_id, key)| Identity {
            machine_id,
            server: server.url.clone(),
            name: None,
            key,
            tls: tls.clone(),
            state_dir: server.dir.0.clone(),
        })
        .collect()
}

/// What the agents of a burst saw, besides their welcome.
#[derive(Default)]
struct Seen {
    /// Refusals with a time to come back: (code, seconds).
    come_back_later: Vec<(String, u64)>,
    /// Anything else (should stay empty).
    other_errors: Vec<String>,
}

/// 300 agents open their sessions at the same instant, against a server
/// that sets up two at a time (and, for their first 300 ms, none: its two
/// places are taken, as by a slow store). Every one of them gets in; the
/// ones that came while the server was full were told `Unavailable` with
/// `retryAfterSeconds` and came back when told, and nobody saw any other
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_sessions_all_get_in_and_are_only_told_to_come_back_later() {
    const AGENTS: usize = 300;
    let server = small_server().await;
    let identities = enrolled_identities(&server, AGENTS).await;
    let gate = server.server.state.admission.sessions.clone();
    let busy_store = (gate.enter().await.unwrap(), gate.enter().await.unwrap());

    let seen = Arc::new(Mutex::new(Seen::default()));
    // Everyone holds its session until all are in and counted, then lets go.
    let all_in = Arc::new(Barrier::new(AGENTS + 1));
    let counted = Arc::new(Barrier::new(AGENTS + 1));
    let start = Arc::new(Barrier::new(AGENTS + 1));
    let policy = RetryPolicy::new(Duration::from_secs(2));
    let mut agents = tokio::task::JoinSet::new();
    for identity in identities {
        let (seen, all_in, start) = (seen.clone(), all_in.clone(), start.clone());
        let counted = counted.clone();
        agents.spawn(async move {
            start.wait().await;
            let mut attempt = 0;
            let session = loop {
                let opened = Session::open(
                    &identity,
                    agent::host_facts(Some("storm")),
                    Enforced::NotIsolated,
                )
                .await;
                let error = match opened {
                    Ok(session) => break session,
                    Err(e) => e,
                };
                let hint = match error.downcast_ref::<Refused>() {
                    Some(Refused {
                        code,
                        retry_after: Some(hint),
                        ..
                    }) => {
                        let mut seen = seen.lock().unwrap();
                        seen.come_back_later.push((code.clone(), hint.as_secs()));
                        Some(*hint)
                    }
                    _ => {
                        seen.lock().unwrap().other_errors.push(format!("{error:#}"));
                        attempt += 1;
                        None
                    }
                };
                assert!(attempt < 10, "{error:#}");
                tokio::time::sleep(policy.next_wait(attempt, hint)).await;
            };
            all_in.wait().await;
            counted.wait().await;
            drop(session);
        });
    }
    start.wait().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(busy_store);
    tokio::time::timeout(Duration::from_secs(60), all_in.wait())
        .await
        .expect("every agent in within a minute");
    // Everyone holds a session now, at the same time.
    assert_eq!(server.server.state.connections.counts().agents, AGENTS);
    counted.wait().await;
    while let Some(done) = agents.join_next().await {
        done.unwrap();
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(seen.other_errors.is_empty(), "{:?}", seen.other_errors);
    assert!(
        !seen.come_back_later.is_empty(),
        "the burst met a full server"
    );
    for (code, seconds) in &seen.come_back_later {
        assert_eq!(code, "Unavailable");
        assert!((1..=2).contains(seconds), "{seconds}");
    }
    let stats = gate.stats();
    assert_eq!(
        stats.turned_away as usize,
        seen.come_back_later.len(),
        "{stats:?}"
    );
    // Every agent's welcome plus the test's own two.
    assert_eq!(stats.admitted as usize, AGENTS + 2, "{stats:?}");
    // Every place given back (a set-up ends a moment after its welcome,
    // once its pending actions are sent).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while gate.stats().in_progress > 0 {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", gate.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// 200 enrollments sent at the same instant to a server that enrolls two
/// at a time (none in the first 300 ms): every one ends 200 with a machine
/// of its own, and every refusal on the way was 503 `ServerBusy` with a
/// `Retry-After`, which the sender honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_enrollments_all_succeed_and_are_only_told_to_come_back_later() {
    const ENROLLMENTS: usize = 200;
    let server = small_server().await;
    let token = server.enroll_token().await;
    let gate = server.server.state.admission.enrollments.clone();
    let busy_store = (gate.enter().await.unwrap(), gate.enter().await.unwrap());

    let seen = Arc::new(Mutex::new(Seen::default()));
    let start = Arc::new(Barrier::new(ENROLLMENTS + 1));
    let policy = RetryPolicy::new(Duration::from_secs(2));
    let mut senders = tokio::task::JoinSet::new();
    for i in 0..ENROLLMENTS {
        let (seen, start, token) = (seen.clone(), start.clone(), token.clone());
        let mut http = server.https();
        senders.spawn(async move {
            let pkcs8 =
                Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).unwrap();
            let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
            let public_key = STANDARD.encode(key.public_key().as_ref());
            let proof = STANDARD.encode(
                key.sign(&proto::agent::enroll_proof_message(&token, &public_key))
                    .as_ref(),
            );
            let body = serde_json::to_vec(&EnrollRequest {
                token,
                public_key,
                proof,
                facts: agent::host_facts(Some(&format!("new-{i}"))),
            })
            .unwrap();
            start.wait().await;
            for attempt in 0..20 {
                let reply = match http
                    .request(
                        Method::POST,
                        proto::agent::ENROLL_PATH,
                        &[("content-type", "application/json")],
                        body.clone(),
                    )
                    .await
                {
                    Ok(reply) => reply,
                    Err(e) => {
                        seen.lock().unwrap().other_errors.push(format!("{e:#}"));
                        tokio::time::sleep(policy.next_wait(attempt, None)).await;
                        continue;
                    }
                };
                if reply.status == 200 {
                    return reply.json().unwrap()["machineId"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                }
                let body = reply.json().unwrap();
                let hint = reply
                    .header("retry-after")
                    .and_then(agent::retry::parse_retry_after);
                {
                    let mut seen = seen.lock().unwrap();
                    match hint {
                        Some(hint) if reply.status == 503 && body["code"] == "ServerBusy" => {
                            seen.come_back_later
                                .push((body["code"].as_str().unwrap().to_owned(), hint.as_secs()));
                        }
                        _ => seen.other_errors.push(format!("{} {body}", reply.status)),
                    }
                }
                tokio::time::sleep(policy.next_wait(0, hint)).await;
            }
            panic!("enrollment {i} never succeeded");
        });
    }
    start.wait().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(busy_store);
    let mut machines = HashSet::new();
    let all = async {
        while let Some(done) = senders.join_next().await {
            machines.insert(done.unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every enrollment done within a minute");
    assert_eq!(machines.len(), ENROLLMENTS);
    assert_eq!(
        server.store().machine_count().await.unwrap(),
        ENROLLMENTS as u64
    );

    let seen = seen.lock().unwrap();
    assert!(seen.other_errors.is_empty(), "{:?}", seen.other_errors);
    assert!(
        !seen.come_back_later.is_empty(),
        "the burst met a full server"
    );
    for (_, seconds) in &seen.come_back_later {
        assert!((1..=2).contains(seconds), "{seconds}");
    }
    assert_eq!(
        gate.stats().turned_away as usize,
        seen.come_back_later.len()
    );
}

/// `cordon-agent enroll` (the library's `enroll`) comes back when a busy
/// server asks it to, and enrolls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_enrollment_comes_back_when_the_server_is_busy() {
    let server = small_server().await;
    let gate = server.server.state.admission.enrollments.clone();
    let busy_store = (gate.enter().await.unwrap(), gate.enter().await.unwrap());
    let token = server.enroll_token().await;
    let state = TempDir::new("agent");
    let enrolling = {
        let (url, ca, dir) = (server.url.clone(), server.ca.clone(), state.0.clone());
        tokio::spawn(async move { agent::enroll(&url, &token, &ca, &dir, Some("patient")).await })
    };
    // Turned away at least once while the places are taken.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gate.stats().turned_away == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never turned away");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(busy_store);
    let identity = tokio::time::timeout(Duration::from_secs(30), enrolling)
        .await
        .expect("enrolled within 30 s")
        .unwrap()
        .expect("enrolled");
    assert!(identity.machine_id.len() == 40);
    assert_eq!(server.store().machine_count().await.unwrap(), 1);
}

/// A TLS handshake over its bound waits for a place and goes on when one
/// is given back; one still waiting at the queue timeout is closed. The
/// agents' handshakes wait in a line of their own, so a full line of other
/// clients doesn't keep them out (nor the other way round).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_waits_for_its_place_in_its_own_line() {
    let server = TestServer::start_with(|config| {
        config.admission.tls_handshakes = 1;
        config.admission.queue_timeout = Duration::from_millis(500);
    })
    .await;
    let agent = server.enroll("line").await;
    let others = server.server.state.admission.tls_others.clone();

    // The others' line is full: a client waits, and is closed at the deadline.
    let held = others.enter().await.unwrap();
    assert!(tls_from(&server, "127.0.0.2").await.is_err());
    assert_eq!(others.stats().turned_away, 1);
    // An agent's handshake is not in that line.
    let session = agent.connect().await;
    drop(session);
    // A place given back while a client waits lets it through.
    let waiting = tokio::spawn({
        let url = server.server.local_addr;
        let ca = server.ca.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(url).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            tokio_rustls::TlsConnector::from(agent::https::tls_config(&ca).unwrap())
                .connect(name, tcp)
                .await
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while others.stats().waiting == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(held);
    assert!(
        waiting.await.unwrap().is_ok(),
        "the waiting handshake went on"
    );
    assert_eq!(others.stats().turned_away, 1);

    // And the other way round: a full agents' line leaves API clients be.
    let agents = server.server.state.admission.tls_agents.clone();
    let _held = agents.enter().await.unwrap();
    let mut api = server.api().await;
    let reply = api.get("/api/machines").await;
    assert_eq!(reply.status, 200);
}

/// A client that sends its ClientHello and then nothing more keeps its
/// handshake place for a second at most: another client in line gets it
/// well within the queue timeout (before, the stalled one held it for its
/// whole ten-second handshake deadline and the other was turned away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_its_handshake_gives_its_place_up() {
    let server = TestServer::start_with(|config| {
        config.admission.tls_handshakes = 1;
        config.admission.queue_timeout = Duration::from_secs(4);
    })
    .await;
    let others = server.server.state.admission.tls_others.clone();
    // The ClientHello, written by a real TLS client; then silence.
    let mut client = rustls::ClientConnection::new(
        agent::https::tls_config(&server.ca).unwrap(),
        rustls::pki_types::ServerName::try_from("localhost").expect("name"),
    )
    .unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let mut stalled = socket.connect(server.server.local_addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stalled, &hello)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while others.stats().in_progress == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never admitted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        tls_from(&server, "127.0.0.2").await.is_ok(),
        "the second client got the stalled one's place"
    );
    assert_eq!(others.stats().turned_away, 0);
    drop(stalled);
}

/// A session the server cannot set up (its store doesn't answer) is
/// refused before its `welcome`, with a time to come back, so the agent's
/// `Session::open` sees the refusal and honours the time (it would
/// otherwise take the session as open and reset its backoff).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_store_cannot_set_up_is_told_to_come_back_before_its_welcome() {
    let server = TestServer::start().await;
    let agent = server.enroll("unready").await;
    let database = server.dir.0.join(server::DATABASE_FILE);
    let conn = rusqlite::Connection::open(&database).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch("ALTER TABLE exclusion_rules RENAME TO exclusion_rules_moved")
        .unwrap();
    let opened = Session::open(
        &agent.identity,
        agent::host_facts(Some(&agent.name)),
        Enforced::NotIsolated,
    )
    .await;
    let error = opened.err().expect("refused at the session's start");
    let refused = error.downcast_ref::<Refused>().expect("a refusal");
    assert_eq!(refused.code, "Unavailable", "{refused}");
    assert!(refused.retry_after.is_some(), "{refused}");
    // The session's task writes the refusal, then leaves the map of live
    // sessions: the agent may read the refusal a moment before that.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server
        .server
        .state
        .gateway
        .is_connected(&agent.machine_id())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused session stayed among the live ones"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    conn.execute_batch("ALTER TABLE exclusion_rules_moved RENAME TO exclusion_rules")
        .unwrap();
    let _session = agent.connect().await;
    assert!(
        server
            .server
            .state
            .gateway
            .is_connected(&agent.machine_id())
    );
}

/// A measurement, not a check (run it on a release build): a `cordon
/// serve` process with the default bounds, and `CORDON_BURST_AGENTS`
/// (5,000) enrolled agents opening their sessions at the same instant,
/// each with the agent's retry policy. Prints how long until every agent
/// was in, and what they were told on the way. `CORDON_BURST_ARGS` adds
/// flags to `serve` (such as `--max-session-setups-in-progress 100000` to
/// see the burst without admission control).
///
/// cargo test --release -p server --test admission -- --ignored --nocapture
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_a_burst_of_sessions_against_a_release_server() {
    let agents: usize = std::env::var("CORDON_BURST_AGENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000);
    let extra: Vec<String> = std::env::var("CORDON_BURST_ARGS")
        .map(|a| a.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    server::conns::raise_file_limit().unwrap();
    let dir = TempDir::new("burst");
    // The machines, enrolled before the server starts (it then makes its CA).
    let keys: Vec<(String, Ed25519KeyPair)> = {
        let store = server::init_data_dir(&dir.0).unwrap();
        let (_, token) = server::create_enroll_token(&store, None, None)
            .await
            .unwrap();
        enroll_in_store(&store, &token, agents, "burst").await
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cordon"))
        .args(["serve", "--new-ca", "--max-connections-per-source", "0"])
        .arg("--data-dir")
        .arg(&dir.0)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(&extra)
        .env("CORDON_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let ca = dir.0.join("ca.pem");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ca.exists() || std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never started"
        );
        assert!(child.try_wait().unwrap().is_none(), "the server stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _child = Kill(child);
    let tls = agent::https::tls_config(&ca).unwrap();
    let url = format!("https://localhost:{port}");

    #[derive(Default)]
    struct Tally {
        refusals: usize,
        hints: Vec<u64>,
        other_errors: usize,
        other_examples: Vec<String>,
        in_after: Vec<Duration>,
        attempts: Vec<usize>,
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let all_in = Arc::new(Barrier::new(agents + 1));
    let start = Arc::new(Barrier::new(agents + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for (machine_id, key) in keys {
        let identity = Identity {
            machine_id,
            server: url.clone(),
            name: None,
            key,
            tls: tls.clone(),
            state_dir: dir.0.clone(),
        };
        let (tally, all_in, start) = (tally.clone(), all_in.clone(), start.clone());
        tasks.spawn(async move {
            let policy = RetryPolicy::default();
            start.wait().await;
            let began = std::time::Instant::now();
            let (mut attempt, mut tries) = (0, 0);
            let session = loop {
                tries += 1;
                let opened = Session::open(
                    &identity,
                    agent::host_facts(Some("burst")),
                    Enforced::NotIsolated,
                )
                .await;
                let error = match opened {
                    Ok(session) => break session,
                    Err(e) => e,
                };
                let hint = error.downcast_ref::<Refused>().and_then(|r| r.retry_after);
                {
                    let mut tally = tally.lock().unwrap();
                    match hint {
                        Some(hint) => {
                            tally.refusals += 1;
                            tally.hints.push(hint.as_secs());
                        }
                        None => {
                            tally.other_errors += 1;
                            if tally.other_examples.len() < 5 {
                                tally.other_examples.push(format!("{error:#}"));
                            }
                        }
                    }
                }
                let wait = policy.next_wait(attempt, hint);
                if hint.is_none() {
                    attempt += 1;
                }
                tokio::time::sleep(wait).await;
            };
            {
                let mut tally = tally.lock().unwrap();
                tally.in_after.push(began.elapsed());
                tally.attempts.push(tries);
            }
            all_in.wait().await;
            drop(session);
        });
    }
    start.wait().await;
    let began = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(600), all_in.wait())
        .await
        .expect("every agent in within ten minutes");
    let everyone = began.elapsed();
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let mut tally = tally.lock().unwrap();
    tally.in_after.sort();
    tally.attempts.sort();
    tally.hints.sort();
    let pct = |v: &Vec<Duration>, p: usize| v[(v.len() - 1) * p / 100].as_secs_f64();
    let median_hint = tally.hints.get(tally.hints.len() / 2).copied();
    println!(
        "burst: {agents} agents, all in after {:.1} s (median {:.1} s, p90 {:.1} s); \
         {} refusals with a time to come back (median {:?} s, max {:?} s), {} other errors \
         {:?}; attempts: median {}, max {}; extra flags {extra:?}",
        everyone.as_secs_f64(),
        pct(&tally.in_after, 50),
        pct(&tally.in_after, 90),
        tally.refusals,
        median_hint,
        tally.hints.last(),
        tally.other_errors,
        tally.other_examples,
        tally.attempts[tally.attempts.len() / 2],
        tally.attempts.last().unwrap(),
    );
}
