//! The public API over HTTPS against the real server: the contract of
//! `docs/api.md`, with a test agent from the agent library.

mod common;

use std::collections::HashSet;

use common::*;
use http::Method;
use proto::agent::{AgentMessage, Enforced, ServerMessage};
use serde_json::{Value, json};

const UNKNOWN_MACHINE: &str = "0123456789abcdef0123456789abcdef01234567";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolate_is_pushed_acknowledged_and_succeeds() {
    let server = TestServer::start().await;
    let agent = server.enroll("m1").await;
    let mut session = agent.connect().await;
    let mut api = server.api().await;

    let reply = api.isolate(&agent.machine_id()).await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8")
    );
    assert_eq!(reply.header("odata-version"), Some("4.0"));
    let created = reply.json().unwrap();
    let keys: Vec<&str> = created
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "@odata.context",
            "id",
            "type",
            "title",
            "requestor",
            "requestorComment",
            "status",
            "machineId",
            "computerDnsName",
            "creationDateTimeUtc",
            "lastUpdateDateTimeUtc",
            "cancellationRequestor",
            "cancellationComment",
            "cancellationDateTimeUtc",
            "errorHResult",
            "scope",
            "externalId",
            "requestSource",
            "relatedFileInfo",
            "commands",
            "troubleshootInfo"
        ]
    );
    assert_eq!(
        created["@odata.context"],
        format!("{}/api/$metadata#MachineActions/$entity", server.url)
    );
    assert_eq!(created["type"], "Isolate");
    assert_eq!(created["status"], "Pending");
    assert_eq!(created["scope"], "Full");
    assert_eq!(created["requestor"], "Test SOAR");
    assert_eq!(created["requestSource"], "PublicApi");
    assert_eq!(created["computerDnsName"], "m1");
    assert_eq!(created["errorHResult"], 0);
    assert_eq!(created["commands"], json!([]));
    let created_at = created["creationDateTimeUtc"].as_str().unwrap();
    assert_eq!(
        created_at.len(),
        28,
        "seven fractional digits: {created_at}"
    );
    assert!(created_at.ends_with('Z'));
    let action_id = created["id"].as_str().unwrap().to_owned();

    // Pushed at once, no polling.
    let pushed = next(&mut session).await;
    assert_eq!(action_id_of(&pushed), action_id);
    assert_eq!(
        api.machine(&agent.machine_id()).await["isolationState"],
        "Isolating"
    );

    session
        .send(&AgentMessage::Ack {
            action_id: action_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        next(&mut session).await,
        ServerMessage::Proceed {
            action_id: action_id.clone()
        }
    );
    api.wait_status(&action_id, "InProgress").await;
    report(&mut session, &action_id, true, Enforced::Full).await;
    let done = api.wait_status(&action_id, "Succeeded").await;
    assert!(done["lastUpdateDateTimeUtc"].as_str() > done["creationDateTimeUtc"].as_str());
    let machine = api.machine(&agent.machine_id()).await;
    assert_eq!(machine["isolationState"], "Isolated");
    assert_eq!(machine["isolationScope"], "Full");

    // And back.
    let reply = api.unisolate(&agent.machine_id()).await;
    assert_eq!(reply.status, 201);
    let release = reply.json().unwrap();
    assert_eq!(release["type"], "Unisolate");
    assert_eq!(release["scope"], Value::Null);
    let release_id = release["id"].as_str().unwrap().to_owned();
    assert_eq!(action_id_of(&next(&mut session).await), release_id);
    assert_eq!(
        api.machine(&agent.machine_id()).await["isolationState"],
        "Releasing"
    );
    execute(&mut session, &release_id, true, Enforced::NotIsolated).await;
    api.wait_status(&release_id, "Succeeded").await;
    let machine = api.machine(&agent.machine_id()).await;
    assert_eq!(machine["isolationState"], "NotIsolated");
    assert_eq!(machine["isolationScope"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_apply_is_reported_with_its_reason() {
    let server = TestServer::start().await;
    let agent = server.enroll("m1").await;
    let mut session = agent.connect().await;
    let mut api = server.api().await;
    let id = api.isolate_action(&agent.machine_id()).await;
    next(&mut session).await;
    execute(&mut session, &id, false, Enforced::NotIsolated).await;
    let failed = api.wait_status(&id, "Failed").await;
    assert_ne!(failed["errorHResult"], 0);
    assert_eq!(failed["troubleshootInfo"], "could not apply the ruleset");
    assert_eq!(
        api.machine(&agent.machine_id()).await["isolationState"],
        "NotIsolated"
    );
}

/// A machine revoked while its agent is connected is disconnected within
/// ten seconds (the server polls the revoked machines); the other
/// machines' sessions stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_machine_revoked_is_disconnected_within_ten_seconds() {
    let server = TestServer::start().await;
    let revoked = server.enroll("m1").await;
    let kept = server.enroll("m2").await;
    let mut revoked_session = revoked.connect().await;
    let mut kept_session = kept.connect().await;
    server
        .store()
        .revoke_machine(&revoked.machine_id())
        .await
        .unwrap();
    // Ten seconds, and a margin for a loaded machine.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            match revoked_session.recv().await {
                Ok(ServerMessage::Refused { code, .. }) => break Some(code),
                Ok(_) => continue,
                Err(_) => break None,
            }
        }
    })
    .await
    .expect("disconnected within ten seconds");
    assert_eq!(closed.as_deref(), Some("Revoked"));
    // The other session still carries actions.
    let mut api = server.api().await;
    let id = api.isolate_action(&kept.machine_id()).await;
    loop {
        if let ServerMessage::Action(order) = next(&mut kept_session).await {
            assert_eq!(order.action_id, id);
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_isolation_action_in_flight_per_machine() {
    let server = TestServer::start().await;
    let agent = server.enroll("m1").await;
    let mut api = server.api().await;
    let first = api.isolate(&agent.machine_id()).await.json().unwrap();
    for second in [
        api.isolate(&agent.machine_id()).await,
        api.unisolate(&agent.machine_id()).await,
    ] {
        let body = assert_error(&second, 400, "ActiveRequestAlreadyExists");
        assert_eq!(body["error"]["message"], "Action is already in progress");
        assert_eq!(body["error"]["activeActionId"], first["id"]);
    }

    // Racing requests for another machine: exactly one 201.
    let other = server.enroll("m2").await;
    let mut handles = Vec::new();
    for _ in 0..8 {
        let token = api.token.clone();
        let mut racer = Api {
            http: server.https(),
            token,
        };
        let machine = other.machine_id();
        handles.push(tokio::spawn(async move {
            racer.isolate(&machine).await.status.as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for h in handles {
        statuses.push(h.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 400).count(),
        7,
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_applies_to_pending_only() {
    let server = TestServer::start().await;
    let agent = server.enroll("m1").await;
    let mut api = server.api().await;
    let id = api.isolate_action(&agent.machine_id()).await;

    let reply = api
        .post(
            &format!("/api/machineactions/{id}/cancel"),
            json!({"Comment": "wrong machine"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let cancelled = reply.json().unwrap();
    assert_eq!(cancelled["status"], "Cancelled");
    assert_eq!(cancelled["cancellationRequestor"], "Test SOAR");
    assert_eq!(cancelled["cancellationComment"], "wrong machine");
    assert!(cancelled["cancellationDateTimeUtc"].is_string());
    assert_eq!(
        api.machine(&agent.machine_id()).await["isolationState"],
        "NotIsolated"
    );

    let again = api
        .post(&format!("/api/machineactions/{id}/cancel"), json!({}))
        .await;
    let body = assert_error(&again, 400, "BadRequest");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Cancelled")
    );

    // A cancelled action is withdrawn if the agent tries to start it.
    let mut session = agent.connect().await;
    session
        .send(&AgentMessage::Ack {
            action_id: id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        next(&mut session).await,
        ServerMessage::Withdrawn {
            action_id: id.clone(),
            status: "Cancelled".into()
        }
    );
    assert_eq!(api.action(&id).await["status"], "Cancelled");

    // An InProgress action can't be cancelled.
    let id = api.isolate_action(&agent.machine_id()).await;
    assert_eq!(action_id_of(&next(&mut session).await), id);
    session
        .send(&AgentMessage::Ack {
            action_id: id.clone(),
        })
        .await
        .unwrap();
    next(&mut session).await;
    let reply = api
        .post(
            &format!("/api/machineactions/{id}/cancel"),
            json!({"Comment": "x"}),
        )
        .await;
    let body = assert_error(&reply, 400, "BadRequest");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("InProgress")
    );

    let reply = api
        .post(
            "/api/machineactions/00000000-0000-4000-8000-000000000000/cancel",
            json!({}),
        )
        .await;
    assert_error(&reply, 404, "ResourceNotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_actions_time_out() {
    let server =
        TestServer::start_with(|c| c.action_expiry = std::time::Duration::from_secs(1)).await;
    let agent = server.enroll("m1").await;
    let mut api = server.api().await;
    let id = api.isolate_action(&agent.machine_id()).await;
    assert_eq!(api.action(&id).await["status"], "Pending");
    let timed_out = api.wait_status(&id, "TimeOut").await;
    assert!(timed_out["troubleshootInfo"].is_string());
    assert_eq!(timed_out["errorHResult"], 0);
    assert_eq!(
        api.machine(&agent.machine_id()).await["isolationState"],
        "NotIsolated"
    );
    // The machine is free for a new request.
    assert_eq!(api.isolate(&agent.machine_id()).await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_agent_gets_pending_actions_on_reconnect() {
    let server = TestServer::start().await;
    let agent = server.enroll("m1").await;
    let mut api = server.api().await;
    let id = api.isolate_action(&agent.machine_id()).await;
    let mut session = agent.connect().await;
    assert_eq!(action_id_of(&next(&mut session).await), id);
    // Not acknowledged: delivered again to the next session.
    drop(session);
    let mut session = agent.connect().await;
    assert_eq!(action_id_of(&next(&mut session).await), id);
    execute(&mut session, &id, true, Enforced::Full).await;
    api.wait_status(&id, "Succeeded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_touch_another_machines_actions() {
    let server = TestServer::start().await;
    let victim = server.enroll("victim").await;
    let intruder = server.enroll("intruder").await;
    let mut api = server.api().await;
    let id = api.isolate_action(&victim.machine_id()).await;

    let mut session = intruder.connect().await;
    session
        .send(&AgentMessage::Ack {
            action_id: id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        next(&mut session).await,
        ServerMessage::Withdrawn {
            action_id: id.clone(),
            status: "NotFound".into()
        }
    );
    session
        .send(&AgentMessage::Result {
            action_id: id.clone(),
            succeeded: false,
            error_h_result: 1,
            reason: Some("forged".into()),
            enforced: Enforced::NotIsolated,
        })
        .await
        .unwrap();
    session
        .send(&AgentMessage::Heartbeat {
            enforced: Enforced::NotIsolated,
            exclusion_version: None,
        })
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let action = api.action(&id).await;
    assert_eq!(action["status"], "Pending");
    assert_eq!(action["troubleshootInfo"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_need_the_enrolled_key_and_an_unrevoked_machine() {
    let server = TestServer::start().await;
    let agent = server.enroll("m1").await;
    let other = server.enroll("m2").await;

    // m2's key can't open m1's session.
    let forged = agent::Identity {
        machine_id: agent.machine_id(),
        server: other.identity.server.clone(),
        name: None,
        key: agent::Identity::load(&other.state.0).unwrap().key,
        tls: other.identity.tls.clone(),
        state_dir: other.state.0.clone(),
    };
    let err = agent::Session::open(&forged, agent::host_facts(None), Enforced::NotIsolated)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("InvalidProof"), "{err}");

    server
        .store()
        .revoke_machine(&agent.machine_id())
        .await
        .unwrap();
    let err = agent::Session::open(
        &agent.identity,
        agent::host_facts(None),
        Enforced::NotIsolated,
    )
    .await
    .err()
    .expect("refused");
    assert!(err.to_string().contains("Revoked"), "{err}");

    // Enrollment with an unknown token changes nothing.
    let dir = TempDir::new("agent");
    let err = agent::enroll(&server.url, "not-a-token", &server.ca, &dir.0, Some("m3"))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("EnrollTokenRejected"), "{err}");
    let mut api = server.api().await;
    assert_eq!(
        api.get("/api/machines").await.json().unwrap()["value"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_facts_fill_the_machine() {
    let server = TestServer::start().await;
    let agent = server.enroll("web-01").await;
    let mut session = agent.connect().await;
    session
        .send(&AgentMessage::Heartbeat {
            enforced: Enforced::NotIsolated,
            exclusion_version: None,
        })
        .await
        .unwrap();
    session
        .send(&AgentMessage::Facts(proto::agent::HostFacts {
            computer_dns_name: "web-01.corp.example".into(),
            os_platform: Some("Linux".into()),
            os_version: Some("12".into()),
            addresses: vec![proto::agent::HostAddress {
                ip_address: "198.18.0.11".into(),
                mac_address: Some("02:00:00:00:00:01".into()),
                interface_type: Some("Ethernet".into()),
                operational_status: Some("Up".into()),
            }],
            ..Default::default()
        }))
        .await
        .unwrap();
    let mut api = server.api().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let machine = loop {
        let m = api.machine(&agent.machine_id()).await;
        if m["computerDnsName"] == "web-01.corp.example" || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        machine["@odata.context"],
        format!("{}/api/$metadata#Machines/$entity", server.url)
    );
    assert_eq!(machine["id"].as_str().unwrap().len(), 40);
    assert_eq!(machine["computerDnsName"], "web-01.corp.example");
    assert_eq!(machine["osPlatform"], "Linux");
    assert_eq!(machine["healthStatus"], "Active");
    assert_eq!(machine["onboardingStatus"], "Onboarded");
    assert_eq!(machine["lastIpAddress"], "198.18.0.11");
    assert_eq!(machine["ipAddresses"][0]["macAddress"], "02:00:00:00:00:01");
    assert_eq!(machine["isolationState"], "NotIsolated");
    assert!(machine["lastSeen"].is_string());
    // By name as well as by id.
    assert_eq!(
        api.machine("web-01.corp.example").await["id"],
        machine["id"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_the_contracts_errors_and_change_nothing() {
    let server = TestServer::start().await;
    let agent = server.enroll("m1").await;
    let mut api = server.api().await;
    let path = format!("/api/machines/{}/isolate", agent.machine_id());
    let long = "x".repeat(4001);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed",
            b"{\"Comment\": ".to_vec(),
            400,
            "InvalidRequestBody",
        ),
        ("not json", b"Comment=x".to_vec(), 400, "InvalidRequestBody"),
        ("empty", Vec::new(), 400, "InvalidRequestBody"),
        (
            "array",
            b"[{\"Comment\":\"x\"}]".to_vec(),
            400,
            "InvalidRequestBody",
        ),
        ("string", b"\"isolate\"".to_vec(), 400, "InvalidRequestBody"),
        (
            "comment missing",
            b"{}".to_vec(),
            400,
            "MissingRequiredParameter",
        ),
        (
            "comment null",
            b"{\"Comment\":null}".to_vec(),
            400,
            "MissingRequiredParameter",
        ),
        (
            "comment empty",
            b"{\"Comment\":\"\"}".to_vec(),
            400,
            "MissingRequiredParameter",
        ),
        (
            "comment number",
            b"{\"Comment\":5}".to_vec(),
            400,
            "InvalidRequestBody",
        ),
        (
            "comment too long",
            format!("{{\"Comment\":\"{long}\"}}").into_bytes(),
            400,
            "InvalidInput",
        ),
        (
            "type unknown",
            b"{\"Comment\":\"x\",\"IsolationType\":\"Partial\"}".to_vec(),
            400,
            "InvalidInput",
        ),
        (
            "type number",
            b"{\"Comment\":\"x\",\"IsolationType\":1}".to_vec(),
            400,
            "InvalidRequestBody",
        ),
        (
            "external id object",
            b"{\"Comment\":\"x\",\"ExternalId\":{}}".to_vec(),
            400,
            "InvalidRequestBody",
        ),
    ];
    for (label, body, status, code) in cases {
        let reply = api.post_raw(&path, "application/json", body).await;
        assert_eq!(reply.status.as_u16(), status, "{label}: {:?}", reply.body);
        assert_error(&reply, status, code);
    }
    let reply = api
        .post_raw(&path, "text/plain", b"{\"Comment\":\"x\"}".to_vec())
        .await;
    assert_error(&reply, 415, "UnsupportedMediaType");
    let huge = format!("{{\"Comment\":\"{}\"}}", "x".repeat(70 * 1024));
    let reply = api
        .post_raw(&path, "application/json", huge.into_bytes())
        .await;
    assert_error(&reply, 413, "RequestEntityTooLarge");
    for bad_id in [
        "abc",
        "0123456789abcdef0123456789abcdef0123456g",
        "'%20OR%201=1",
    ] {
        let reply = api
            .post(
                &format!("/api/machines/{bad_id}/isolate"),
                json!({"Comment": "x"}),
            )
            .await;
        assert_error(&reply, 400, "InvalidInput");
    }
    let reply = api
        .post(
            &format!("/api/machines/{UNKNOWN_MACHINE}/isolate"),
            json!({"Comment": "x"}),
        )
        .await;
    let body = assert_error(&reply, 404, "ResourceNotFound");
    assert_eq!(
        body["error"]["message"],
        format!("Machine {UNKNOWN_MACHINE} was not found.")
    );
    let reply = api.get("/api/machineactions/not-a-guid").await;
    assert_error(&reply, 400, "InvalidInput");
    let reply = api
        .get("/api/machineactions/00000000-0000-4000-8000-000000000000")
        .await;
    assert_error(&reply, 404, "ResourceNotFound");

    // Nothing of the above created an action.
    let list = api.get("/api/machineactions").await.json().unwrap();
    assert_eq!(list["value"], json!([]));

    // Unknown fields and nulls are fine; the type is matched case-insensitively.
    let reply = api
        .post(&path, json!({"Comment": "x", "IsolationType": "selective", "ExternalId": null, "Title": null, "Extra": [1]}))
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    assert_eq!(reply.json().unwrap()["scope"], "Selective");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_checked_in_the_contracts_order() {
    let server = TestServer::start().await;
    let (reader_id, reader_secret) =
        create_app(server.store(), "Reader", &["Machine.Read.All"]).await;
    let reader_token = server.token_for(&reader_id, &reader_secret).await;
    let mut reader = Api {
        http: server.https(),
        token: reader_token,
    };
    // 403 before 404: the reader has no isolate permission.
    let reply = reader.isolate(UNKNOWN_MACHINE).await;
    assert_error(&reply, 403, "Forbidden");
    // 403 before 415 and 400.
    let reply = reader
        .post_raw(
            &format!("/api/machines/{UNKNOWN_MACHINE}/isolate"),
            "text/plain",
            b"x".to_vec(),
        )
        .await;
    assert_error(&reply, 403, "Forbidden");
    // 413 before 401.
    let mut anonymous = server.https();
    let reply = anonymous
        .request(
            Method::POST,
            &format!("/api/machines/{UNKNOWN_MACHINE}/isolate"),
            &[("content-type", "application/json")],
            vec![b' '; 65 * 1024],
        )
        .await
        .unwrap();
    assert_error(&reply, 413, "RequestEntityTooLarge");
    // 401 before anything else, with WWW-Authenticate.
    let reply = anonymous
        .request(Method::GET, "/api/machines", &[], Vec::new())
        .await
        .unwrap();
    assert_error(&reply, 401, "Unauthorized");
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    // 415 before 400.
    let agent = server.enroll("m1").await;
    let mut api = server.api().await;
    let reply = api
        .post_raw(
            &format!("/api/machines/{}/isolate", agent.machine_id()),
            "text/plain",
            b"not json".to_vec(),
        )
        .await;
    assert_error(&reply, 415, "UnsupportedMediaType");
    // 400 (body) before 404.
    let reply = api
        .post(
            &format!("/api/machines/{UNKNOWN_MACHINE}/isolate"),
            json!({}),
        )
        .await;
    assert_error(&reply, 400, "MissingRequiredParameter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_paths_and_prefixes() {
    let server = TestServer::start().await;
    let mut api = server.api().await;
    let auth = format!("Bearer {}", api.token);
    let reply = api
        .http
        .request(
            Method::DELETE,
            "/api/machines",
            &[("authorization", &auth)],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 405);
    assert!(reply.header("allow").unwrap().contains("GET"));
    assert!(reply.body.is_empty());
    let reply = api
        .http
        .request(
            Method::GET,
            &format!("/api/machines/{UNKNOWN_MACHINE}/isolate"),
            &[("authorization", &auth)],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("POST"));
    assert!(reply.header("request-id").is_some());

    let reply = api.get("/api/v1.0/machines").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json().unwrap()["@odata.context"],
        format!("{}/api/$metadata#Machines", server.url)
    );
    assert_error(&api.get("/api/nothing-here").await, 404, "ResourceNotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let server = TestServer::start_with(|c| c.rate_limit_per_minute = 3).await;
    let mut api = server.api().await;
    for _ in 0..3 {
        assert_eq!(api.get("/api/machines").await.status, 200);
    }
    let reply = api.get("/api/machines").await;
    assert_error(&reply, 429, "TooManyRequests");
    let wait: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait));
    // Per endpoint: another endpoint still answers.
    assert_eq!(api.get("/api/machineactions").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_filter_sort_count_select_and_page() {
    let server = TestServer::start().await;
    let mut api = server.api().await;
    let mut machines = Vec::new();
    for i in 0..25 {
        machines.push(server.enroll(&format!("host-{i:02}")).await.machine_id());
    }
    let mut action_ids = HashSet::new();
    for id in &machines {
        let reply = api.isolate(id).await;
        assert_eq!(reply.status, 201);
        action_ids.insert(reply.json().unwrap()["id"].as_str().unwrap().to_owned());
    }

    // Following every nextLink yields each result once.
    let mut seen = Vec::new();
    let mut link = Some("/api/machineactions?pageSize=10&$count=true".to_owned());
    let mut pages = 0;
    while let Some(path) = link {
        let page = api.get(&path).await.json().unwrap();
        assert_eq!(page["@odata.count"], 25);
        for item in page["value"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        link = page["@odata.nextLink"].as_str().map(|l| {
            assert!(l.starts_with(&server.url), "absolute: {l}");
            l[server.url.len()..].to_owned()
        });
        pages += 1;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), action_ids);

    // $top caps the total across pages.
    let mut total = 0;
    let mut link =
        Some("/api/machines?$top=15&pageSize=10&$orderby=computerDnsName%20desc".to_owned());
    let mut names = Vec::new();
    while let Some(path) = link {
        let page = api.get(&path).await.json().unwrap();
        for m in page["value"].as_array().unwrap() {
            names.push(m["computerDnsName"].as_str().unwrap().to_owned());
        }
        total += page["value"].as_array().unwrap().len();
        link = page["@odata.nextLink"]
            .as_str()
            .map(|l| l[server.url.len()..].to_owned());
    }
    assert_eq!(total, 15);
    assert_eq!(names.first().map(String::as_str), Some("host-24"));
    assert!(names.windows(2).all(|w| w[0] > w[1]), "{names:?}");

    let page = api.get("/api/machines?$filter=startswith(computerDnsName,'host-1')%20and%20isolationState%20eq%20'Isolating'&$select=id,computerDnsName").await.json().unwrap();
    let value = page["value"].as_array().unwrap();
    assert_eq!(value.len(), 10);
    assert_eq!(value[0].as_object().unwrap().len(), 2, "{}", value[0]);

    let filter = format!(
        "/api/machineactions?$filter=machineId%20eq%20'{}'%20and%20status%20in%20('Pending','InProgress')",
        machines[3]
    );
    let page = api.get(&filter).await.json().unwrap();
    assert_eq!(page["value"].as_array().unwrap().len(), 1);
    let page = api.get("/api/machineactions?$filter=creationDateTimeUtc%20gt%202020-01-01T00:00:00Z&$top=2&$skip=1").await.json().unwrap();
    assert_eq!(page["value"].as_array().unwrap().len(), 2);
    let page = api
        .get("/api/machineactions?$filter=status%20eq%20'x''%20OR%201=1%20--'")
        .await
        .json()
        .unwrap();
    assert_eq!(page["value"], json!([]));

    for bad in [
        "$top=-1",
        "$top=999999999",
        "$top=abc",
        "$skip=-3",
        "$filter=nosuchfield%20eq%201",
        "$filter=status%20eq",
        "$filter=((((",
        "$orderby=nosuch",
        "$expand=x",
        "$count=maybe",
        "$filter=status%20eq%20'a';DROP%20TABLE%20actions",
        "$select=nosuch",
        "$skiptoken=zzz",
    ] {
        let reply = api.get(&format!("/api/machineactions?{bad}")).await;
        assert_error(&reply, 400, "ODataError");
    }
    assert_eq!(api.get("/api/machineactions?$top=10000").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_the_served_paths() {
    let server = TestServer::start().await;
    let mut http = server.https();
    let reply = http
        .request(Method::GET, "/api/openapi.json", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let doc = reply.json().unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(doc["servers"][0]["url"], format!("{}/api", server.url));
    for path in [
        "/machines",
        "/machines/{id}",
        "/machines/{id}/isolate",
        "/machines/{id}/unisolate",
        "/machines/isolate",
        "/machines/unisolate",
        "/machineactions",
        "/machineactions/{id}",
        "/machineactions/{id}/cancel",
        "/isolationExclusionRules",
        "/isolationExclusionRules/{id}",
        "/auditEvents",
        "/me",
        "/events",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_tags_are_added_removed_validated_and_filterable() {
    let server = TestServer::start().await;
    let agent = server.enroll("web-7").await;
    let (admin, secret) = create_app(
        server.store(),
        "Tagger",
        &["Machine.ReadWrite.All", "Machine.Read.All"],
    )
    .await;
    let mut api = Api {
        http: server.https(),
        token: server.token_for(&admin, &secret).await,
    };
    let path = format!("/api/machines/{}/tags", agent.machine_id());
    let reply = api
        .post(&path, json!({"Value": "tier-1 servers", "Action": "Add"}))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(
        reply.json().unwrap()["machineTags"],
        json!(["tier-1 servers"])
    );
    // Tags compare without regard to case: no second copy in another case.
    let reply = api
        .post(&path, json!({"Value": "TIER-1 Servers", "Action": "Add"}))
        .await;
    assert_eq!(
        reply.json().unwrap()["machineTags"],
        json!(["tier-1 servers"])
    );
    let page = api
        .get("/api/machines?$filter=machineTags/any(t:%20t%20eq%20'tier-1%20servers')")
        .await
        .json()
        .unwrap();
    assert_eq!(page["value"].as_array().unwrap().len(), 1);
    let reply = api
        .post(
            &path,
            json!({"Value": "Tier-1 Servers", "Action": "remove"}),
        )
        .await;
    assert_eq!(reply.json().unwrap()["machineTags"], json!([]));

    let long = "x".repeat(201);
    for (body, code) in [
        (
            json!({"Value": "", "Action": "Add"}),
            "MissingRequiredParameter",
        ),
        (json!({"Action": "Add"}), "MissingRequiredParameter"),
        (json!({"Value": long, "Action": "Add"}), "InvalidInput"),
        (json!({"Value": 5, "Action": "Add"}), "InvalidRequestBody"),
        (json!({"Value": "a", "Action": "Toggle"}), "InvalidInput"),
        (json!({"Value": "a"}), "MissingRequiredParameter"),
    ] {
        assert_error(&api.post(&path, body).await, 400, code);
    }
    assert_error(
        &api.post(
            &format!("/api/machines/{UNKNOWN_MACHINE}/tags"),
            json!({"Value": "a", "Action": "Add"}),
        )
        .await,
        404,
        "ResourceNotFound",
    );
    // The isolate-and-read app may not change tags.
    let mut reader = server.api().await;
    assert_error(
        &reader
            .post(&path, json!({"Value": "a", "Action": "Add"}))
            .await,
        403,
        "Forbidden",
    );
}

/// The console: every page path answers with the page (tenant filled in,
/// strict policy, never cached); files come with a validator; anything else
/// under `/console/` is the API's 404, never a file of the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_with_its_policy_and_nothing_else() {
    let server = TestServer::start().await;
    let mut http = server.https();
    let machine = "0123456789abcdef0123456789abcdef01234567";
    for path in [
        "/".to_owned(),
        format!("/machines/{machine}"),
        "/actions".to_owned(),
        "/exclusions".to_owned(),
        "/audit".to_owned(),
    ] {
        let page = http
            .request(Method::GET, &path, &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(page.status, 200, "{path}");
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(page.header("cache-control"), Some("no-store"));
        assert_eq!(page.header("x-frame-options"), Some("DENY"));
        let csp = page.header("content-security-policy").unwrap();
        assert!(
            csp.starts_with("default-src 'none'; script-src 'self' 'sha256-"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe"), "{csp}");
        let html = String::from_utf8(page.body.to_vec()).unwrap();
        assert!(
            html.contains(&format!(
                "<meta name=\"cordon-tenant\" content=\"{}\">",
                server.tenant()
            )),
            "{html}"
        );
    }

    let app = http
        .request(Method::GET, "/console/app.js", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(app.status, 200);
    assert_eq!(
        app.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(app.header("x-content-type-options"), Some("nosniff"));
    let tag = app.header("etag").unwrap().to_owned();
    let again = http
        .request(
            Method::GET,
            "/console/app.js",
            &[("if-none-match", &tag)],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());

    for path in [
        "/console/nothing.js",
        "/console/../Cargo.toml",
        "/console/%2e%2e/src/console.rs",
        "/console/index.html",
        "/console/package.json",
    ] {
        let reply = http
            .request(Method::GET, path, &[], Vec::new())
            .await
            .unwrap();
        assert_error(&reply, 404, "ResourceNotFound");
    }
}
