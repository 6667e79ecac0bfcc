//! End-to-end isolation in the kernel: a real server, real `cordon-agent`
//! processes in network namespaces, and an `ext` host standing in for the
//! internet (ARCHITECTURE.md, "The network lab"). Needs root; elsewhere each test
//! prints that it was skipped. Nothing here touches the root namespace's
//! network: the server's lab listener is opened inside `srv`, and the test's
//! own API client talks to a second listener on loopback.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agent::HttpsClient;
use http::Method;
use lab::{Host, Lab, Responders};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_cordon-agent");
const TCP: u16 = 7001;
const UDP: u16 = 7002;
const HTTP: u16 = 8080;
const SERVER_PORT: u16 = 8443;
const PROBE: Duration = Duration::from_millis(800);

/// One lab test at a time: they measure timing and share two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

struct Env {
    lab: Lab,
    srv: Host,
    ext: Host,
    _responders: Responders,
    server: server::RunningServer,
    dir: PathBuf,
    /// What agents use: `https://<srv v4>:8443`.
    agent_url: String,
    api: HttpsClient,
    token: String,
    enroll_token: String,
    machines: Vec<String>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.server.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        // Agents killed while isolated Selectively keep their exclusion
        // cgroups (still needed by the rules); the lab is gone, so remove them.
        if let Some(root) = agent::exclusions::cgroup2_root() {
            for id in &self.machines {
                let mine = root.join(format!("cordon-{}", &id[..12]));
                if let Ok(entries) = std::fs::read_dir(&mine) {
                    for entry in entries.flatten() {
                        let _ = std::fs::remove_dir(entry.path());
                    }
                }
                let _ = std::fs::remove_dir(&mine);
            }
        }
    }
}

struct RunningAgent {
    host: Host,
    state_dir: PathBuf,
    machine_id: String,
    pid: Option<u32>,
    log: PathBuf,
}

impl Env {
    async fn new(extra_names: &[&str]) -> Option<Env> {
        if lab::skip() {
            return None;
        }
        let mut lab = blocking(Lab::new).expect("lab");
        let srv = blocking(|| lab.add_host("srv")).unwrap();
        let ext = blocking(|| lab.add_host("ext")).unwrap();
        let responders = blocking(|| lab.start_responders(&ext, TCP, UDP, HTTP)).unwrap();
        let dir = std::env::temp_dir().join(format!("{}-data", lab.prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();

        let lab_listener = lab
            .in_host(&srv, || std::net::TcpListener::bind(("::", SERVER_PORT)))
            .unwrap()
            .unwrap();
        let loopback = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let api_port = loopback.local_addr().unwrap().port();
        let mut config = server::Config::new(dir.join("server"));
        config.public_url = Some(format!("https://{}:{SERVER_PORT}", srv.v4));
        config.tls = server::TlsSource::SelfSigned {
            extra_names: [srv.v4.to_string(), srv.v6.to_string()]
                .into_iter()
                .chain(extra_names.iter().map(|n| n.to_string()))
                .collect(),
        };
        config.rate_limit_per_minute = 0;
        config.rate_limit_per_hour = 0;
        config.heartbeat_interval = Duration::from_secs(1);
        let server = server::start_with(config, vec![lab_listener, loopback])
            .await
            .expect("server starts");
        let store = &server.state.store;
        let permissions = vec![
            "Machine.Isolate".into(),
            "Machine.Read.All".into(),
            "Machine.ReadWrite.All".into(),
        ];
        let (client_id, secret) = server::create_app(store, "Lab SOAR", permissions)
            .await
            .unwrap();
        let (_, enroll_token) = server::create_enroll_token(store, None, None)
            .await
            .unwrap();
        let ca = server.ca_path.clone().unwrap();
        let mut api = HttpsClient::new(
            agent::https::tls_config(&ca).unwrap(),
            &format!("https://localhost:{api_port}"),
        )
        .unwrap();
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs([
                ("grant_type", "client_credentials"),
                ("client_id", &client_id),
                ("client_secret", &secret),
                ("scope", "https://api.securitycenter.microsoft.com/.default"),
            ])
            .finish();
        let reply = api
            .request(
                Method::POST,
                &format!("/{}/oauth2/v2.0/token", server.tenant_id),
                &[("content-type", "application/x-www-form-urlencoded")],
                body,
            )
            .await
            .unwrap();
        let token = reply.json().unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        Some(Env {
            agent_url: format!("https://{}:{SERVER_PORT}", srv.v4),
            lab,
            srv,
            ext,
            _responders: responders,
            server,
            dir,
            api,
            token,
            enroll_token,
            machines: Vec::new(),
        })
    }

    fn ca(&self) -> PathBuf {
        self.server.ca_path.clone().unwrap()
    }

    /// Adds a host and enrolls an agent there (not yet running).
    fn enroll(
        &mut self,
        short: &str,
        server_url: Option<&str>,
        hosts_file: Option<&Path>,
    ) -> RunningAgent {
        let host = blocking(|| self.lab.add_host(short)).unwrap();
        let state_dir = self.dir.join(format!("agent-{short}"));
        let url = server_url.unwrap_or(&self.agent_url).to_owned();
        let ca = self.ca();
        let args = [
            "enroll",
            "--server",
            &url,
            "--token",
            &self.enroll_token,
            "--ca-file",
            ca.to_str().unwrap(),
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--name",
            short,
            "--json",
        ];
        let output = blocking(|| match hosts_file {
            None => self.lab.exec_ok(&host, AGENT, &args),
            Some(hosts) => {
                let script = format!(
                    "mount --bind {} /etc/hosts && exec \"$0\" \"$@\"",
                    hosts.display()
                );
                let mut full = vec![
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    &script,
                    AGENT,
                ];
                full.extend_from_slice(&args);
                self.lab.exec_ok(&host, "unshare", &full)
            }
        })
        .expect("enrollment");
        let machine_id = serde_json::from_str::<Value>(&output).unwrap()["machineId"]
            .as_str()
            .unwrap()
            .to_owned();
        self.machines.push(machine_id.clone());
        RunningAgent {
            log: self.dir.join(format!("agent-{short}.log")),
            host,
            state_dir,
            machine_id,
            pid: None,
        }
    }

    fn run(&mut self, agent: &mut RunningAgent, hosts_file: Option<&Path>, verify_timeout: u64) {
        let args = vec![
            "run".to_owned(),
            "--state-dir".into(),
            agent.state_dir.display().to_string(),
            "--name".into(),
            agent.host.short.clone(),
            "--max-backoff".into(),
            "1".into(),
            "--verify-timeout".into(),
            verify_timeout.to_string(),
        ];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&agent.log)
            .unwrap();
        let command = match hosts_file {
            None => {
                let mut c = Command::new(AGENT);
                c.args(&args);
                c
            }
            Some(hosts) => {
                let script = format!(
                    "mount --bind {} /etc/hosts && exec \"$0\" \"$@\"",
                    hosts.display()
                );
                let mut c = Command::new("unshare");
                c.args([
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    &script,
                    AGENT,
                ])
                .args(&args);
                c
            }
        };
        let mut command = command;
        command
            .env("CORDON_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log);
        agent.pid = Some(blocking(|| self.lab.spawn(&agent.host, command)).unwrap());
    }

    fn kill(&mut self, agent: &mut RunningAgent) {
        if let Some(pid) = agent.pid.take() {
            blocking(|| self.lab.stop(pid, Duration::ZERO)).unwrap();
        }
    }

    async fn wait_connected(&self, agent: &RunningAgent) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.server.state.gateway.is_connected(&agent.machine_id) {
            assert!(
                Instant::now() < deadline,
                "agent in {} never connected; log:\n{}",
                agent.host.short,
                log_of(agent)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn call(&mut self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let auth = format!("Bearer {}", self.token);
        let reply = self
            .api
            .request(
                method,
                path,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body.map(|b| b.to_string()).unwrap_or_default(),
            )
            .await
            .unwrap();
        (reply.status.as_u16(), reply.json().unwrap_or(Value::Null))
    }

    async fn isolate_selective(&mut self, agent: &RunningAgent) -> Value {
        let (status, created) = self
            .call(
                Method::POST,
                &format!("/api/machines/{}/isolate", agent.machine_id),
                Some(serde_json::json!({"Comment": "lab selective", "IsolationType": "Selective"})),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        self.wait_final(agent, created["id"].as_str().unwrap(), "Succeeded")
            .await
    }

    async fn wait_final(&mut self, agent: &RunningAgent, id: &str, expect: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, action) = self
                .call(Method::GET, &format!("/api/machineactions/{id}"), None)
                .await;
            let status = action["status"].as_str().unwrap_or_default().to_owned();
            if status != "Pending" && status != "InProgress" {
                assert_eq!(status, expect, "{action}\nagent log:\n{}", log_of(agent));
                return action;
            }
            assert!(
                Instant::now() < deadline,
                "{action}\nagent log:\n{}",
                log_of(agent)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn add_rule(&mut self, rule: Value) -> String {
        let (status, created) = self
            .call(Method::POST, "/api/isolationExclusionRules", Some(rule))
            .await;
        assert_eq!(status, 201, "{created}");
        created["id"].as_str().unwrap().to_owned()
    }

    /// Runs a program (a copy of curl) inside `host`: does it fetch ext's page?
    fn fetch_with(&self, host: &Host, program: &Path, to: SocketAddr) -> bool {
        let url = format!("http://{to}/");
        let out = blocking(|| {
            self.lab
                .exec(host, program.to_str().unwrap(), &["-s", "-m", "2", &url])
        })
        .unwrap();
        out.status.success() && String::from_utf8_lossy(&out.stdout) == lab::HTTP_BODY
    }

    async fn request(&mut self, machine_id: &str, kind: &str) -> (u16, Value) {
        self.call(
            Method::POST,
            &format!("/api/machines/{machine_id}/{kind}"),
            Some(serde_json::json!({"Comment": format!("lab {kind}")})),
        )
        .await
    }

    /// Requests an action and waits for its final status; returns the
    /// action and the time from the 201 to that status.
    async fn act(&mut self, agent: &RunningAgent, kind: &str, expect: &str) -> (Value, Duration) {
        let (status, created) = self.request(&agent.machine_id, kind).await;
        assert_eq!(status, 201, "{created}");
        let accepted = Instant::now();
        let id = created["id"].as_str().unwrap().to_owned();
        let deadline = accepted + Duration::from_secs(20);
        loop {
            let (_, action) = self
                .call(Method::GET, &format!("/api/machineactions/{id}"), None)
                .await;
            let status = action["status"].as_str().unwrap_or_default().to_owned();
            if status != "Pending" && status != "InProgress" {
                assert_eq!(status, expect, "{action}\nagent log:\n{}", log_of(agent));
                return (action, accepted.elapsed());
            }
            assert!(
                Instant::now() < deadline,
                "still {status}: {action}\nagent log:\n{}",
                log_of(agent)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn machine(&mut self, id: &str) -> Value {
        self.call(Method::GET, &format!("/api/machines/{id}"), None)
            .await
            .1
    }

    fn table(&self, host: &Host) -> Option<String> {
        let out = blocking(|| {
            self.lab
                .exec(host, "nft", &["list", "table", "inet", "cordon"])
        })
        .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn ext_v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ext.v4), port)
    }

    fn ext_v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ext.v6), port)
    }

    /// Which of the ways out of `from` work: TCP, UDP, ICMP, HTTP over IPv4,
    /// TCP and ICMP over IPv6.
    fn reach(&self, from: &Host) -> [bool; 6] {
        blocking(|| {
            [
                lab::tcp_echo(&self.lab, from, self.ext_v4(TCP), PROBE).unwrap(),
                lab::udp_echo(&self.lab, from, self.ext_v4(UDP), PROBE).unwrap(),
                lab::icmp_echo(&self.lab, from, IpAddr::V4(self.ext.v4), PROBE).unwrap(),
                lab::http_get(&self.lab, from, self.ext_v4(HTTP), PROBE)
                    .unwrap()
                    .is_some(),
                lab::tcp_echo(&self.lab, from, self.ext_v6(TCP), PROBE).unwrap(),
                lab::icmp_echo(&self.lab, from, IpAddr::V6(self.ext.v6), PROBE).unwrap(),
            ]
        })
    }
}

fn log_of(agent: &RunningAgent) -> String {
    std::fs::read_to_string(&agent.log).unwrap_or_default()
}

const ALL: [bool; 6] = [true; 6];
const NONE: [bool; 6] = [false; 6];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_isolation_cuts_everything_but_the_management_channel() {
    let _serial = SERIAL.lock().await;
    let Some(mut env) = Env::new(&[]).await else {
        return;
    };
    let mut m1 = env.enroll("m1", None, None);
    let mut m2 = env.enroll("m2", None, None);
    env.run(&mut m1, None, 10);
    env.run(&mut m2, None, 10);
    env.wait_connected(&m1).await;
    env.wait_connected(&m2).await;

    assert_eq!(
        env.reach(&m1.host),
        ALL,
        "before isolation m1 reaches ext every way"
    );
    // Inbound: ext reaches a service on m1.
    let _m1_service = blocking(|| env.lab.start_responders(&m1.host, 7101, 7102, 8180)).unwrap();
    let m1_service = SocketAddr::new(IpAddr::V4(m1.host.v4), 7101);
    assert!(blocking(|| lab::tcp_echo(&env.lab, &env.ext, m1_service, PROBE)).unwrap());
    // A connection opened before isolation, tracked by a host firewall of m1's own.
    blocking(|| env.lab.track_connections(&m1.host)).unwrap();
    let mut before = blocking(|| lab::open_tcp(&env.lab, &m1.host, env.ext_v4(TCP))).unwrap();
    assert!(blocking(|| before.alive(PROBE)));

    let (action, elapsed) = env.act(&m1, "isolate", "Succeeded").await;
    assert_eq!(action["scope"], "Full");
    println!("lab: isolate 201 -> Succeeded in {elapsed:?}");
    let machine = env.machine(&m1.machine_id).await;
    assert_eq!(machine["isolationState"], "Isolated");
    assert_eq!(machine["isolationScope"], "Full");

    assert_eq!(
        env.reach(&m1.host),
        NONE,
        "after isolation nothing gets out of m1"
    );
    assert!(
        !blocking(|| lab::tcp_echo(&env.lab, &env.ext, m1_service, PROBE)).unwrap(),
        "nothing gets in"
    );
    assert!(
        !blocking(|| before.alive(PROBE)),
        "the connection opened before isolation is cut"
    );
    assert_eq!(env.reach(&m2.host), ALL, "m2 is unaffected");
    let table = env.table(&m1.host).expect("Cordon's table in m1");
    assert!(table.contains(&env.srv.v4.to_string()), "{table}");
    assert!(
        blocking(|| env
            .lab
            .exec(&m1.host, "nft", &["list", "table", "inet", "hostfw"]))
        .unwrap()
        .status
        .success(),
        "other tables are left alone"
    );

    // The agent keeps heartbeating through the isolation.
    let seen = env.machine(&m1.machine_id).await["lastSeen"].clone();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let machine = env.machine(&m1.machine_id).await;
    assert_ne!(
        machine["lastSeen"], seen,
        "lastSeen advances under isolation"
    );
    assert_eq!(machine["healthStatus"], "Active");
    assert!(env.server.state.gateway.is_connected(&m1.machine_id));

    // The release arrives through the isolation.
    let (_, elapsed) = env.act(&m1, "unisolate", "Succeeded").await;
    println!("lab: unisolate 201 -> Succeeded in {elapsed:?}");
    assert_eq!(env.reach(&m1.host), ALL, "everything flows again");
    assert!(blocking(|| lab::tcp_echo(&env.lab, &env.ext, m1_service, PROBE)).unwrap());
    assert_eq!(env.table(&m1.host), None, "the table is gone");
    assert_eq!(
        env.machine(&m1.machine_id).await["isolationState"],
        "NotIsolated"
    );

    // Figures for BENCHMARKS.md: 201 -> Succeeded, and rules in force on the agent.
    let mut totals = Vec::new();
    for _ in 0..10 {
        totals.push(env.act(&m1, "isolate", "Succeeded").await.1);
        totals.push(env.act(&m1, "unisolate", "Succeeded").await.1);
    }
    totals.sort();
    let in_force: Vec<u64> = log_of(&m1)
        .lines()
        .filter_map(|l| l.split("received_to_in_force_us=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    let mut in_force_sorted = in_force.clone();
    in_force_sorted.sort();
    println!(
        "lab figures: 201 -> Succeeded median {:?}, p99 {:?} over {} actions; action received -> rules in force (applied and read back) median {} us, max {} us over {} applies",
        totals[totals.len() / 2],
        totals[totals.len() - 1],
        totals.len(),
        in_force_sorted
            .get(in_force_sorted.len() / 2)
            .copied()
            .unwrap_or_default(),
        in_force_sorted.last().copied().unwrap_or_default(),
        in_force_sorted.len()
    );
    env.kill(&mut m1);
    env.kill(&mut m2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_undone_within_a_second_and_reported() {
    let _serial = SERIAL.lock().await;
    let Some(mut env) = Env::new(&[]).await else {
        return;
    };
    let mut m1 = env.enroll("m1", None, None);
    env.run(&mut m1, None, 10);
    env.wait_connected(&m1).await;
    env.act(&m1, "isolate", "Succeeded").await;

    // Deleted with the nft command line.
    blocking(|| {
        env.lab
            .exec_ok(&m1.host, "nft", &["delete", "table", "inet", "cordon"])
    })
    .unwrap();
    let removed = Instant::now();
    while env.table(&m1.host).is_none() {
        assert!(
            removed.elapsed() < Duration::from_secs(1),
            "not restored within a second\n{}",
            log_of(&m1)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("lab: deleted table restored after {:?}", removed.elapsed());
    assert_eq!(env.reach(&m1.host), NONE);

    // Changed: a foreign accept rule inserted at the top of the output chain.
    blocking(|| {
        env.lab.exec_ok(
            &m1.host,
            "nft",
            &["insert", "rule", "inet", "cordon", "output", "accept"],
        )
    })
    .unwrap();
    let changed = Instant::now();
    loop {
        let table = env.table(&m1.host).unwrap_or_default();
        let foreign = table.lines().any(|l| l.trim() == "accept");
        if !foreign && table.contains("chain output") {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "foreign rule still there:\n{table}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(env.reach(&m1.host), NONE);

    // Reported to the server and visible on the machine (the second report
    // within 5 s of the first is written when those 5 s are up: the server
    // folds a session's tamper reports).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let machine = env.machine(&m1.machine_id).await;
        if machine["tamperCount"].as_i64().unwrap_or(0) >= 2 {
            assert!(machine["lastTamperDateTimeUtc"].is_string());
            break;
        }
        assert!(Instant::now() < deadline, "{machine}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.kill(&mut m1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_agent_never_lifts_isolation_and_boot_restores_it() {
    let _serial = SERIAL.lock().await;
    let Some(mut env) = Env::new(&[]).await else {
        return;
    };
    let mut m1 = env.enroll("m1", None, None);
    env.run(&mut m1, None, 10);
    env.wait_connected(&m1).await;
    env.act(&m1, "isolate", "Succeeded").await;

    env.kill(&mut m1);
    assert!(
        env.table(&m1.host).is_some(),
        "the table outlives the agent"
    );
    assert_eq!(env.reach(&m1.host), NONE);
    env.run(&mut m1, None, 10);
    env.wait_connected(&m1).await;
    assert_eq!(
        env.reach(&m1.host),
        NONE,
        "still isolated after the restart"
    );
    assert_eq!(
        env.machine(&m1.machine_id).await["isolationState"],
        "Isolated"
    );

    // At boot: a fresh namespace with no network at all gets the saved isolation back.
    let script = format!(
        "{AGENT} apply-saved --state-dir {} && nft list table inet cordon",
        m1.state_dir.display()
    );
    let out = blocking(|| {
        Command::new("unshare")
            .args(["--net", "sh", "-c", &script])
            .output()
    })
    .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        listing.contains("table inet cordon") && listing.contains("policy drop"),
        "{listing}"
    );

    // A corrupt state file: the agent stays isolated and says so.
    env.kill(&mut m1);
    std::fs::write(m1.state_dir.join("state.json"), b"{\"enforced\":").unwrap();
    std::fs::write(m1.state_dir.join("state.prev.json"), b"garbage").unwrap();
    let out = blocking(|| {
        env.lab.exec(
            &m1.host,
            AGENT,
            &["status", "--state-dir", m1.state_dir.to_str().unwrap()],
        )
    })
    .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("present") && status.contains("corrupt"),
        "{status}"
    );
    let out = blocking(|| {
        env.lab.exec(
            &m1.host,
            AGENT,
            &["apply-saved", "--state-dir", m1.state_dir.to_str().unwrap()],
        )
    })
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stays in force"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(env.table(&m1.host).is_some());
    assert_eq!(env.reach(&m1.host), NONE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_during_apply_rolls_back_and_fails() {
    let _serial = SERIAL.lock().await;
    let Some(mut env) = Env::new(&[]).await else {
        return;
    };
    let mut m1 = env.enroll("m1", None, None);
    env.run(&mut m1, None, 2);
    env.wait_connected(&m1).await;
    // New connections to the server are dropped from now on; the open session still works.
    let srv = env.srv.clone();
    blocking(|| env.lab.nft(&srv, "table inet block {\n  chain input {\n    type filter hook input priority 0;\n    tcp dport 8443 tcp flags & (syn | ack) == syn drop\n  }\n}\n")).unwrap();
    let (action, _) = env.act(&m1, "isolate", "Failed").await;
    assert!(
        action["troubleshootInfo"]
            .as_str()
            .unwrap()
            .contains("management channel"),
        "{action}"
    );
    assert_ne!(action["errorHResult"], 0);
    assert_eq!(env.table(&m1.host), None, "rolled back");
    assert_eq!(env.reach(&m1.host), ALL);
    assert_eq!(
        env.machine(&m1.machine_id).await["isolationState"],
        "NotIsolated"
    );
    env.kill(&mut m1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_agent_gets_its_actions_on_reconnect_in_order() {
    let _serial = SERIAL.lock().await;
    let Some(mut env) = Env::new(&[]).await else {
        return;
    };
    let mut m1 = env.enroll("m1", None, None);
    let (status, isolate) = env.request(&m1.machine_id, "isolate").await;
    assert_eq!(status, 201);
    // A release can't overtake the pending isolation.
    let (status, refused) = env.request(&m1.machine_id, "unisolate").await;
    assert_eq!(status, 400);
    assert_eq!(refused["error"]["activeActionId"], isolate["id"]);
    env.run(&mut m1, None, 10);
    let id = isolate["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, action) = env
            .call(Method::GET, &format!("/api/machineactions/{id}"), None)
            .await;
        if action["status"] == "Succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "{action}\n{}", log_of(&m1));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.reach(&m1.host), NONE);
    env.act(&m1, "unisolate", "Succeeded").await;
    assert_eq!(env.reach(&m1.host), ALL);
    env.kill(&mut m1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_name_with_two_addresses_keeps_working_under_isolation() {
    let _serial = SERIAL.lock().await;
    let Some(mut env) = Env::new(&["cordon.lab"]).await else {
        return;
    };
    let srv = env.srv.clone();
    let hosts = blocking(|| {
        env.lab
            .add_name("cordon.lab", &[IpAddr::V4(srv.v4), IpAddr::V6(srv.v6)])
    })
    .unwrap();
    let url = format!("https://cordon.lab:{SERVER_PORT}");
    let mut m1 = env.enroll("m1", Some(&url), Some(&hosts));
    env.run(&mut m1, Some(&hosts), 10);
    env.wait_connected(&m1).await;
    env.act(&m1, "isolate", "Succeeded").await;
    let table = env.table(&m1.host).unwrap();
    assert!(
        table.contains(&srv.v4.to_string()) && table.contains(&srv.v6.to_string()),
        "both addresses kept reachable:\n{table}"
    );
    assert_eq!(env.reach(&m1.host), NONE);
    // The session survives and the release gets through.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(env.server.state.gateway.is_connected(&m1.machine_id));
    env.act(&m1, "unisolate", "Succeeded").await;
    assert_eq!(env.table(&m1.host), None);
    env.kill(&mut m1);
}

/// Copies of curl at two paths: only one of them is excluded.
fn curl_copies(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let curl = ["/usr/bin/curl", "/bin/curl"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let (allowed, other) = (
        dir.join("allowed").join("curl"),
        dir.join("other").join("curl"),
    );
    for copy in [&allowed, &other] {
        std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
        std::fs::copy(&curl, copy).unwrap();
    }
    Some((allowed, other))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selective_isolation_lets_through_exactly_the_excluded_application() {
    let _serial = SERIAL.lock().await;
    let Some(mut env) = Env::new(&[]).await else {
        return;
    };
    let Some((allowed, other)) = curl_copies(&env.dir) else {
        eprintln!("skipped: needs curl to copy as the test application");
        return;
    };
    let rule = serde_json::json!({"Name": "lab curl", "ExecutablePath": allowed.display().to_string(), "Direction": "Outbound"});
    env.add_rule(rule).await;
    let mut m1 = env.enroll("m1", None, None);
    env.run(&mut m1, None, 10);
    env.wait_connected(&m1).await;
    let web = env.ext_v4(HTTP);
    assert!(env.fetch_with(&m1.host, &other, web), "before isolation");

    let action = env.isolate_selective(&m1).await;
    assert_eq!(action["scope"], "Selective");
    let machine = env.machine(&m1.machine_id).await;
    assert_eq!(machine["isolationScope"], "Selective");
    // Started after isolation: the excluded binary gets through, its twin doesn't.
    assert!(
        env.fetch_with(&m1.host, &allowed, web),
        "excluded binary\n{}",
        log_of(&m1)
    );
    assert!(
        !env.fetch_with(&m1.host, &other, web),
        "identical binary at another path"
    );
    assert_eq!(env.reach(&m1.host), NONE, "everything else stays cut");

    // Selective -> Full drops every exclusion.
    env.act(&m1, "isolate", "Succeeded").await;
    assert!(
        !env.fetch_with(&m1.host, &allowed, web),
        "Full ignores the exclusions"
    );
    env.act(&m1, "unisolate", "Succeeded").await;
    // The agent removed the cgroups it made.
    let root = agent::exclusions::cgroup2_root().unwrap();
    let mine = root.join(format!("cordon-{}", &m1.machine_id[..12]));
    let deadline = Instant::now() + Duration::from_secs(2);
    while mine.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!mine.exists(), "{} left behind", mine.display());
    env.kill(&mut m1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_rules_work_by_direction_and_change_live() {
    let _serial = SERIAL.lock().await;
    let Some(mut env) = Env::new(&[]).await else {
        return;
    };
    let ext = env.ext.v4;
    env.add_rule(serde_json::json!({"Name": "ext web", "RemoteAddresses": format!("{ext}"), "RemotePorts": "8080", "Direction": "Outbound"})).await;
    let mut m1 = env.enroll("m1", None, None);
    env.run(&mut m1, None, 10);
    env.wait_connected(&m1).await;
    let _m1_service = blocking(|| env.lab.start_responders(&m1.host, 7101, 7102, 8180)).unwrap();
    let m1_service = SocketAddr::new(IpAddr::V4(m1.host.v4), 7101);
    env.isolate_selective(&m1).await;

    // Any process reaches ext:8080, and nothing else.
    assert!(
        blocking(|| lab::http_get(&env.lab, &m1.host, env.ext_v4(HTTP), PROBE))
            .unwrap()
            .is_some()
    );
    assert!(!blocking(|| lab::tcp_echo(&env.lab, &m1.host, env.ext_v4(TCP), PROBE)).unwrap());
    assert!(
        !blocking(|| lab::tcp_echo(&env.lab, &env.ext, m1_service, PROBE)).unwrap(),
        "no inbound rule yet"
    );
    let version_before = env.machine(&m1.machine_id).await["exclusionRulesVersion"].clone();

    // An inbound rule added while isolated starts working within five seconds.
    let added = Instant::now();
    let inbound = env
        .add_rule(serde_json::json!({"Name": "ext to m1", "RemoteAddresses": [format!("{ext}/32")], "RemotePorts": ["7101"], "Direction": "Inbound"}))
        .await;
    loop {
        if blocking(|| lab::tcp_echo(&env.lab, &env.ext, m1_service, PROBE)).unwrap() {
            break;
        }
        assert!(
            added.elapsed() < Duration::from_secs(5),
            "inbound rule not in force\n{}",
            log_of(&m1)
        );
    }
    println!("lab: rule added -> enforced in {:?}", added.elapsed());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let version = env.machine(&m1.machine_id).await["exclusionRulesVersion"].clone();
        if version != version_before && !version.is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the machine doesn't show the applied rule-set version"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !blocking(|| lab::udp_echo(
            &env.lab,
            &env.ext,
            SocketAddr::new(IpAddr::V4(m1.host.v4), 7102),
            PROBE
        ))
        .unwrap(),
        "only the rule's port"
    );

    // Figures for BENCHMARKS.md: a rule change until the agent runs it.
    let mut changes = Vec::new();
    for i in 0..10 {
        let ports = if i % 2 == 0 {
            serde_json::json!(["7101", "7103"])
        } else {
            serde_json::json!(["7101"])
        };
        let started = Instant::now();
        let (status, changed) = env
            .call(
                Method::PATCH,
                &format!("/api/isolationExclusionRules/{inbound}"),
                Some(serde_json::json!({"RemotePorts": ports})),
            )
            .await;
        assert_eq!(status, 200, "{changed}");
        let version = changed["version"].clone();
        loop {
            if env.machine(&m1.machine_id).await["exclusionRulesVersion"] == version {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "version {version} not applied"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        changes.push(started.elapsed());
    }
    changes.sort();
    println!(
        "lab figures: rule change -> applied on the isolated machine median {:?}, max {:?} over {} changes",
        changes[changes.len() / 2],
        changes[changes.len() - 1],
        changes.len()
    );
    assert!(blocking(|| lab::tcp_echo(&env.lab, &env.ext, m1_service, PROBE)).unwrap());

    // Removing it stops it.
    let removed = Instant::now();
    let (status, _) = env
        .call(
            Method::DELETE,
            &format!("/api/isolationExclusionRules/{inbound}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    loop {
        if !blocking(|| lab::tcp_echo(&env.lab, &env.ext, m1_service, PROBE)).unwrap() {
            break;
        }
        assert!(
            removed.elapsed() < Duration::from_secs(5),
            "inbound rule still in force"
        );
    }
    println!("lab: rule removed -> enforced in {:?}", removed.elapsed());
    assert!(
        blocking(|| lab::http_get(&env.lab, &m1.host, env.ext_v4(HTTP), PROBE))
            .unwrap()
            .is_some()
    );
    env.kill(&mut m1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_rule_matches_the_units_cgroup() {
    let _serial = SERIAL.lock().await;
    let Some(mut env) = Env::new(&[]).await else {
        return;
    };
    let Some(root) = agent::exclusions::cgroup2_root() else {
        eprintln!("skipped: no cgroup v2 on this host");
        return;
    };
    let Some((curl, _)) = curl_copies(&env.dir) else {
        eprintln!("skipped: needs curl");
        return;
    };
    // A stand-in for a running systemd unit: a cgroup of that name.
    let unit = format!("cordon-lab-{}.service", std::process::id());
    let unit_dir = root.join(&unit);
    std::fs::create_dir_all(&unit_dir).unwrap();
    env.add_rule(serde_json::json!({"Name": "lab unit", "SystemdUnit": unit, "RemotePorts": "8080", "Direction": "Outbound"})).await;
    let mut m1 = env.enroll("m1", None, None);
    env.run(&mut m1, None, 10);
    env.wait_connected(&m1).await;
    env.isolate_selective(&m1).await;

    let url = format!("http://{}/", env.ext_v4(HTTP));
    let in_unit = format!(
        "echo $$ > {}/cgroup.procs && exec {} -s -m 2 {url}",
        unit_dir.display(),
        curl.display()
    );
    let outside = format!("exec {} -s -m 2 {url}", curl.display());
    let run = |script: &str| {
        let out = blocking(|| env.lab.exec(&m1.host, "sh", &["-c", script])).unwrap();
        out.status.success() && String::from_utf8_lossy(&out.stdout) == lab::HTTP_BODY
    };
    let (inside_ok, outside_ok) = (run(&in_unit), run(&outside));
    env.kill(&mut m1);
    let _ = std::fs::remove_dir(&unit_dir);
    assert!(
        inside_ok,
        "a process of the unit gets through\n{}",
        log_of(&m1)
    );
    assert!(!outside_ok, "the same program outside the unit does not");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reports_the_name_given_at_enrollment() {
    let _serial = SERIAL.lock().await;
    let Some(mut env) = Env::new(&[]).await else {
        return;
    };
    // Enrolled with --name m1; run without --name, as the systemd unit does.
    let mut m1 = env.enroll("m1", None, None);
    let log = std::fs::File::create(&m1.log).unwrap();
    let mut command = Command::new(AGENT);
    command
        .args(["run", "--state-dir", m1.state_dir.to_str().unwrap()])
        .env_remove("CORDON_AGENT_NAME")
        .env("CORDON_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log);
    m1.pid = Some(blocking(|| env.lab.spawn(&m1.host, command)).unwrap());
    env.wait_connected(&m1).await;
    let machine = env.machine(&m1.machine_id).await;
    assert_eq!(machine["computerDnsName"], "m1", "{machine}");

    // `run --name` overrides it, for that run.
    env.kill(&mut m1);
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(&m1.log)
        .unwrap();
    let mut command = Command::new(AGENT);
    command
        .args(["run", "--state-dir", m1.state_dir.to_str().unwrap()])
        .args(["--name", "m1-renamed"])
        .env("CORDON_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log);
    m1.pid = Some(blocking(|| env.lab.spawn(&m1.host, command)).unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let machine = env.machine(&m1.machine_id).await;
        if machine["computerDnsName"] == "m1-renamed" {
            break;
        }
        assert!(Instant::now() < deadline, "{machine}\n{}", log_of(&m1));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.kill(&mut m1);
}
