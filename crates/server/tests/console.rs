//! The console in a browser: a real server on loopback, people and machine
//! groups, test agents speaking the real agent protocol, and the Playwright
//! specs of `tests/console/` run against it in Debian's headless Chromium.
//!
//! Needs `/usr/bin/chromium` (or `CORDON_CHROMIUM`), Node.js 20 or later and
//! the npm packages of `tests/console/` (`npm ci` there; `scripts/test.sh`
//! installs all of it when run as root on Debian). Without them the test
//! prints that it was skipped, unless `CI=true` or `CORDON_BROWSER_TESTS=1`
//! asks for it: then it fails.
//!
//! - `CORDON_SCREENSHOTS=DIR` also saves screenshots of the main pages into
//!   DIR (relative to the repository's root): `docs/screenshots` refreshes
//!   the README's.
//! - `CORDON_PLAYWRIGHT_ARGS` passes arguments to `playwright test`, split
//!   at white space: a spec file (`specs/authority.spec.ts`) or `--grep=viewer`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use proto::agent::{AgentMessage, Enforced, EnrollResponse, HostAddress, HostFacts, ServerMessage};
use serde_json::{Value, json};

/// How long an agent that answers takes to apply an action, so that the
/// console shows Pending and InProgress before the outcome.
const APPLY_DELAY: Duration = Duration::from_millis(1500);
/// The reason the failing agent reports.
const FAILURE_REASON: &str = "nft: Operation not permitted (simulated)";
/// At most this long for the whole Playwright run (its own global timeout
/// is 200 s, see playwright.config.ts).
const RUN_LIMIT: Duration = Duration::from_secs(240);

fn project_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

// ---- the tools --------------------------------------------------------------

struct Tools {
    node: PathBuf,
    cli: PathBuf,
    chromium: PathBuf,
}

/// Whether the run insists on the browser tests (CI, or asked for).
fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("CORDON_BROWSER_TESTS").is_ok_and(|v| v == "1")
}

/// Finds Chromium, Node.js and the locked npm packages; says what is missing.
fn find_tools() -> Result<Tools, Vec<String>> {
    let mut missing = Vec::new();
    // Debian's, or Fedora's name for it.
    let chromium = std::env::var_os("CORDON_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .map(PathBuf::from)
                .into_iter()
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.is_file() {
        missing.push(format!(
            "Chromium at {} (Debian package chromium, or set CORDON_CHROMIUM)",
            chromium.display()
        ));
    }
    let node = PathBuf::from(std::env::var_os("CORDON_NODE").unwrap_or_else(|| "node".into()));
    match std::process::Command::new(&node).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let major: u32 = version
                .trim_start_matches('v')
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            if major < 20 {
                missing.push(format!("Node.js 20 or later (found {version})"));
            }
        }
        _ => missing.push("Node.js 20 or later (node; Debian packages nodejs and npm)".into()),
    }
    let dir = project_dir();
    let cli = dir.join("node_modules/@playwright/test/cli.js");
    if let Some(stale) = stale_packages(&dir) {
        missing.push(format!(
            "the npm packages of crates/server/tests/console as locked ({stale}): \
             run `npm ci` there"
        ));
    }
    if missing.is_empty() {
        Ok(Tools {
            node,
            cli,
            chromium,
        })
    } else {
        Err(missing)
    }
}

/// Which packages of `package-lock.json` (the project's own dependencies)
/// are not installed at their locked version; `None` when all are.
fn stale_packages(dir: &Path) -> Option<String> {
    let read = |path: PathBuf| -> Option<Value> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    };
    let Some(lock) = read(dir.join("package-lock.json")) else {
        return Some("package-lock.json unreadable".into());
    };
    let packages = &lock["packages"];
    let wanted = packages[""]["devDependencies"].as_object()?;
    let stale: Vec<String> = wanted
        .keys()
        .filter_map(|name| {
            let locked = packages[format!("node_modules/{name}")]["version"].as_str()?;
            let installed = read(dir.join("node_modules").join(name).join("package.json"));
            let installed = installed.as_ref().and_then(|p| p["version"].as_str());
            (installed != Some(locked)).then(|| {
                format!(
                    "{name} {locked}, installed: {}",
                    installed.unwrap_or("none")
                )
            })
        })
        .collect();
    (!stale.is_empty()).then(|| stale.join(", "))
}

// ---- the agents ---------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Acknowledges, applies after [`APPLY_DELAY`], reports success.
    Succeeds,
    /// Acknowledges, and after [`APPLY_DELAY`] reports [`FAILURE_REASON`].
    Fails,
}

fn facts(name: &str, address: &str) -> HostFacts {
    HostFacts {
        computer_dns_name: name.into(),
        os_platform: Some("Linux".into()),
        os_version: Some("Debian GNU/Linux 12 (bookworm)".into()),
        os_processor: Some("x86_64".into()),
        os_architecture: Some("64-bit".into()),
        os_build: None,
        agent_version: Some(env!("CARGO_PKG_VERSION").into()),
        addresses: vec![
            HostAddress {
                ip_address: address.into(),
                mac_address: Some("02:00:00:00:00:01".into()),
                interface_type: Some("Ethernet".into()),
                operational_status: Some("Up".into()),
            },
            HostAddress {
                ip_address: "127.0.0.1".into(),
                mac_address: None,
                interface_type: Some("SoftwareLoopback".into()),
                operational_status: Some("Up".into()),
            },
        ],
    }
}

/// Runs a test agent until the test ends: one session after another (a
/// dropped one is opened again), answering like `cordon-agent` does:
/// Ack, then the outcome after Proceed; a redelivered action it already
/// finished gets the same outcome again; heartbeats carry what is in force.
async fn run_agent(agent: TestAgent, facts: HostFacts, behaviour: Behaviour) {
    let mut enforced = Enforced::NotIsolated;
    let mut finished: Vec<(String, AgentMessage)> = Vec::new();
    loop {
        match agent::Session::open(&agent.identity, facts.clone(), enforced).await {
            Ok(mut session) => {
                let ended = serve(&mut session, behaviour, &mut enforced, &mut finished).await;
                eprintln!("console test: {}'s session ended: {ended}", agent.name);
            }
            Err(e) => eprintln!("console test: {} cannot open a session: {e:#}", agent.name),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn serve(
    session: &mut agent::Session,
    behaviour: Behaviour,
    enforced: &mut Enforced,
    finished: &mut Vec<(String, AgentMessage)>,
) -> String {
    let period = Duration::from_secs(session.heartbeat_seconds.max(1));
    let mut next_beat = tokio::time::Instant::now() + period;
    // Acknowledged, waiting for Proceed: the id and the state it asks for.
    let mut acked: Option<(String, Enforced)> = None;
    // Being applied: when it is done, the id and the state it asks for.
    let mut applying: Option<(tokio::time::Instant, String, Enforced)> = None;
    loop {
        let apply_at = applying
            .as_ref()
            .map(|(at, _, _)| *at)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let message = tokio::select! {
            message = session.recv() => message,
            _ = tokio::time::sleep_until(next_beat) => {
                next_beat += period;
                let beat = AgentMessage::Heartbeat { enforced: *enforced, exclusion_version: None };
                if let Err(e) = session.send(&beat).await {
                    return format!("{e:#}");
                }
                continue;
            }
            _ = tokio::time::sleep_until(apply_at) => {
                let (_, id, target) = applying.take().expect("an action being applied");
                let result = match behaviour {
                    Behaviour::Succeeds => {
                        *enforced = target;
                        AgentMessage::Result {
                            action_id: id.clone(),
                            succeeded: true,
                            error_h_result: 0,
                            reason: None,
                            enforced: target,
                        }
                    }
                    Behaviour::Fails => AgentMessage::Result {
                        action_id: id.clone(),
                        succeeded: false,
                        error_h_result: 5,
                        reason: Some(FAILURE_REASON.into()),
                        enforced: *enforced,
                    },
                };
                finished.push((id, result.clone()));
                if finished.len() > 64 {
                    finished.remove(0);
                }
                if let Err(e) = session.send(&result).await {
                    return format!("{e:#}");
                }
                continue;
            }
        };
        let reply = match message {
            Err(e) => return format!("{e:#}"),
            Ok(ServerMessage::Action(order)) => {
                if let Some((_, result)) = finished.iter().find(|(id, _)| *id == order.action_id) {
                    result.clone()
                } else if applying
                    .as_ref()
                    .is_some_and(|(_, id, _)| *id == order.action_id)
                {
                    continue;
                } else {
                    let target = match (order.action_type.as_str(), order.scope.as_deref()) {
                        ("Isolate", Some("Selective")) => Enforced::Selective,
                        ("Isolate", _) => Enforced::Full,
                        _ => Enforced::NotIsolated,
                    };
                    acked = Some((order.action_id.clone(), target));
                    AgentMessage::Ack {
                        action_id: order.action_id,
                    }
                }
            }
            Ok(ServerMessage::Proceed { action_id }) => {
                if let Some((id, target)) = acked.take_if(|(id, _)| *id == action_id) {
                    applying = Some((tokio::time::Instant::now() + APPLY_DELAY, id, target));
                }
                continue;
            }
            Ok(ServerMessage::Withdrawn { action_id, .. }) => {
                acked.take_if(|(id, _)| *id == action_id);
                continue;
            }
            Ok(ServerMessage::Exclusions { version, .. }) if *enforced == Enforced::Selective => {
                AgentMessage::ExclusionsApplied {
                    version,
                    succeeded: true,
                    reason: None,
                }
            }
            Ok(ServerMessage::Refused { code, reason, .. }) => {
                return format!("refused: {reason} ({code})");
            }
            Ok(_) => continue,
        };
        if let Err(e) = session.send(&reply).await {
            return format!("{e:#}");
        }
    }
}

/// Enrolls a machine that never opens a session (its actions stay
/// Pending), with chosen host facts.
async fn enroll_away(server: &TestServer, facts: HostFacts) -> String {
    let token = server.enroll_token().await;
    let (_, _, request) = agent::identity::enroll_request(&token, facts).unwrap();
    let reply = server
        .https()
        .request(
            Method::POST,
            proto::agent::ENROLL_PATH,
            &[("content-type", "application/json")],
            serde_json::to_vec(&request).unwrap(),
        )
        .await
        .unwrap();
    assert!(reply.status.is_success(), "{reply:?}");
    serde_json::from_slice::<EnrollResponse>(&reply.body)
        .unwrap()
        .machine_id
}

// ---- people and groups --------------------------------------------------------

/// Waits until the API shows every connected machine as seen by its
/// session (its facts from the session's hello).
async fn wait_connected(api: &mut Api, ids: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for id in ids {
        loop {
            let machine = api.machine(id).await;
            if machine["lastIpAddress"]
                .as_str()
                .is_some_and(|ip| ip.starts_with("198.18."))
            {
                break;
            }
            assert!(Instant::now() < deadline, "{id} never connected: {machine}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Type-checks the specs (`tsc`), so that specs skipped until the console
/// exists still compile against Playwright's API.
async fn typecheck(tools: &Tools) {
    let run = tokio::process::Command::new(&tools.node)
        .arg(project_dir().join("node_modules/typescript/bin/tsc"))
        .args(["-p", "."])
        .current_dir(project_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("tsc ends within 120 s")
        .expect("tsc starts");
    assert!(
        output.status.success(),
        "the specs do not type-check (tsc -p crates/server/tests/console):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---- the run --------------------------------------------------------------------

const USERS: [(&str, &str, &str, &str, &[&str]); 3] = [
    // (variable prefix, UPN, password, role, user groups)
    (
        "ADMIN",
        "admin@example.com",
        "admin browser password",
        "Administrator",
        &[],
    ),
    (
        "ANALYST",
        "analyst@example.com",
        "analyst browser password",
        "Responder",
        &["web-team", "finance-team"],
    ),
    (
        "VIEWER",
        "viewer@example.com",
        "viewer browser password",
        "Viewer",
        &["web-team"],
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_passes_its_browser_tests() {
    let tools = match find_tools() {
        Ok(tools) => tools,
        Err(missing) => {
            let list = missing.join("; ");
            if required() {
                panic!(
                    "the browser tests are required here (CI=true or CORDON_BROWSER_TESTS=1) \
                     but cannot run; missing: {list}. ./scripts/test.sh --setup-only installs \
                     them when run as root on Debian"
                );
            }
            eprintln!(
                "skipped: the console's browser tests need {list} (./scripts/test.sh --setup-only \
                 installs them as root on Debian; CI=true or CORDON_BROWSER_TESTS=1 makes their \
                 absence a failure)"
            );
            return;
        }
    };

    typecheck(&tools).await;
    let server = TestServer::start().await;
    create_prefix_group(&server, "Web", 1, "web-", "web-team").await;
    create_prefix_group(&server, "Finance", 2, "fin-", "finance-team").await;
    for (_, upn, password, role, groups) in USERS {
        create_user(&server, upn, password, role, groups).await;
    }

    // The machines: four that answer, one that never connects.
    let answering = [
        ("web-01", "198.18.1.11", Behaviour::Succeeds),
        ("web-02", "198.18.1.12", Behaviour::Succeeds),
        ("fin-01", "198.18.4.41", Behaviour::Succeeds),
        ("fail-01", "198.18.3.31", Behaviour::Fails),
    ];
    let mut machines = serde_json::Map::new();
    let mut tasks = Vec::new();
    for (name, address, behaviour) in answering {
        let agent = server.enroll(name).await;
        machines.insert(name.into(), agent.machine_id().into());
        tasks.push(tokio::spawn(run_agent(
            agent,
            facts(name, address),
            behaviour,
        )));
    }
    let db = enroll_away(&server, facts("db-01", "198.18.2.21")).await;
    machines.insert("db-01".into(), db.into());

    let (app_id, app_secret) = create_app(
        server.store(),
        "Browser tests",
        &["Machine.ReadWrite.All", "Machine.Isolate"],
    )
    .await;
    let mut app = Api {
        http: server.https(),
        token: server.token_for(&app_id, &app_secret).await,
    };
    let ids: Vec<&str> = ["web-01", "web-02", "fin-01", "fail-01"]
        .iter()
        .map(|n| machines[*n].as_str().unwrap())
        .collect();
    wait_connected(&mut app, &ids).await;
    for (name, tag) in [
        ("web-01", "prod"),
        ("web-02", "prod"),
        ("fin-01", "payments"),
    ] {
        let reply = app
            .post(
                &format!("/api/machines/{}/tags", machines[name].as_str().unwrap()),
                json!({"Value": tag, "Action": "Add"}),
            )
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let rule = app
        .post(
            "/api/isolationExclusionRules",
            json!({
                "Name": "SSH from the jump hosts",
                "Description": "Operators keep their way in.",
                "SystemdUnit": "sshd.service",
                "Direction": "inbound",
                "RemoteAddresses": "198.18.0.5",
                "RemotePorts": [22],
            }),
        )
        .await;
    assert!(rule.status.is_success(), "{rule:?}");

    // The specs, in a process group of their own (Chromium included), so
    // that a run past its time is ended whole.
    let mut command = tokio::process::Command::new(&tools.node);
    command
        .arg(&tools.cli)
        .arg("test")
        .current_dir(project_dir())
        .env("CORDON_URL", &server.url)
        .env("CORDON_TENANT", server.tenant())
        .env("CORDON_CA", &server.ca)
        .env("CORDON_CHROMIUM", &tools.chromium)
        .env("CORDON_MACHINES", Value::Object(machines).to_string())
        .env("CORDON_APP_TOKEN", &app.token)
        .env_remove("CORDON_SPKI_SHA256")
        .env("FORCE_COLOR", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (prefix, upn, password, _, _) in USERS {
        command
            .env(format!("CORDON_{prefix}_UPN"), upn)
            .env(format!("CORDON_{prefix}_PASSWORD"), password);
    }
    if let Some(dir) = std::env::var_os("CORDON_SCREENSHOTS").filter(|d| !d.is_empty()) {
        let dir = repo_root().join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        command.env("CORDON_SCREENSHOTS", dir.canonicalize().unwrap());
    } else {
        command.env_remove("CORDON_SCREENSHOTS");
    }
    if let Ok(args) = std::env::var("CORDON_PLAYWRIGHT_ARGS") {
        command.args(args.split_whitespace());
    }
    let started = Instant::now();
    let child = command.spawn().expect("node starts");
    let group = child.id().expect("a process id") as i32;
    let output = match tokio::time::timeout(RUN_LIMIT, child.wait_with_output()).await {
        Ok(output) => output.expect("the Playwright run ends"),
        Err(_) => {
            // SAFETY: kill(2) on the process group this test started.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            panic!(
                "the browser tests took longer than {} s and were stopped",
                RUN_LIMIT.as_secs()
            );
        }
    };
    // Chromium's helpers may outlive node by a moment; none outlives the test.
    // SAFETY: as above; ESRCH when the group is already gone.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    for task in tasks {
        task.abort();
    }
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let took = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "the browser tests failed ({}, after {took:.1} s); traces and screenshots of failed \
         tests are in crates/server/tests/console/test-results/:\n{report}",
        output.status
    );
    eprintln!("{report}\nconsole test: Playwright ran for {took:.1} s");
}
