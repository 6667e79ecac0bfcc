//! Webhooks (docs/soar.md): signed deliveries of the event log's events to
//! HTTPS receivers, from a durable outbox, retried while the receiver is
//! away, managed through `/api/webhooks` and `cordon webhook`.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::{HttpsClient, Reply};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use proto::agent::{AgentMessage, Enforced};
use serde_json::{Value, json};

// ---- a receiver -------------------------------------------------------------

/// One request a receiver got, with whether its signature was right.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    body: Value,
    signed: bool,
}

/// An HTTPS receiver with its own CA, checking every signature with the
/// webhook's secret on its own (not with the server's code): a request
/// whose signature is wrong is answered 401 and counted.
struct Receiver {
    addr: SocketAddr,
    ca_pem: String,
    received: Arc<Mutex<Vec<Received>>>,
    /// The secret the receiver checks with (set once the webhook exists).
    secret: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

/// A CA, and a certificate for 127.0.0.1 and localhost it issued.
fn receiver_certificates() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Receiver test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// Whether `headers` sign `body` with `secret` as Standard Webhooks do.
fn signed(secret: &str, headers: &http::HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let Some(key) = secret
        .strip_prefix("whsec_")
        .and_then(|k| STANDARD.decode(k).ok())
    else {
        return false;
    };
    let timestamp = header("webhook-timestamp");
    let fresh = timestamp
        .parse::<i64>()
        .is_ok_and(|t| (t - server::unix_seconds() as i64).abs() < 300);
    let mut signed = header("webhook-id").into_bytes();
    signed.push(b'.');
    signed.extend_from_slice(timestamp.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key);
    let expected = format!(
        "v1,{}",
        STANDARD.encode(aws_lc_rs::hmac::sign(&key, &signed).as_ref())
    );
    fresh
        && header("webhook-signature")
            .split(' ')
            .any(|s| s == expected)
}

impl Receiver {
    /// A receiver on a free port, with a certificate of its own CA.
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (ca_pem, cert, key) = receiver_certificates();
        Receiver::serve(listener, ca_pem, cert, key, Arc::default())
    }

    /// A receiver on `addr` with the certificates of `before` (the same
    /// receiver coming back), keeping its requests.
    async fn restart(addr: SocketAddr, ca_pem: String, cert: String, key: String) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        Receiver::serve(listener, ca_pem, cert, key, Arc::default())
    }

    fn serve(
        listener: tokio::net::TcpListener,
        ca_pem: String,
        cert: String,
        key: String,
        secret: Arc<Mutex<String>>,
    ) -> Receiver {
        use rustls::pki_types::pem::PemObject;
        let certs =
            vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let addr = listener.local_addr().unwrap();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let (log, check) = (received.clone(), secret.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let (log, check) = (log.clone(), check.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            let (log, check) = (log.clone(), check.clone());
                            async move {
                                let (parts, body) = request.into_parts();
                                let body = body.collect().await.unwrap().to_bytes();
                                let secret = check.lock().unwrap().clone();
                                let ok = signed(&secret, &parts.headers, &body);
                                log.lock().unwrap().push(Received {
                                    id: parts.headers["webhook-id"].to_str().unwrap().to_owned(),
                                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                                    signed: ok,
                                });
                                let status = if ok { 204 } else { 401 };
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::new()))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            ca_pem,
            received,
            secret,
            task,
        }
    }

    fn url(&self) -> String {
        format!(
            "https://127.0.0.1:{}/hooks/cordon?source=test",
            self.addr.port()
        )
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `done` holds for what was received (10 s at most).
    async fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let received = self.received();
            if done(&received) {
                return received;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} not received; got {received:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn kinds(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| r.body["type"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn json_of(reply: &Reply) -> Value {
    reply.json().unwrap_or(Value::Null)
}

/// An API client of a new app holding `permissions`.
async fn app_api(server: &TestServer, name: &str, permissions: &[&str]) -> Api {
    let (id, secret) = create_app(server.store(), name, permissions).await;
    Api {
        http: server.https(),
        token: server.token_for(&id, &secret).await,
    }
}

async fn admin_api(server: &TestServer) -> Api {
    app_api(server, "Webhook admin", &["Machine.ReadWrite.All"]).await
}

/// Retries a tenth of a second apart (doubling), so tests see several.
async fn quick_retries() -> TestServer {
    TestServer::start_with(|config| {
        config.webhooks.retry_base = Duration::from_millis(100);
        config.webhooks.attempt_timeout = Duration::from_secs(2);
    })
    .await
}

// ---- the tests --------------------------------------------------------------

/// An isolation's events reach the receiver, each signed, with the bodies
/// `GET /api/events` carries, each once; a tamper report is an event too.
/// The deliveries are listed with their one attempt each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_gets_an_isolations_events_signed_once_each() {
    let server = quick_retries().await;
    let receiver = Receiver::start().await;
    let mut admin = admin_api(&server).await;
    let created = admin
        .post(
            "/api/webhooks",
            json!({
                "Url": receiver.url(),
                "Events": ["machineAction.created", "machineAction.completed",
                           "machine.isolationChanged", "machine.tamperDetected"],
                "CaCertificate": receiver.ca_pem,
                "Description": "SOAR playbook",
            }),
        )
        .await;
    assert_eq!(created.status, 201, "{}", json_of(&created));
    let secret = json_of(&created)["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert_eq!(json_of(&created)["customCa"], true);
    *receiver.secret.lock().unwrap() = secret;
    let webhook_id = json_of(&created)["id"].as_str().unwrap().to_owned();

    let agent = server.enroll("hooked").await;
    let mut session = agent.connect().await;
    let mut api = server.api().await;
    let action_id = api.isolate_action(&agent.machine_id()).await;
    let pushed = next(&mut session).await;
    assert_eq!(action_id_of(&pushed), action_id);
    execute(&mut session, &action_id, true, Enforced::Full).await;
    api.wait_status(&action_id, "Succeeded").await;
    session
        .send(&AgentMessage::Tamper {
            detail: "table cordon removed".into(),
            restored: true,
        })
        .await
        .unwrap();

    let received = receiver
        .wait_for("the isolation's events", |r| {
            kinds(r).contains(&"machineAction.completed".to_owned())
                && kinds(r).contains(&"machine.tamperDetected".to_owned())
        })
        .await;
    assert!(received.iter().all(|r| r.signed), "{received:#?}");
    // Only the types asked for (no machineAction.updated for InProgress).
    let mut types = kinds(&received);
    types.sort();
    types.dedup();
    assert_eq!(
        types,
        [
            "machine.isolationChanged",
            "machine.tamperDetected",
            "machineAction.completed",
            "machineAction.created",
        ]
    );
    let completed = received
        .iter()
        .find(|r| r.body["type"] == "machineAction.completed")
        .unwrap();
    assert_eq!(completed.body["data"]["id"], action_id.as_str());
    assert_eq!(completed.body["data"]["status"], "Succeeded");
    let tamper = received
        .iter()
        .find(|r| r.body["type"] == "machine.tamperDetected")
        .unwrap();
    assert_eq!(tamper.body["data"]["detail"], "table cordon removed");
    assert_eq!(
        tamper.body["data"]["machine"]["id"],
        agent.machine_id().as_str()
    );
    // The same bodies as the event log's.
    let events = server.store().events_after(0, i64::MAX, 100).await.unwrap();
    for r in &received {
        assert!(
            events
                .iter()
                .any(|e| serde_json::from_str::<Value>(&e.body).unwrap() == r.body),
            "{r:?}"
        );
    }
    // Once each: every webhook-id once.
    let mut ids: Vec<_> = received.iter().map(|r| r.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), received.len());

    // Each recorded as delivered (just after the receiver answered).
    let path = format!("/api/webhooks/{webhook_id}/deliveries");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let listed = loop {
        let listed = admin.get(&path).await;
        assert_eq!(listed.status, 200, "{}", json_of(&listed));
        let listed = json_of(&listed);
        if listed["value"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["status"] == "Delivered")
        {
            break listed;
        }
        assert!(tokio::time::Instant::now() < deadline, "{listed}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let deliveries = listed["value"].as_array().unwrap();
    assert_eq!(deliveries.len(), received.len());
    for d in deliveries {
        assert_eq!(d["status"], "Delivered", "{d}");
        assert_eq!(d["attempts"].as_array().unwrap().len(), 1, "{d}");
        assert_eq!(d["attempts"][0]["statusCode"], 204, "{d}");
    }
    // The secret is shown once only.
    let one = admin.get(&format!("/api/webhooks/{webhook_id}")).await;
    assert_eq!(one.status, 200);
    assert!(json_of(&one).get("secret").is_none(), "{}", json_of(&one));
    let all = json_of(&admin.get("/api/webhooks").await);
    assert!(!all.to_string().contains("whsec_"), "{all}");
}

/// A receiver that is away, then answers: the deliveries are retried with
/// growing waits, each attempt and its error listed; once it is back, each
/// arrives exactly once, signed, with the id every attempt had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_away_for_a_while_gets_everything_once_it_is_back() {
    let server = quick_retries().await;
    // The receiver's address, free while it is away.
    let spare = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = spare.local_addr().unwrap();
    drop(spare);
    let (ca_pem, cert, key) = receiver_certificates();
    let mut admin = admin_api(&server).await;
    let created = admin
        .post(
            "/api/webhooks",
            json!({
                "Url": format!("https://127.0.0.1:{}/hook", addr.port()),
                "Events": "machineAction.created,machineAction.completed",
                "CaCertificate": ca_pem,
            }),
        )
        .await;
    assert_eq!(created.status, 201, "{}", json_of(&created));
    let secret = json_of(&created)["secret"].as_str().unwrap().to_owned();
    let webhook_id = json_of(&created)["id"].as_str().unwrap().to_owned();

    let agent = server.enroll("away").await;
    let mut session = agent.connect().await;
    let mut api = server.api().await;
    let action_id = api.isolate_action(&agent.machine_id()).await;
    let pushed = next(&mut session).await;
    execute(&mut session, &action_id_of(&pushed), true, Enforced::Full).await;
    // Isolation never waits for the receiver.
    api.wait_status(&action_id, "Succeeded").await;

    // Retried: wait until the first delivery has three failed attempts.
    let path = format!("/api/webhooks/{webhook_id}/deliveries");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let before = loop {
        let listed = json_of(&admin.get(&path).await);
        let deliveries = listed["value"].as_array().unwrap().clone();
        if deliveries.len() == 2
            && deliveries
                .iter()
                .all(|d| d["attempts"].as_array().unwrap().len() >= 3)
        {
            break deliveries;
        }
        assert!(tokio::time::Instant::now() < deadline, "{listed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for d in &before {
        assert_eq!(d["status"], "Pending", "{d}");
        let attempt = &d["attempts"][0];
        assert_eq!(attempt["statusCode"], Value::Null, "{d}");
        assert!(
            attempt["error"]
                .as_str()
                .unwrap()
                .contains("cannot connect"),
            "{d}"
        );
        assert!(d["nextAttemptDateTimeUtc"].is_string(), "{d}");
    }

    let receiver = Receiver::restart(addr, ca_pem, cert, key).await;
    *receiver.secret.lock().unwrap() = secret;
    let received = receiver.wait_for("both deliveries", |r| r.len() >= 2).await;
    // A moment more: nothing arrives twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received_after = receiver.received();
    assert_eq!(received_after.len(), 2, "{received_after:#?}");
    assert!(received.iter().all(|r| r.signed));
    let mut sent_ids: Vec<_> = before.iter().map(|d| d["id"].as_str().unwrap()).collect();
    let mut got_ids: Vec<_> = received_after.iter().map(|r| r.id.as_str()).collect();
    sent_ids.sort();
    got_ids.sort();
    assert_eq!(sent_ids, got_ids);
    assert_eq!(
        kinds(&received_after),
        ["machineAction.created", "machineAction.completed"]
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let listed = json_of(&admin.get(&path).await);
        if listed["value"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["status"] == "Delivered")
        {
            for d in listed["value"].as_array().unwrap() {
                let attempts = d["attempts"].as_array().unwrap();
                assert_eq!(attempts.last().unwrap()["statusCode"], 204, "{d}");
                assert!(attempts.len() >= 4, "{d}");
                assert!(d["deliveredDateTimeUtc"].is_string(), "{d}");
            }
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{listed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A delivery is given up once its retry window is over, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_is_given_up_after_its_retry_window() {
    let server = TestServer::start_with(|config| {
        config.webhooks.retry_base = Duration::from_millis(100);
        config.webhooks.retry_for = Duration::from_millis(500);
    })
    .await;
    let (ca_pem, _, _) = receiver_certificates();
    let mut admin = admin_api(&server).await;
    let created = admin
        .post(
            "/api/webhooks",
            json!({"Url": "https://127.0.0.1:9/nobody", "Events": ["machineAction.created"],
                   "CaCertificate": ca_pem}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", json_of(&created));
    let webhook_id = json_of(&created)["id"].as_str().unwrap().to_owned();
    let mut api = server.api().await;
    for name in ["given-up-1", "given-up-2", "given-up-3"] {
        let agent = server.enroll(name).await;
        api.isolate_action(&agent.machine_id()).await;
    }
    let path = format!("/api/webhooks/{webhook_id}/deliveries");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = json_of(&admin.get(&path).await);
        let given_up: Vec<_> = listed["value"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["status"] == "Failed" && d["attempts"].as_array().unwrap().len() >= 2)
            .collect();
        if let Some(d) = given_up.first() {
            assert_eq!(d["nextAttemptDateTimeUtc"], Value::Null, "{d}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{listed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Those held back while the receiver failed (one delivery at a time
    // probes it) are given up by the housekeeping once their window is over.
    tokio::time::sleep(Duration::from_millis(600)).await;
    server::webhooks::prune(server.store(), &server.server.state.config.webhooks)
        .await
        .unwrap();
    let listed = json_of(&admin.get(&path).await);
    let deliveries = listed["value"].as_array().unwrap();
    assert_eq!(deliveries.len(), 3, "{listed}");
    assert!(
        deliveries.iter().all(|d| d["status"] == "Failed"),
        "{listed}"
    );
}

/// Bad webhooks are refused in the contract's words and change nothing;
/// unknown and malformed ids; only callers who may change settings and
/// reach every machine group manage webhooks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_webhooks_and_callers_are_refused() {
    let server = TestServer::start().await;
    let mut admin = admin_api(&server).await;
    let ok = json!({"Url": "https://soar.example.com/hook", "Events": ["machineAction.completed"]});
    let with = |field: &str, value: Value| {
        let mut body = ok.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = ok.clone();
        body.as_object_mut().unwrap().remove(field);
        body
    };
    for (body, code, says) in [
        (
            with("Url", json!("http://soar.example.com/hook")),
            "InvalidInput",
            "https",
        ),
        (
            with("Url", json!("https://soar.example.com/a#b")),
            "InvalidInput",
            "fragment",
        ),
        (
            with("Url", json!(format!("https://h/{}", "a".repeat(3000)))),
            "InvalidInput",
            "longer",
        ),
        (with("Url", json!(5)), "InvalidRequestBody", "Url"),
        (without("Url"), "MissingRequiredParameter", "Url"),
        (without("Events"), "MissingRequiredParameter", "Events"),
        (
            with("Events", json!(["machine.deleted"])),
            "InvalidInput",
            "not an event type",
        ),
        (
            with("Events", json!([])),
            "InvalidInput",
            "names no event type",
        ),
        (with("Events", json!([1])), "InvalidRequestBody", "Events"),
        (
            with("Events", json!(vec!["machineAction.created"; 65])),
            "InvalidInput",
            "64",
        ),
        (with("Secret", json!("hunter2")), "InvalidInput", "whsec_"),
        (
            with("CaCertificate", json!("not a certificate")),
            "InvalidInput",
            "CaCertificate",
        ),
        (
            with("Description", json!("a".repeat(1001))),
            "InvalidInput",
            "Description",
        ),
    ] {
        let reply = admin.post("/api/webhooks", body.clone()).await;
        let error = assert_error(&reply, 400, code);
        assert!(
            error["error"]["message"].as_str().unwrap().contains(says),
            "{body}: {error}"
        );
    }
    let reply = admin
        .post_raw("/api/webhooks", "application/json", b"{\"Url\":".to_vec())
        .await;
    assert_error(&reply, 400, "InvalidRequestBody");
    let listed = admin.get("/api/webhooks").await;
    assert_eq!(json_of(&listed)["value"], json!([]), "nothing was created");

    for path in ["/api/webhooks/nope", "/api/webhooks/nope/deliveries"] {
        assert_error(&admin.get(path).await, 400, "InvalidInput");
    }
    let unknown = "/api/webhooks/0b5c3f0e-1a2b-4c3d-8e9f-0a1b2c3d4e5f";
    assert_error(&admin.get(unknown).await, 404, "ResourceNotFound");
    assert_error(&admin.delete(unknown).await, 404, "ResourceNotFound");
    assert_error(
        &admin.get(&format!("{unknown}/deliveries")).await,
        404,
        "ResourceNotFound",
    );
    assert_error(
        &admin.get("/api/webhooks?%24filter=url%20eq%20'x'").await,
        400,
        "ODataError",
    );

    // Apps without Machine.ReadWrite.All, and users below Administrator or
    // reaching only some groups.
    let mut isolator = server.api().await;
    assert_error(&isolator.get("/api/webhooks").await, 403, "Forbidden");
    assert_error(
        &isolator.post("/api/webhooks", ok.clone()).await,
        403,
        "Forbidden",
    );
    create_user(
        &server,
        "resp@example.com",
        "correct horse battery",
        "Responder",
        &[],
    )
    .await;
    let mut responder = server
        .user_api("resp@example.com", "correct horse battery")
        .await;
    assert_error(&responder.get("/api/webhooks").await, 403, "Forbidden");
    // Security settings, over the web servers only.
    create_prefix_group(&server, "Web", 10, "web-", "web-admins").await;
    server
        .store()
        .create_role(store::RoleRecord {
            name: "WebSecurity".into(),
            permissions: vec!["View data".into(), "Manage security settings".into()],
            created_at: server::now_nanos(),
        })
        .await
        .unwrap();
    create_user(
        &server,
        "webadmin@example.com",
        "correct horse battery",
        "WebSecurity",
        &["web-admins"],
    )
    .await;
    let mut group_admin = server
        .user_api("webadmin@example.com", "correct horse battery")
        .await;
    let refused = assert_error(
        &group_admin.post("/api/webhooks", ok.clone()).await,
        403,
        "Forbidden",
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("every machine group"),
        "{refused}"
    );
    create_user(
        &server,
        "root@example.com",
        "correct horse battery",
        "Administrator",
        &[],
    )
    .await;
    let mut root = server
        .user_api("root@example.com", "correct horse battery")
        .await;
    let made = root.post("/api/webhooks", ok.clone()).await;
    assert_eq!(made.status, 201, "{}", json_of(&made));
    assert_eq!(json_of(&made)["createdBy"], "root@example.com");

    // At most 50.
    for _ in 1..store::MAX_WEBHOOKS {
        assert_eq!(admin.post("/api/webhooks", ok.clone()).await.status, 201);
    }
    let full = assert_error(
        &admin.post("/api/webhooks", ok.clone()).await,
        400,
        "BadRequest",
    );
    assert!(
        full["error"]["message"].as_str().unwrap().contains("50"),
        "{full}"
    );
    let id = json_of(&made)["id"].as_str().unwrap().to_owned();
    assert_eq!(
        admin.delete(&format!("/api/webhooks/{id}")).await.status,
        204
    );
    assert_error(
        &admin.get(&format!("/api/webhooks/{id}")).await,
        404,
        "ResourceNotFound",
    );
}

// ---- the command line, and a crash -------------------------------------------

fn cordon(data: &std::path::Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cordon"))
        .args(args)
        .env("CORDON_DATA_DIR", data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout_json(output: &std::process::Output) -> Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `cordon webhook create|list|deliveries|delete` as a user types them,
/// with the secret on standard input; then SIGKILL of the server while a
/// delivery waits for its receiver: after the restart it arrives, signed,
/// with the id the deliveries listing showed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_webhooks_and_a_killed_server_still_delivers() {
    let dir = TempDir::new("webhook-cli");
    let data = dir.0.join("data");
    let served = serve(&data);
    let ca_file = dir.0.join("receiver-ca.pem");
    let spare = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = spare.local_addr().unwrap();
    drop(spare);
    let (ca_pem, cert, key) = receiver_certificates();
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let secret = format!("whsec_{}", STANDARD.encode([7u8; 32]));

    // Refusals name the flag.
    let refused = cordon(
        &data,
        &[
            "webhook",
            "create",
            "--url",
            "http://x/",
            "--event",
            "machineAction.created",
        ],
        None,
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--url"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let url = format!("https://127.0.0.1:{}/hook", addr.port());
    let created = stdout_json(&cordon(
        &data,
        &[
            "webhook",
            "create",
            "--url",
            &url,
            "--event",
            "exclusionRule.changed",
            "--event",
            "audit.appended",
            "--secret-stdin",
            "--ca-file",
            ca_file.to_str().unwrap(),
            "--description",
            "crash test",
            "--json",
        ],
        Some(&format!("{secret}\n")),
    ));
    assert_eq!(created["secret"], secret.as_str());
    assert_eq!(
        created["events"],
        json!(["exclusionRule.changed", "audit.appended"])
    );
    let webhook_id = created["id"].as_str().unwrap().to_owned();
    let listed = stdout_json(&cordon(&data, &["webhook", "list", "--json"], None));
    assert_eq!(listed[0]["id"], webhook_id.as_str());
    assert!(!listed.to_string().contains("whsec_"));

    // A change through the API: an event for the webhook.
    let app = stdout_json(&cordon(
        &data,
        &[
            "app",
            "create",
            "--name",
            "Admin",
            "--permission",
            "Machine.ReadWrite.All",
            "--json",
        ],
        None,
    ));
    let ca = data.join("ca.pem");
    let http = HttpsClient::new(agent::https::tls_config(&ca).unwrap(), &served.url).unwrap();
    let token = app_token(&served.url, &ca, &app).await;
    let mut api = Api { http, token };
    let rule = api
        .post(
            "/api/isolationExclusionRules",
            json!({"Name": "ssh", "SystemdUnit": "sshd.service"}),
        )
        .await;
    assert_eq!(rule.status, 201, "{}", json_of(&rule));

    // Tried, refused (nobody listens), then the server is killed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let pending = loop {
        let listed = stdout_json(&cordon(
            &data,
            &["webhook", "deliveries", "--webhook", &webhook_id, "--json"],
            None,
        ));
        let attempted = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|d| {
                d["eventType"] == "exclusionRule.changed"
                    && !d["attempts"].as_array().unwrap().is_empty()
            })
            .cloned();
        if let Some(d) = attempted {
            break d;
        }
        assert!(std::time::Instant::now() < deadline, "{listed}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(pending["status"], "Pending", "{pending}");
    let text = cordon(&data, &["webhook", "deliveries"], None);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("exclusionRule.changed") && text.contains("no answer"),
        "{text}"
    );
    // SIGKILL, then the same command again.
    drop(served);

    let receiver = Receiver::restart(addr, ca_pem, cert, key).await;
    *receiver.secret.lock().unwrap() = secret;
    let served = serve(&data);
    let received = receiver
        .wait_for("the delivery made before the kill", |r| {
            r.iter().any(|r| r.id == pending["id"].as_str().unwrap())
        })
        .await;
    let delivered = received
        .iter()
        .find(|r| r.id == pending["id"].as_str().unwrap())
        .unwrap();
    assert!(delivered.signed);
    assert_eq!(delivered.body["type"], "exclusionRule.changed");
    assert_eq!(delivered.body["data"]["rule"]["name"], "ssh");

    let deleted = cordon(&data, &["webhook", "delete", &webhook_id], None);
    assert!(deleted.status.success());
    let listed = stdout_json(&cordon(&data, &["webhook", "list", "--json"], None));
    assert_eq!(listed, json!([]));
    let again = cordon(&data, &["webhook", "delete", &webhook_id], None);
    assert!(!again.status.success());
    drop(served);
}

// ---- what a compromised agent can put in the outbox ---------------------------

/// How many events of `event_type` the server's event log holds.
async fn events_of(server: &TestServer, event_type: &str) -> usize {
    server
        .store()
        .events_after(0, i64::MAX, 1000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.event_type == event_type)
        .count()
}

/// A hostile agent (root on an isolated machine holds its key) can't flood
/// the event log and the webhooks' outbox: its tamper reports are folded
/// into one record every 5 s, so are the changes its heartbeats report, and
/// a session sending more than 10 messages a second (after a burst of 50)
/// is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_is_folded_then_cut_off() {
    use proto::agent::ServerMessage;
    let server = TestServer::start().await;
    let agent = server.enroll("flooder").await;
    let mut session = agent.connect().await;
    let tamper_events = || events_of(&server, "machine.tamperDetected");
    for n in 0..30 {
        session
            .send(&AgentMessage::Tamper {
                detail: format!("report {n}"),
                restored: true,
            })
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut api = server.api().await;
    assert_eq!(tamper_events().await, 1);
    assert_eq!(api.machine(&agent.machine_id()).await["tamperCount"], 1);
    // The other 29, as one record, once the 5 s are up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let machine = api.machine(&agent.machine_id()).await;
        if machine["tamperCount"] == 30 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{machine}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tamper_events().await, 2);
    let last = server
        .store()
        .events_after(0, i64::MAX, 1000)
        .await
        .unwrap()
        .into_iter()
        .rfind(|e| e.event_type == "machine.tamperDetected")
        .unwrap();
    assert!(
        last.body.contains("report 29 (29 reports in 5 s)"),
        "{}",
        last.body
    );

    // Heartbeats that flip the enforced state: the first change is written
    // at once, the last one 5 s later, nothing between.
    let isolation_events = || events_of(&server, "machine.isolationChanged");
    let before = isolation_events().await;
    for n in 0..20 {
        let enforced = if n % 2 == 0 {
            Enforced::Full
        } else {
            Enforced::NotIsolated
        };
        session
            .send(&AgentMessage::Heartbeat {
                enforced,
                exclusion_version: None,
            })
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(isolation_events().await, before + 1);
    assert_eq!(
        api.machine(&agent.machine_id()).await["isolationState"],
        "Isolated"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.machine(&agent.machine_id()).await["isolationState"] != "NotIsolated" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last heartbeat's state was not written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(isolation_events().await, before + 2);

    // Past the message budget, the session is closed.
    let heartbeat = AgentMessage::Heartbeat {
        enforced: Enforced::NotIsolated,
        exclusion_version: None,
    };
    let mut refused = None;
    for _ in 0..200 {
        if session.send(&heartbeat).await.is_err() {
            break;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while refused.is_none() && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), session.recv()).await {
            Ok(Ok(ServerMessage::Refused { code, reason, .. })) => refused = Some((code, reason)),
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let (code, reason) = refused.expect("the session was refused");
    assert_eq!(code, "ProtocolError");
    assert!(reason.contains("too many messages"), "{reason}");
}
