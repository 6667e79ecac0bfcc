//! Connection caps and lifetimes: one source address cannot take every
//! connection, API clients and agents cannot starve each other, and a
//! keep-alive connection does not live forever.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::Method;
use tokio::io::AsyncReadExt;

/// A discovery request: cheap, needs no token.
async fn discovery(server: &TestServer, http: &mut ClientFrom) -> anyhow::Result<agent::Reply> {
    http.request(
        Method::GET,
        &format!("/{}/v2.0/.well-known/openid-configuration", server.tenant()),
        &[],
        Vec::new(),
    )
    .await
}

/// Whether the server closed a connection that has sent nothing (a TLS
/// connection the server refused at `accept` ends at once).
async fn closed_at_once(server: &TestServer, source: &str) -> bool {
    match tls_from(server, source).await {
        Err(_) => true,
        Ok(mut tls) => {
            let mut byte = [0u8; 1];
            matches!(
                tokio::time::timeout(Duration::from_secs(2), tls.read(&mut byte)).await,
                Ok(Ok(0) | Err(_))
            )
        }
    }
}

/// 1,005 connections from one address used to lock every other client out
/// and fill the log with `accept failed: Too many open files`. Now one
/// address gets its cap (64 by default) and no more, and everyone else is
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_every_connection() {
    let server = TestServer::start().await;
    // The open file limit was raised to its hard limit.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    assert_eq!(limit.rlim_cur, limit.rlim_max);

    let attacker = "127.0.0.2";
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..150 {
        match ClientFrom::connect(&server, attacker).await {
            Ok(mut http) => match discovery(&server, &mut http).await {
                Ok(reply) if reply.status == 200 => held.push(http),
                _ => refused += 1,
            },
            Err(_) => refused += 1,
        }
    }
    assert_eq!(held.len(), 64, "{refused} refused");
    assert_eq!(refused, 150 - 64);
    assert!(closed_at_once(&server, attacker).await);

    // Another address is answered at once, while the attacker holds its
    // connections.
    let started = Instant::now();
    let mut fresh = ClientFrom::connect(&server, "127.0.0.3").await.unwrap();
    let reply = discovery(&server, &mut fresh).await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The connections held are still served.
    assert_eq!(discovery(&server, &mut held[0]).await.unwrap().status, 200);
    let counts = server.server.state.connections.counts();
    assert_eq!(counts.api, 64 + 1, "{counts:?}");

    // Closing them gives the address its places back.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut http = ClientFrom::connect(&server, attacker).await;
        if let Ok(http) = &mut http
            && discovery(&server, http)
                .await
                .is_ok_and(|r| r.status == 200)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the address stayed refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With every API connection taken, an agent still opens its session; with
/// every agent session taken, API clients are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_clients_and_agents_cannot_starve_each_other() {
    let server = TestServer::start_with(|config| {
        config.connections.api = 4;
        config.connections.agents = 1;
        config.connections.per_source = 0;
    })
    .await;
    let first = server.enroll("first").await;
    let second = server.enroll("second").await;

    // The API share, filled.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut http = ClientFrom::connect(&server, "127.0.0.2").await.unwrap();
        assert_eq!(discovery(&server, &mut http).await.unwrap().status, 200);
        held.push(http);
    }
    // One more API client is told so, in the contract's format, and its
    // connection closed.
    let mut http = ClientFrom::connect(&server, "127.0.0.3").await.unwrap();
    let reply = http
        .request(Method::GET, "/api/machines", &[], Vec::new())
        .await
        .unwrap();
    let body = assert_error(&reply, 503, "ServiceUnavailable");
    assert!(body["error"]["target"].is_string(), "{body}");
    assert_eq!(reply.header("retry-after"), Some("5"));
    assert_eq!(reply.header("connection"), Some("close"));
    // The token endpoint says so the OAuth way.
    let mut http = ClientFrom::connect(&server, "127.0.0.3").await.unwrap();
    let reply = http
        .request(
            Method::POST,
            &format!("/{}/oauth2/v2.0/token", server.tenant()),
            &[("content-type", "application/x-www-form-urlencoded")],
            form(&[("grant_type", "client_credentials")]),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json().unwrap()["error"], "temporarily_unavailable");

    // An agent still gets its session.
    let session = first.connect().await;
    assert_eq!(server.server.state.connections.counts().agents, 1);
    // The agent share is full now: another agent is refused, and told why…
    let refused = agent::Session::open(
        &second.identity,
        agent::host_facts(Some("second")),
        proto::agent::Enforced::NotIsolated,
    )
    .await
    .err()
    .expect("the second session is refused");
    assert!(refused.to_string().contains("Unavailable"), "{refused}");
    // …with a time to come back, which its run loop honours.
    let refusal = refused
        .downcast_ref::<agent::session::Refused>()
        .expect("a refusal from the server");
    assert_eq!(refusal.code, "Unavailable");
    assert!(
        refusal
            .retry_after
            .is_some_and(|wait| (1..=30).contains(&wait.as_secs())),
        "{refusal:?}"
    );
    // …while API clients holding their connections are served.
    assert_eq!(discovery(&server, &mut held[0]).await.unwrap().status, 200);
    // Once the first session ends, the second agent gets its place.
    drop(session);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.server.state.connections.counts().agents > 0 {
        assert!(Instant::now() < deadline, "the session's place was kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _second = second.connect().await;
}

/// A keep-alive connection that keeps sending requests is closed at the
/// end of its lifetime (after answering the request in progress), and one
/// that sends nothing after its idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_have_a_bounded_life() {
    let server = TestServer::start_with(|config| {
        config.max_connection_lifetime = Duration::from_secs(2);
        config.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let mut busy = ClientFrom::connect(&server, "127.0.0.2").await.unwrap();
    let started = Instant::now();
    let mut answered = 0;
    loop {
        match discovery(&server, &mut busy).await {
            Ok(reply) => {
                assert_eq!(reply.status, 200);
                answered += 1;
            }
            Err(_) => break,
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the connection outlived its lifetime"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(answered >= 3, "{answered}");

    let mut idle = ClientFrom::connect(&server, "127.0.0.3").await.unwrap();
    assert_eq!(discovery(&server, &mut idle).await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(discovery(&server, &mut idle).await.is_err());
    // A connection that never sends a request is closed too.
    let mut silent = tls_from(&server, "127.0.0.4").await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.server.state.connections.counts() != Default::default() {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            server.server.state.connections.counts()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection must become an API client or an agent session within its
/// handshake deadline: one that only sends session requests that never
/// upgrade cannot sit in the handshake share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cannot_stay_a_handshake() {
    let server = TestServer::start_with(|config| {
        config.handshake_timeout = Duration::from_secs(1);
    })
    .await;
    let mut http = ClientFrom::connect(&server, "127.0.0.2").await.unwrap();
    let started = Instant::now();
    loop {
        let reply = http
            .request(Method::GET, proto::agent::SESSION_PATH, &[], Vec::new())
            .await;
        match reply {
            Ok(reply) => assert_eq!(reply.status, 400),
            Err(_) => break,
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the connection stayed a handshake"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.server.state.connections.counts().handshakes > 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An agent still opens its session, well within the deadline.
    let agent = server.enroll("m").await;
    let _session = agent.connect().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(server.server.state.connections.counts().agents, 1);
}

/// A TLS connection from the loopback address `local` whose ClientHello
/// offers `alpn`.
async fn tls_offering(
    server: &TestServer,
    local: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{local}:0").parse().expect("an IPv4 address"))?;
    let tcp = socket.connect(server.server.local_addr).await?;
    let mut config = (*agent::https::tls_config(&server.ca).unwrap()).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Clients that open connections and then send nothing used to fill the
/// handshake share, which every new connection needs, agents' too: from a
/// few addresses they kept every agent out. Agents announce themselves in
/// their ClientHello, so they leave that share at once, and are still taken
/// when it is full; other newcomers are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_filling_the_handshake_share_do_not_keep_agents_out() {
    let server = TestServer::start_with(|config| {
        config.connections.handshakes = 4;
        config.connections.per_source = 0;
    })
    .await;
    let agent = server.enroll("m").await;
    let second = server.enroll("m2").await;
    let mut slow = Vec::new();
    for n in 0..4 {
        slow.push(tls_from(&server, &format!("127.0.3.{n}")).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.server.state.connections.counts().handshakes < 4 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The share is full: an API newcomer is closed at once…
    assert!(closed_at_once(&server, "127.0.4.1").await);
    // …an agent opens its session, and a second one while the first holds it.
    let _session = agent.connect().await;
    let _second = second.connect().await;
    assert_eq!(server.server.state.connections.counts().agents, 2);
    assert_eq!(server.server.state.connections.counts().handshakes, 4);
}

/// A connection announced as an agent's session serves nothing else: it
/// cannot be used to hold an API connection in the agents' share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_announced_as_an_agents_serves_only_a_session() {
    let server = TestServer::start().await;
    let tls = tls_offering(
        &server,
        "127.0.0.2",
        &[proto::agent::SESSION_ALPN, b"http/1.1"],
    )
    .await
    .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Full<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(tls))
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::builder()
        .uri("/api/machines")
        .header("host", "localhost")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .unwrap()
        .to_bytes();
    let reply = agent::Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    };
    let body = assert_error(&reply, 400, "BadRequest");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("agent's session"),
        "{body}"
    );
    // The connection is closed after the answer.
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the connection is closed")
        .unwrap()
        .unwrap();
}
