//! The agent protocol's compatibility (docs/agent-protocol.md, "Versions
//! and compatibility"): within `cordon-agent/1` a newer server serves the
//! agents already out there. These tests send the agent messages of the
//! protocol's first revision, byte for byte as its agents sent them (the
//! fields added since left out), and check that a newer server's message
//! types are ignored by agents.

mod common;

use std::time::Duration;

use agent::Session;
use common::*;
use proto::agent::ServerMessage;
use serde_json::json;

fn line(value: serde_json::Value) -> Vec<u8> {
    let mut bytes = value.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// The first revision's agent messages: a hello whose facts carry only the
/// host name, a heartbeat without an exclusion version, a result without an
/// HRESULT or a reason, facts as their own message. The session is
/// welcomed, the machine isolated and released, its facts taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_revisions_agent_messages_are_served() {
    let server = TestServer::start().await;
    let agent = server.enroll("first-revision").await;
    let machine_id = agent.machine_id();
    let mut session = Session::open_with_hello(&agent.identity, None, |proof| {
        json!({
            "type": "hello",
            "machineId": machine_id,
            "proof": proof,
            "facts": {"computerDnsName": "old-agent"},
            "enforced": "NotIsolated",
        })
        .to_string()
        .into_bytes()
    })
    .await
    .expect("welcomed");
    // The exclusion rules come first, as to every agent.
    assert!(matches!(
        next(&mut session).await,
        ServerMessage::Exclusions { .. }
    ));
    session
        .send_raw(&line(
            json!({"type": "heartbeat", "enforced": "NotIsolated"}),
        ))
        .await
        .unwrap();

    let mut api = server.api().await;
    for (kind, enforced, state) in [
        ("isolate", "Full", "Isolated"),
        ("unisolate", "NotIsolated", "NotIsolated"),
    ] {
        let reply = api
            .post(
                &format!("/api/machines/{machine_id}/{kind}"),
                json!({"Comment": "first revision", "IsolationType": "Full"}),
            )
            .await;
        assert_eq!(reply.status, 201, "{:?}", reply.json());
        let action = reply.json().unwrap()["id"].as_str().unwrap().to_owned();
        assert_eq!(action_id_of(&next(&mut session).await), action);
        session
            .send_raw(&line(json!({"type": "ack", "actionId": action})))
            .await
            .unwrap();
        assert_eq!(
            next(&mut session).await,
            ServerMessage::Proceed {
                action_id: action.clone()
            }
        );
        session
            .send_raw(&line(json!({
                "type": "result", "actionId": action, "succeeded": true, "enforced": enforced,
            })))
            .await
            .unwrap();
        api.wait_status(&action, "Succeeded").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let machine = api.machine(&machine_id).await;
            if machine["isolationState"] == state {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{machine}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // New facts, as the first revision sent them.
    session
        .send_raw(&line(
            json!({"type": "facts", "computerDnsName": "old-agent-renamed"}),
        ))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let machine = api.machine(&machine_id).await;
        if machine["computerDnsName"] == "old-agent-renamed" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{machine}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A message type a newer server may add reaches an agent of this release
/// as `Unknown`, which the agent ignores, instead of breaking its session;
/// a known type with wrong fields is still an error.
#[test]
fn a_newer_servers_message_types_are_ignored_by_agents() {
    let parsed: ServerMessage =
        serde_json::from_str(r#"{"type":"offboard","actionId":"x","force":true}"#).unwrap();
    assert_eq!(parsed, ServerMessage::Unknown);
    assert!(serde_json::from_str::<ServerMessage>(r#"{"type":"proceed"}"#).is_err());
    assert!(serde_json::from_str::<ServerMessage>(r#"{"kind":"proceed"}"#).is_err());
}
