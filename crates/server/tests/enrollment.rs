//! Enrollment's limits (item 5 of issue 9) and the agent protocol's order
//! and ranges, as the server enforces them.

mod common;

use std::time::Duration;

use agent::Reply;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use http::Method;
use proto::agent::{AgentMessage, EnrollRequest, HostAddress, HostFacts};
use serde_json::Value;

fn new_key() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

fn facts(name: &str) -> HostFacts {
    HostFacts {
        computer_dns_name: name.into(),
        os_platform: Some("Linux".into()),
        addresses: vec![HostAddress {
            ip_address: "198.18.0.20".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `POST /agent/v1/enroll` as an agent would send it, signed by `key`.
async fn enroll_raw(
    server: &TestServer,
    token: &str,
    key: &Ed25519KeyPair,
    facts: HostFacts,
) -> Reply {
    let public_key = STANDARD.encode(key.public_key().as_ref());
    let proof = STANDARD.encode(
        key.sign(&proto::agent::enroll_proof_message(token, &public_key))
            .as_ref(),
    );
    let request = EnrollRequest {
        token: token.into(),
        public_key,
        proof,
        facts,
    };
    server
        .https()
        .request(
            Method::POST,
            proto::agent::ENROLL_PATH,
            &[("content-type", "application/json")],
            serde_json::to_vec(&request).unwrap(),
        )
        .await
        .unwrap()
}

fn agent_error(reply: &Reply, status: u16, code: &str) -> String {
    assert_eq!(
        reply.status,
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let body: Value = reply.json().unwrap();
    assert_eq!(body["code"], code, "{body}");
    body["reason"].as_str().unwrap().to_owned()
}

async fn machine_count(server: &TestServer) -> usize {
    let mut api = server.api().await;
    api.get("/api/machines").await.json().unwrap()["value"]
        .as_array()
        .unwrap()
        .len()
}

async fn token_uses(server: &TestServer) -> Vec<i64> {
    server
        .store()
        .list_enroll_tokens()
        .await
        .unwrap()
        .iter()
        .map(|t| t.uses)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_public_key_enrolls_once() {
    let server = TestServer::start().await;
    let token = server.enroll_token().await;
    let key = new_key();
    let first = enroll_raw(&server, &token, &key, facts("k1")).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let machine_id = first.json().unwrap()["machineId"]
        .as_str()
        .unwrap()
        .to_owned();

    let second = enroll_raw(&server, &token, &key, facts("k1-again")).await;
    let reason = agent_error(&second, 409, "KeyAlreadyEnrolled");
    assert!(reason.contains(&machine_id), "{reason}");
    assert_eq!(machine_count(&server).await, 1);
    assert_eq!(
        token_uses(&server).await,
        vec![1],
        "the refused one used nothing"
    );
}

/// Unicode format characters and separators that change how the text around
/// them is shown (bidirectional embeddings, overrides and isolates,
/// zero-width characters, the byte order mark, line and paragraph separators).
const SPOOFS: [&str; 16] = [
    "\u{202A}", "\u{202B}", "\u{202C}", "\u{202D}", "\u{202E}", "\u{2066}", "\u{2067}", "\u{2068}",
    "\u{2069}", "\u{200B}", "\u{200C}", "\u{200D}", "\u{200F}", "\u{FEFF}", "\u{2028}", "\u{2029}",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_facts_are_checked_at_enrollment_and_later() {
    let server = TestServer::start().await;
    let token = server.enroll_token().await;

    let mut not_an_ip = facts("bad-1");
    not_an_ip.addresses[0].ip_address = "not-an-ip".into();
    let many = HostFacts {
        addresses: (0..65)
            .map(|i| HostAddress {
                ip_address: format!("198.18.0.{}", i + 1),
                ..Default::default()
            })
            .collect(),
        ..facts("bad-2")
    };
    let long = HostFacts {
        os_version: Some("x".repeat(5000)),
        ..facts("bad-3")
    };
    let control = HostFacts {
        agent_version: Some("1.0\u{1b}[31m".into()),
        ..facts("bad-4")
    };
    let mut cases = vec![
        (not_an_ip, "addresses[0].ipAddress".to_owned()),
        (many, "65 addresses".to_owned()),
        (long, "osVersion".to_owned()),
        (control, "agentVersion".to_owned()),
    ];
    // Unicode format characters and line separators were once accepted:
    // bidirectional overrides, zero-width characters and the like can make
    // what an analyst sees differ from what is stored.
    for (i, spoof) in SPOOFS.iter().enumerate() {
        let mut bad = facts(&format!("spoof-{i}"));
        let field = match i % 4 {
            0 => {
                bad.os_platform = Some(format!("Windows{spoof}11"));
                "osPlatform"
            }
            1 => {
                bad.os_version = Some(format!("{spoof}24.04"));
                "osVersion"
            }
            2 => {
                bad.os_processor = Some(format!("x86{spoof}"));
                "osProcessor"
            }
            _ => {
                bad.addresses[0].interface_type = Some(format!("Eth{spoof}ernet"));
                "addresses[0].interfaceType"
            }
        };
        cases.push((bad, field.to_owned()));
    }
    for (bad, field) in cases {
        let reply = enroll_raw(&server, &token, &new_key(), bad).await;
        let reason = agent_error(&reply, 400, "InvalidFacts");
        assert!(reason.contains(&field), "{reason}");
    }
    assert_eq!(machine_count(&server).await, 0);
    assert_eq!(token_uses(&server).await, vec![0]);

    // Exactly the bound is fine.
    let at_bound = HostFacts {
        addresses: (0..64)
            .map(|i| HostAddress {
                ip_address: format!("198.18.1.{}", i + 1),
                ..Default::default()
            })
            .collect(),
        ..facts("ok-1")
    };
    assert_eq!(
        enroll_raw(&server, &token, &new_key(), at_bound)
            .await
            .status,
        200
    );

    // Later reports are held to the same checks: a bad one stores nothing.
    let agent = server.enroll("web-02").await;
    let mut session = agent.connect().await;
    let mut bad = facts("renamed-by-bad-facts");
    bad.addresses[0].ip_address = "999.1.1.1".into();
    session.send(&AgentMessage::Facts(bad)).await.unwrap();
    let spoofed = HostFacts {
        os_version: Some("11\u{202E}".into()),
        ..facts("renamed-by-spoofed-facts")
    };
    session.send(&AgentMessage::Facts(spoofed)).await.unwrap();
    session
        .send(&AgentMessage::Facts(facts("web-02.corp.example")))
        .await
        .unwrap();
    let mut api = server.api().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let machine = api.machine(&agent.machine_id()).await;
        assert_ne!(machine["computerDnsName"], "renamed-by-bad-facts");
        assert_ne!(machine["computerDnsName"], "renamed-by-spoofed-facts");
        if machine["computerDnsName"] == "web-02.corp.example" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{machine}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 1,000 enrollment attempts once ran in 2.6 s with nothing to slow them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_attempts_are_rate_limited_per_source_and_in_total() {
    let server = TestServer::start_with(|config| {
        config.enroll_per_source_per_minute = 3;
        config.enroll_per_minute = 0;
    })
    .await;
    let token = server.enroll_token().await;
    for i in 0..3 {
        let reply = enroll_raw(&server, &token, &new_key(), facts(&format!("r{i}"))).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    // Refused ones count too, before any work, and nothing is stored.
    let reply = enroll_raw(&server, &token, &new_key(), facts("r3")).await;
    agent_error(&reply, 429, "TooManyRequests");
    let wait: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(machine_count(&server).await, 3);

    let server = TestServer::start_with(|config| {
        config.enroll_per_source_per_minute = 0;
        config.enroll_per_minute = 2;
    })
    .await;
    for _ in 0..2 {
        let reply = enroll_raw(&server, "not-a-token", &new_key(), facts("t")).await;
        agent_error(&reply, 403, "EnrollTokenRejected");
    }
    let reply = enroll_raw(&server, "not-a-token", &new_key(), facts("t")).await;
    agent_error(&reply, 429, "TooManyRequests");
    assert!(reply.header("retry-after").is_some());
}

// ---- the session's order and ranges ------------------------------------

/// A `result` for an action the server never sent `proceed` for was once
/// recorded: an agent (or someone holding its key) could finish an action
/// that a cancel had already stopped, or skip the handshake altogether.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_without_proceed_is_a_protocol_error_and_changes_nothing() {
    use proto::agent::{Enforced, ServerMessage};
    let server = TestServer::start().await;
    let agent = server.enroll("m1").await;
    let mut api = server.api().await;
    let mut session = agent.connect().await;
    let id = api.isolate_action(&agent.machine_id()).await;
    assert_eq!(action_id_of(&next(&mut session).await), id);
    report(&mut session, &id, true, Enforced::Full).await;
    match next(&mut session).await {
        ServerMessage::Refused {
            code,
            reason,
            retry_after_seconds,
        } => {
            assert_eq!(code, "ProtocolError");
            // Not a refusal to come back from later.
            assert_eq!(retry_after_seconds, None);
            assert!(reason.contains("proceed"), "{reason}");
        }
        other => panic!("expected the session to be refused, got {other:?}"),
    }
    let action = api.action(&id).await;
    assert_eq!(action["status"], "Pending");
    let machine = api.machine(&agent.machine_id()).await;
    // Still waiting for its agent; nothing recorded as in force.
    assert_eq!(machine["isolationState"], "Isolating", "{machine}");
    assert_eq!(machine["isolationScope"], Value::Null, "{machine}");

    // Cancelled: never proceeded either.
    let mut session = agent.connect().await;
    assert_eq!(action_id_of(&next(&mut session).await), id);
    let cancel = api
        .post(
            &format!("/api/machineactions/{id}/cancel"),
            serde_json::json!({"Comment": "not this one"}),
        )
        .await;
    assert_eq!(cancel.status, 200, "{:?}", cancel.body);
    report(&mut session, &id, true, Enforced::Full).await;
    assert!(matches!(
        next(&mut session).await,
        ServerMessage::Refused { .. }
    ));
    assert_eq!(api.action(&id).await["status"], "Cancelled");

    // The documented order still works: ack, proceed, result.
    let mut session = agent.connect().await;
    let id = api.isolate_action(&agent.machine_id()).await;
    assert_eq!(action_id_of(&next(&mut session).await), id);
    execute(&mut session, &id, true, Enforced::Full).await;
    api.wait_status(&id, "Succeeded").await;
}

/// A heartbeat's exclusion version was stored whatever it said, isolated
/// Selectively or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusion_version_counts_only_in_range_and_when_selective() {
    use proto::agent::Enforced;
    let server = TestServer::start().await;
    let agent = server.enroll("m1").await;
    let mut api = server.api().await;
    let mut session = agent.connect().await;
    for (enforced, version) in [
        (Enforced::NotIsolated, Some(0)),
        (Enforced::Full, Some(0)),
        (Enforced::Selective, Some(i64::MAX)),
        (Enforced::Selective, Some(-5)),
    ] {
        session
            .send(&AgentMessage::Heartbeat {
                enforced,
                exclusion_version: version,
            })
            .await
            .unwrap();
    }
    session
        .send(&AgentMessage::Facts(facts("m1-later")))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let machine = loop {
        let machine = api.machine(&agent.machine_id()).await;
        if machine["computerDnsName"] == "m1-later" {
            break machine;
        }
        assert!(std::time::Instant::now() < deadline, "{machine}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(machine["exclusionRulesVersion"], Value::Null, "{machine}");

    // In range (the session was sent version 0) and Selective: recorded.
    session
        .send(&AgentMessage::Heartbeat {
            enforced: Enforced::Selective,
            exclusion_version: Some(0),
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let machine = api.machine(&agent.machine_id()).await;
        if machine["exclusionRulesVersion"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{machine}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
