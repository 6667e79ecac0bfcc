//! `cordon-bench`: measures the server as BENCHMARKS.md reports it.
//!
//! It runs a release `cordon serve` as a separate process on loopback (the
//! binary next to this one), prepares machines in its data directory, and
//! drives it over HTTPS with keep-alive connections: isolate/unisolate
//! throughput and latency with durable commits, GET of one action, and the
//! time from a 201 to the pushed action's arrival at a connected agent,
//! lists as an application and as a group-scoped user, and the time a
//! failed sign-in takes for an unknown account and for a wrong password.
//! Each figure is the median of several rounds.

mod store_scale;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::HttpsClient;
use anyhow::{Context, bail};
use http::Method;
use proto::agent::{Enforced, ServerMessage};

const ROUNDS: usize = 3;
const BENCH_USER: &str = "bench@example.com";
const BENCH_PASSWORD: &str = "bench password, long enough";
const SIGNIN_ATTEMPTS: usize = 60;
const CONCURRENCY: usize = 32;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    values[values.len() / 2]
}

struct Server {
    child: Child,
    url: String,
    ca: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(data: &Path) -> anyhow::Result<Server> {
    let exe = std::env::current_exe()?.with_file_name("cordon");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(&exe)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("CORDON_DATA_DIR", data)
        .env("CORDON_RATE_LIMIT_PER_MINUTE", "0")
        .env("CORDON_RATE_LIMIT_PER_HOUR", "0")
        // The sign-in timing figure makes many failed attempts on purpose.
        .env("CORDON_SIGNIN_FAILURES_PER_USER", "0")
        .env("CORDON_SIGNIN_FAILURES_PER_SOURCE", "0")
        .env("CORDON_LOG", "warn")
        // The machines were written into the throwaway store before the
        // server first ran, so no CA exists yet: let it make one.
        .env("CORDON_NEW_CA", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| {
            format!(
                "cannot run {} (build it with --release first)",
                exe.display()
            )
        })?;
    let ca = data.join("ca.pem");
    let server = Server {
        child,
        url: format!("https://localhost:{port}"),
        ca,
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && server.ca.exists() {
            return Ok(server);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the server did not start")
}

async fn client(server: &Server) -> anyhow::Result<HttpsClient> {
    HttpsClient::new(agent::https::tls_config(&server.ca)?, &server.url)
}

/// Posts a token request's form fields to `path`.
async fn token_request(
    http: &mut HttpsClient,
    path: &str,
    fields: &[(&str, &str)],
) -> anyhow::Result<agent::Reply> {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    http.request(
        Method::POST,
        path,
        &[("content-type", "application/x-www-form-urlencoded")],
        body,
    )
    .await
}

fn access_token(reply: &agent::Reply) -> anyhow::Result<String> {
    Ok(reply.json()?["access_token"]
        .as_str()
        .with_context(|| format!("no token: {}", String::from_utf8_lossy(&reply.body)))?
        .to_owned())
}

/// An application token (client credentials).
async fn token(
    server: &Server,
    tenant: &str,
    client_id: &str,
    secret: &str,
) -> anyhow::Result<String> {
    let fields = [
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_secret", secret),
        ("scope", "https://api.securitycenter.microsoft.com/.default"),
    ];
    let path = format!("/{tenant}/oauth2/v2.0/token");
    access_token(&token_request(&mut client(server).await?, &path, &fields).await?)
}

/// The v1 password grant's fields for `user`.
fn password_fields<'a>(user: &'a str, password: &'a str) -> [(&'a str, &'a str); 5] {
    [
        ("grant_type", "password"),
        ("client_id", "cordon-console"),
        ("username", user),
        ("password", password),
        ("resource", "https://api.securitycenter.microsoft.com"),
    ]
}

/// A delegated token from the v1 password grant.
async fn password_token(
    server: &Server,
    tenant: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<String> {
    let path = format!("/{tenant}/oauth2/token");
    let fields = password_fields(user, password);
    access_token(&token_request(&mut client(server).await?, &path, &fields).await?)
}

/// Runs `requests` (path, body) over `CONCURRENCY` connections; returns the
/// wall time and every request's latency. Every reply must have `expect`.
async fn load(
    server: &Server,
    token: &str,
    method: Method,
    requests: Vec<(String, Option<String>)>,
    expect: u16,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let requests = Arc::new(std::sync::Mutex::new(requests));
    let auth = Arc::new(format!("Bearer {token}"));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let requests = requests.clone();
        let auth = auth.clone();
        let method = method.clone();
        let mut http = client(server).await?;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let next = requests.lock().expect("lock").pop();
                let Some((path, body)) = next else { break };
                let t0 = Instant::now();
                let reply = http
                    .request(
                        method.clone(),
                        &path,
                        &[
                            ("authorization", &auth),
                            ("content-type", "application/json"),
                        ],
                        body.unwrap_or_default(),
                    )
                    .await?;
                latencies.push(t0.elapsed());
                if reply.status.as_u16() != expect {
                    bail!(
                        "{path}: {} {}",
                        reply.status,
                        String::from_utf8_lossy(&reply.body)
                    );
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let wall = started.elapsed();
    all.sort();
    Ok((wall, all))
}

fn report(label: &str, rates: &mut [f64], p50s: &mut [f64], p99s: &mut [f64]) {
    println!(
        "{label:<34} {:>9.0} req/s   p50 {:>6.2} ms   p99 {:>6.2} ms   (median of {} rounds; rounds: {})",
        median(rates),
        median(p50s),
        median(p99s),
        rates.len(),
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// Measures a release `cordon serve` on loopback, as BENCHMARKS.md reports
/// it: build with `cargo build --release` first (it runs the `cordon` binary
/// beside this one). Without a subcommand it runs the API benchmark (`api`).
#[derive(clap::Parser)]
#[command(name = "cordon-bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Benchmark>,
    /// How many enrolled machines to prepare (the API benchmark).
    #[arg(default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    machines: u32,
}

#[derive(clap::Subcommand)]
enum Benchmark {
    /// The API benchmark: isolate/unisolate, GET one action, scoped lists,
    /// sign-in timing and push latency (the default; takes a few minutes).
    Api {
        /// How many enrolled machines to prepare.
        #[arg(default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
        machines: u32,
    },
    /// Simulated agents held by one server while the API isolates and
    /// releases random machines: 201 -> Succeeded latency, server memory a
    /// session, restarts, offline agents.
    Fleet(Box<bench::fleet::FleetArgs>),
    /// A store of millions of actions (5 million over 100,000 machines by
    /// default), filled directly, then the lists on it through the API.
    Store(Box<store_scale::StoreCli>),
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = <Cli as clap::Parser>::parse();
    match cli.command {
        None => api(cli.machines).await,
        Some(Benchmark::Api { machines }) => api(machines).await,
        Some(Benchmark::Fleet(args)) => fleet(*args).await,
        Some(Benchmark::Store(args)) => store_scale::main(*args).await,
    }
}

async fn fleet(args: bench::fleet::FleetArgs) -> anyhow::Result<()> {
    let report = bench::fleet::run(args.options()?).await?;
    bench::fleet::print(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

async fn api(machines: u32) -> anyhow::Result<()> {
    let machines = machines as usize;
    let data = std::env::temp_dir().join(format!("cordon-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;

    // Prepare the data directory: an app and `machines` enrolled machines.
    let store = server::init_data_dir(&data)?;
    let tenant = server::tenant_id(&store).await?;
    let bench::Prepared {
        client_id,
        secret,
        enroll_token,
    } = bench::prepare_store(&store, "bench").await?;
    let mut ids = Vec::new();
    for i in 0..machines {
        let id = server::crypto::new_machine_id();
        store
            .enroll_machine(
                server::crypto::sha256_hex(enroll_token.as_bytes()),
                id.clone(),
                // One key per machine: a key enrolls once.
                (i as u64).to_le_bytes().repeat(4),
                store::Facts {
                    computer_dns_name: format!("bench-{i}"),
                    ..Default::default()
                },
                server::now_nanos(),
            )
            .await?;
        ids.push(id);
    }
    // A Responder whose user group reaches one of two machine groups (the
    // machines named bench-1…; the other group holds bench-2…), for the
    // scoped-list figure; and the account the sign-in timing figure tries
    // wrong passwords on.
    for (name, prefix, user_group) in [("one", "bench-1", "g1"), ("two", "bench-2", "g2")] {
        store
            .create_group(store::NewGroup {
                name: name.into(),
                rank: 1,
                match_tag: None,
                match_name_prefix: Some(prefix.into()),
                match_os: None,
                user_groups: vec![user_group.into()],
                now: server::now_nanos(),
            })
            .await?;
    }
    store
        .create_user(store::UserRecord {
            id: server::crypto::new_guid(),
            upn: BENCH_USER.into(),
            display_name: BENCH_USER.into(),
            password_hash: server::crypto::hash_secret(BENCH_PASSWORD),
            role: "Responder".into(),
            user_groups: vec!["g1".into()],
            disabled: false,
            created_at: server::now_nanos(),
        })
        .await?;
    drop(store);

    let server = start_server(&data)?;
    let token = token(&server, &tenant, &client_id, &secret).await?;
    println!(
        "cordon-bench: {machines} machines, {CONCURRENCY} connections, {ROUNDS} rounds, server pid {}",
        server.child.id()
    );

    // Isolate, then (after cancelling) unisolate every machine: each a durable commit.
    let (mut rates, mut p50s, mut p99s) = (Vec::new(), Vec::new(), Vec::new());
    let mut last_actions: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        let kind = if round % 2 == 0 {
            "isolate"
        } else {
            "unisolate"
        };
        let requests = ids
            .iter()
            .map(|id| {
                (
                    format!("/api/machines/{id}/{kind}"),
                    Some(r#"{"Comment":"bench"}"#.to_owned()),
                )
            })
            .collect();
        let (wall, latencies) = load(&server, &token, Method::POST, requests, 201).await?;
        rates.push(latencies.len() as f64 / wall.as_secs_f64());
        p50s.push(percentile(&latencies, 0.5).as_secs_f64() * 1e3);
        p99s.push(percentile(&latencies, 0.99).as_secs_f64() * 1e3);
        // Free the machines for the next round.
        let mut http = client(&server).await?;
        let auth = format!("Bearer {token}");
        let mut link = Some("/api/machineactions?$filter=status%20eq%20'Pending'".to_owned());
        last_actions.clear();
        while let Some(path) = link {
            let page = http
                .request(Method::GET, &path, &[("authorization", &auth)], Vec::new())
                .await?
                .json()?;
            for a in page["value"].as_array().context("value")? {
                last_actions.push(a["id"].as_str().context("id")?.to_owned());
            }
            link = page["@odata.nextLink"]
                .as_str()
                .map(|l| l[server.url.len()..].to_owned());
        }
        let cancels = last_actions
            .iter()
            .map(|id| {
                (
                    format!("/api/machineactions/{id}/cancel"),
                    Some("{}".to_owned()),
                )
            })
            .collect();
        load(&server, &token, Method::POST, cancels, 200).await?;
    }
    report(
        "isolate/unisolate (durable)",
        &mut rates,
        &mut p50s,
        &mut p99s,
    );

    // GET one action.
    let (mut rates, mut p50s, mut p99s) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let requests = (0..20_000)
            .map(|i| {
                (
                    format!(
                        "/api/machineactions/{}",
                        last_actions[i % last_actions.len()]
                    ),
                    None,
                )
            })
            .collect();
        let (wall, latencies) = load(&server, &token, Method::GET, requests, 200).await?;
        rates.push(latencies.len() as f64 / wall.as_secs_f64());
        p50s.push(percentile(&latencies, 0.5).as_secs_f64() * 1e3);
        p99s.push(percentile(&latencies, 0.99).as_secs_f64() * 1e3);
    }
    report(
        "GET /api/machineactions/{id}",
        &mut rates,
        &mut p50s,
        &mut p99s,
    );

    // Scoped lists: the same query as the app (every machine) and as the
    // Responder (the machines of one group and the default group).
    let user_token = password_token(&server, &tenant, BENCH_USER, BENCH_PASSWORD).await?;
    for (label, path) in [
        ("GET /api/machines?$top=100", "/api/machines?$top=100"),
        (
            "GET /api/machineactions?$top=100",
            "/api/machineactions?$top=100",
        ),
    ] {
        let mut figures = Vec::new();
        for (who, bearer) in [("app", &token), ("user", &user_token)] {
            let (mut rates, mut p50s, mut p99s) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                let requests = (0..2_000).map(|_| (path.to_owned(), None)).collect();
                let (wall, latencies) = load(&server, bearer, Method::GET, requests, 200).await?;
                rates.push(latencies.len() as f64 / wall.as_secs_f64());
                p50s.push(percentile(&latencies, 0.5).as_secs_f64() * 1e3);
                p99s.push(percentile(&latencies, 0.99).as_secs_f64() * 1e3);
            }
            report(
                &format!("{label} ({who})"),
                &mut rates,
                &mut p50s,
                &mut p99s,
            );
            figures.push(median(&mut rates));
        }
        println!(
            "  scoped/unscoped throughput ratio: {:.2}",
            figures[1] / figures[0]
        );
    }

    // Sign-in timing: an unknown account and a wrong password for a real
    // one, alternating, one at a time. The two medians should match.
    let mut http = client(&server).await?;
    let (mut unknown, mut wrong) = (Vec::new(), Vec::new());
    for i in 0..SIGNIN_ATTEMPTS {
        for (user, into) in [
            (format!("nobody-{i}@example.com"), &mut unknown),
            (BENCH_USER.to_owned(), &mut wrong),
        ] {
            let fields = password_fields(&user, "not the password");
            let t0 = Instant::now();
            let reply =
                token_request(&mut http, &format!("/{tenant}/oauth2/token"), &fields).await?;
            into.push(t0.elapsed().as_secs_f64() * 1e3);
            if reply.status != 400 {
                bail!("sign-in timing: expected 400, got {}", reply.status);
            }
        }
    }
    let (unknown_ms, wrong_ms) = (median(&mut unknown), median(&mut wrong));
    println!(
        "failed sign-in, unknown account      median {unknown_ms:>6.2} ms; wrong password median {wrong_ms:>6.2} ms; ratio {:.3} ({SIGNIN_ATTEMPTS} each)",
        unknown_ms / wrong_ms
    );

    // 201 -> pushed action at a connected agent.
    let state = data.join("agent");
    let identity = agent::enroll(
        &server.url,
        &enroll_token,
        &server.ca,
        &state,
        Some("push-target"),
    )
    .await?;
    let mut session = agent::Session::open(
        &identity,
        agent::host_facts(Some("push-target")),
        Enforced::NotIsolated,
    )
    .await?;
    let mut http = client(&server).await?;
    let auth = format!("Bearer {token}");
    let mut after_201 = Vec::new();
    let mut from_request = Vec::new();
    for i in 0..400 {
        let kind = if i % 2 == 0 { "isolate" } else { "unisolate" };
        let t0 = Instant::now();
        let reply = http
            .request(
                Method::POST,
                &format!("/api/machines/{}/{kind}", identity.machine_id),
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                r#"{"Comment":"push bench"}"#,
            )
            .await?;
        let t_201 = Instant::now();
        if reply.status != 201 {
            bail!(
                "push round: {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        let id = reply.json()?["id"].as_str().context("id")?.to_owned();
        let arrived = loop {
            match tokio::time::timeout(Duration::from_secs(5), session.recv()).await?? {
                ServerMessage::Action(order) if order.action_id == id => break Instant::now(),
                _ => continue,
            }
        };
        after_201.push(arrived.saturating_duration_since(t_201));
        from_request.push(arrived - t0);
        // Complete it so the next one can be created.
        agent_complete(&mut session, &id, kind).await?;
        loop {
            let action = http
                .request(
                    Method::GET,
                    &format!("/api/machineactions/{id}"),
                    &[("authorization", &auth)],
                    Vec::new(),
                )
                .await?
                .json()?;
            if action["status"] == "Succeeded" {
                break;
            }
        }
    }
    after_201.sort();
    from_request.sort();
    println!(
        "201 -> action at agent               p50 {:>6.3} ms   p99 {:>6.3} ms   (0 = arrived before the client read the 201; {} actions)",
        percentile(&after_201, 0.5).as_secs_f64() * 1e3,
        percentile(&after_201, 0.99).as_secs_f64() * 1e3,
        after_201.len()
    );
    println!(
        "request sent -> action at agent      p50 {:>6.3} ms   p99 {:>6.3} ms",
        percentile(&from_request, 0.5).as_secs_f64() * 1e3,
        percentile(&from_request, 0.99).as_secs_f64() * 1e3,
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

async fn agent_complete(session: &mut agent::Session, id: &str, kind: &str) -> anyhow::Result<()> {
    use proto::agent::AgentMessage;
    session
        .send(&AgentMessage::Ack {
            action_id: id.into(),
        })
        .await?;
    loop {
        if let ServerMessage::Proceed { action_id } = session.recv().await?
            && action_id == id
        {
            break;
        }
    }
    let enforced = if kind == "isolate" {
        Enforced::Full
    } else {
        Enforced::NotIsolated
    };
    session
        .send(&AgentMessage::Result {
            action_id: id.into(),
            succeeded: true,
            error_h_result: 0,
            reason: None,
            enforced,
        })
        .await?;
    Ok(())
}
