//! `cordon-agent enroll` and `status` as a user types them, against a real
//! server on loopback. No root needed; nothing here touches a firewall.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use proto::agent::Enforced;
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_cordon-agent");

struct Dir(PathBuf);

impl Dir {
    fn new(label: &str) -> Dir {
        let path =
            std::env::temp_dir().join(format!("cordon-agent-cli-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Dir(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Server {
    running: server::RunningServer,
    url: String,
    token: String,
}

async fn serve(dir: &Path) -> Server {
    let mut config = server::Config::new(dir.join("server"));
    config.listen = "127.0.0.1:0".parse().unwrap();
    let running = server::start(config).await.unwrap();
    let (_, token) = server::create_enroll_token(&running.state.store, None, None)
        .await
        .unwrap();
    let url = format!("https://localhost:{}", running.local_addr.port());
    Server {
        running,
        url,
        token,
    }
}

fn agent(args: &[&str]) -> Output {
    tokio::task::block_in_place(|| {
        Command::new(AGENT)
            .args(args)
            .env_remove("CORDON_AGENT_NAME")
            .env_remove("CORDON_AGENT_STATE_DIR")
            .output()
            .unwrap()
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn enroll(server: &Server, state: &Path, extra: &[&str]) -> Output {
    let ca = server.running.ca_path.clone().unwrap();
    let mut args = vec![
        "enroll",
        "--server",
        &server.url,
        "--token",
        &server.token,
        "--ca-file",
        ca.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    agent(&args)
}

fn machine_id(output: &Output) -> String {
    assert!(output.status.success(), "{}", text(&output.stderr));
    serde_json::from_slice::<Value>(&output.stdout).unwrap()["machineId"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enrolled_name_is_kept_for_later_sessions_and_group_rules() {
    let dir = Dir::new("name");
    let server = serve(&dir.0).await;
    let store = &server.running.state.store;
    store
        .create_group(store::NewGroup {
            name: "Web".into(),
            rank: 1,
            match_tag: None,
            match_name_prefix: Some("web-".into()),
            match_os: None,
            user_groups: Vec::new(),
            now: server::now_nanos(),
        })
        .await
        .unwrap();
    let state = dir.0.join("agent");
    let id = machine_id(&enroll(&server, &state, &["--name", "web-1"]));

    // What `cordon-agent run` reports when it connects, with no --name.
    let identity = agent::Identity::load(&state).unwrap();
    let facts = identity.host_facts(None);
    assert_eq!(facts.computer_dns_name, "web-1");
    let _session = agent::Session::open(&identity, facts, Enforced::NotIsolated)
        .await
        .unwrap();
    let machine = store.get_machine(&id).await.unwrap().unwrap();
    assert_eq!(machine.facts.computer_dns_name, "web-1");
    assert_eq!(machine.rbac_group_name, "Web");

    // `run --name` overrides it.
    assert_eq!(
        identity.host_facts(Some("other")).computer_dns_name,
        "other"
    );

    // `status` says who the machine is.
    let status = agent(&["status", "--state-dir", state.to_str().unwrap(), "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["enrolled"], true, "{status}");
    assert_eq!(status["machineId"], id.as_str(), "{status}");
    assert_eq!(status["name"], "web-1", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolling_over_an_identity_needs_force() {
    let dir = Dir::new("force");
    let server = serve(&dir.0).await;
    let state = dir.0.join("agent");
    let first = machine_id(&enroll(&server, &state, &["--name", "m1"]));
    let saved = std::fs::read(state.join("identity.json")).unwrap();
    let key = std::fs::read(state.join("agent.key")).unwrap();

    let again = enroll(&server, &state, &["--name", "m2"]);
    assert!(!again.status.success());
    let error = text(&again.stderr);
    assert!(
        error.contains("already enrolled") && error.contains(&first) && error.contains("--force"),
        "{error}"
    );
    assert_eq!(std::fs::read(state.join("identity.json")).unwrap(), saved);
    assert_eq!(std::fs::read(state.join("agent.key")).unwrap(), key);

    let second = machine_id(&enroll(&server, &state, &["--name", "m2", "--force"]));
    assert_ne!(first, second);
    let identity = agent::Identity::load(&state).unwrap();
    assert_eq!(identity.machine_id, second);
    assert_eq!(identity.name.as_deref(), Some("m2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_state_dir_never_enrolled_says_so() {
    let dir = Dir::new("never");
    let state = dir.0.join("nothing-here");
    let out = agent(&["status", "--state-dir", state.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Enrolled: no"), "{stdout}");
    assert!(stdout.contains("cordon-agent enroll"), "{stdout}");

    let out = agent(&["status", "--state-dir", state.to_str().unwrap(), "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["enrolled"], false, "{status}");
    assert_eq!(status["machineId"], Value::Null, "{status}");
    assert!(
        out.status.success(),
        "never enrolled is a state, not an error"
    );

    // A corrupt identity is said, and the exit status says it too.
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("identity.json"), b"{not json").unwrap();
    let out = agent(&["status", "--state-dir", state.to_str().unwrap()]);
    assert!(text(&out.stdout).contains("Enrolled: unknown"), "{out:?}");
    assert!(!out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_name_is_refused_before_anything_is_sent() {
    let dir = Dir::new("badname");
    let state = dir.0.join("agent");
    let out = agent(&[
        "enroll",
        "--server",
        "https://localhost:1",
        "--token",
        "x",
        "--ca-file",
        "/nonexistent",
        "--state-dir",
        state.to_str().unwrap(),
        "--name",
        "no spaces",
    ]);
    assert!(!out.status.success());
    let error = text(&out.stderr);
    assert!(error.contains("is not a computer name"), "{error}");
}
