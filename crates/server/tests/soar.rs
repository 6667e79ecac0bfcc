//! The SOAR worked example (docs/soar.md): `docs/examples/soar_playbook.py`
//! run for real, as a user would run it, against a server with three test
//! agents that carry out their actions; two of the machines carry the tag
//! the playbook isolates.
//!
//! Needs `python3` (the webhook test also the `openssl` command); without
//! them the tests print that they were skipped, unless `CI=true`, which makes
//! their absence a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::*;
use proto::agent::{AgentMessage, Enforced, ServerMessage};
use serde_json::{Value, json};

const TAG: &str = "wave-1";
/// `openssl` arguments for the webhook receiver's certificate: self-signed,
/// for 127.0.0.1, and not a CA (rustls refuses a CA certificate as a
/// server's).
const RECEIVER_CERT: &str = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
     -subj /CN=soar-receiver -addext subjectAltName=IP:127.0.0.1 \
     -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth";
/// The Standard Webhooks specification's example secret (24 bytes).
const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn playbook() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples/soar_playbook.py")
}

/// Whether `tool` runs here; if not, fails under CI and otherwise says
/// that the test is skipped.
fn available(tool: &str, version_arg: &str, test: &str) -> bool {
    let runs = std::process::Command::new(tool)
        .arg(version_arg)
        .output()
        .is_ok_and(|o| o.status.success());
    let required = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(runs || !required, "{test} needs `{tool}` (CI=true)");
    if !runs {
        eprintln!("skipped: {test} needs `{tool}`, which does not run here");
    }
    runs
}

/// Answers every action as `cordon-agent` does (Ack, then success after
/// Proceed), with heartbeats, until the test ends.
async fn answer_actions(agent: TestAgent) {
    let mut session = agent.connect().await;
    let mut enforced = Enforced::NotIsolated;
    let period = Duration::from_secs(session.heartbeat_seconds.max(1));
    let mut beat = tokio::time::interval(period);
    loop {
        let message = tokio::select! {
            message = session.recv() => message,
            _ = beat.tick() => {
                let heartbeat = AgentMessage::Heartbeat { enforced, exclusion_version: None };
                let _ = session.send(&heartbeat).await;
                continue;
            }
        };
        match message {
            Ok(ServerMessage::Action(order)) => {
                let target = match order.action_type.as_str() {
                    "Isolate" => Enforced::Full,
                    _ => Enforced::NotIsolated,
                };
                execute(&mut session, &order.action_id, true, target).await;
                enforced = target;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("soar test: {}'s session ended: {e:#}", agent.name);
                return;
            }
        }
    }
}

/// A server, three answering machines (`soar-1` and `soar-2` tagged), and
/// an admin app (`Machine.ReadWrite.All`: tags, webhooks) to look on with.
struct Fleet {
    server: TestServer,
    tagged: Vec<String>,
    untagged: String,
    admin: Api,
    agents: Vec<tokio::task::JoinHandle<()>>,
}

async fn fleet() -> Fleet {
    let server = TestServer::start().await;
    let mut ids = Vec::new();
    let mut agents = Vec::new();
    for name in ["soar-1", "soar-2", "soar-3"] {
        let agent = server.enroll(name).await;
        ids.push(agent.machine_id());
        agents.push(tokio::spawn(answer_actions(agent)));
    }
    // Tags and webhooks need Machine.ReadWrite.All, which the playbook's app lacks.
    let (id, secret) = create_app(server.store(), "SOAR admin", &["Machine.ReadWrite.All"]).await;
    let mut admin = Api {
        http: server.https(),
        token: server.token_for(&id, &secret).await,
    };
    for machine in &ids[..2] {
        let reply = admin
            .post(
                &format!("/api/machines/{machine}/tags"),
                json!({"Value": TAG, "Action": "Add"}),
            )
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let untagged = ids.pop().unwrap();
    Fleet {
        server,
        tagged: ids,
        untagged,
        admin,
        agents,
    }
}

/// Runs the playbook with the test app's credentials (`Machine.Isolate`,
/// `Machine.Read.All`) and `extra` arguments; at most 60 s.
async fn run_playbook(server: &TestServer, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new("python3");
    command
        .arg(playbook())
        .args(["--server", server.url.as_str(), "--tenant", server.tenant()])
        .args(["--client-id", server.client_id.as_str(), "--ca"])
        .arg(&server.ca)
        .args(["--tag", TAG, "--comment", "SOAR test: wave 1"])
        .args(["--isolation-type", "Full", "--timeout", "30"])
        .args(extra)
        .env("CORDON_CLIENT_SECRET", &server.client_secret)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the playbook ends within 60 s")
        .expect("python3 runs")
}

async fn actions_of(api: &mut Api, machine: &str) -> Vec<Value> {
    let reply = api
        .get(&format!(
            "/api/machineactions?$filter=machineId%20eq%20'{machine}'"
        ))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.json().unwrap()["value"].as_array().unwrap().clone()
}

/// Exit 0, a Succeeded line per tagged machine naming its action, and the
/// untagged machine untouched.
async fn assert_isolated_the_tagged_ones(fleet: &mut Fleet, output: &Output) {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let report = format!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{report}");
    for machine in &fleet.tagged {
        let actions = actions_of(&mut fleet.admin, machine).await;
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert_eq!(actions[0]["status"], "Succeeded", "{actions:?}");
        let id = actions[0]["id"].as_str().unwrap();
        assert!(
            stdout.lines().any(|l| l.starts_with(machine.as_str())
                && l.ends_with(&format!("action {id} Succeeded"))),
            "{report}"
        );
    }
    assert!(stdout.contains("Summary: 2 Succeeded\n"), "{report}");
    assert!(!stdout.contains(&fleet.untagged), "{report}");
    assert!(
        actions_of(&mut fleet.admin, &fleet.untagged)
            .await
            .is_empty()
    );
    let machine = fleet.admin.machine(&fleet.untagged).await;
    assert_eq!(machine["isolationState"], "NotIsolated", "{machine}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playbook_isolates_the_tagged_machines_and_follows_the_event_stream() {
    if !available("python3", "--version", "the SOAR playbook test") {
        return;
    }
    let mut fleet = fleet().await;
    let output = run_playbook(&fleet.server, &["--wait", "events"], &[]).await;
    assert_isolated_the_tagged_ones(&mut fleet, &output).await;
    fleet.agents.iter().for_each(|a| a.abort());
}

// needs webhooks
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playbook_isolates_the_tagged_machines_and_hears_of_it_by_webhook() {
    let test = "the SOAR playbook's webhook test";
    if !available("python3", "--version", test) || !available("openssl", "version", test) {
        return;
    }
    let mut fleet = fleet().await;
    // The receiver's certificate and key, as docs/soar.md makes them.
    let dir = TempDir::new("soar-receiver");
    let (cert, key) = (dir.0.join("receiver.pem"), dir.0.join("receiver-key.pem"));
    let made = std::process::Command::new("openssl")
        .args(RECEIVER_CERT.split_whitespace())
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let listen = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };

    let reply = fleet
        .admin
        .post(
            "/api/webhooks",
            json!({
                "Url": format!("https://{listen}/cordon"),
                "Events": ["machineAction.completed"],
                "Secret": WEBHOOK_SECRET,
                "CaCertificate": std::fs::read_to_string(&cert).unwrap(),
                "Description": "SOAR playbook test",
            }),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let webhook = reply.json().unwrap()["id"].as_str().unwrap().to_owned();

    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let output = run_playbook(
        &fleet.server,
        &[
            "--wait",
            "webhook",
            "--listen",
            listen.as_str(),
            "--cert",
            cert,
            "--key",
            key,
        ],
        &[("CORDON_WEBHOOK_SECRET", WEBHOOK_SECRET)],
    )
    .await;
    assert_isolated_the_tagged_ones(&mut fleet, &output).await;

    // Both completions went out once each, as Delivered (recorded just
    // after the receiver's answer).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let reply = fleet
            .admin
            .get(&format!("/api/webhooks/{webhook}/deliveries"))
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let deliveries = reply.json().unwrap()["value"].as_array().unwrap().clone();
        let delivered = deliveries
            .iter()
            .filter(|d| d["status"] == "Delivered")
            .count();
        if delivered == 2 && deliveries.len() == 2 {
            assert!(
                deliveries
                    .iter()
                    .all(|d| d["eventType"] == "machineAction.completed")
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{deliveries:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet.agents.iter().for_each(|a| a.abort());
}
