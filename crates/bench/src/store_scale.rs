//! `cordon-bench store`: list latency on a big store (BENCHMARKS.md, "A big
//! store").
//!
//! It fills a fresh data directory with `--machines` machines and
//! `--actions` actions (direct inserts in large transactions, then the
//! machine groups through the store, which assigns every machine), starts
//! a release `cordon serve` on it and measures the lists over HTTPS with
//! keep-alive connections, as an application and as two group-scoped
//! users: one whose groups hold most machines, one whose group holds 0.1%
//! of them. With `--before <older cordon>` it first fills the store at the
//! schema before migration 8, measures that binary on it, then times
//! migration 8 and measures the `cordon` beside this one on the same rows.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent::HttpsClient;
use anyhow::{Context, bail};
use http::Method;
use rusqlite::params;

use crate::{Server, median, percentile};

/// The schema `--before` measures: the one before this benchmark's indexes.
const BEFORE_SCHEMA: usize = 7;
const DAY: i64 = 86_400 * 1_000_000_000;
/// Connections of the throughput phase (the machine has 2 cores).
const CONNECTIONS: usize = 8;
/// A phase stops after this long even if it has not made all its requests
/// (slow queries before the indexes take seconds each).
const PHASE_LIMIT: Duration = Duration::from_secs(6);

/// `cordon-bench store`: fills a big store and measures the lists on it.
#[derive(clap::Args)]
pub struct StoreCli {
    /// How many actions to write.
    #[arg(long, default_value_t = 5_000_000)]
    actions: u64,
    /// How many machines to write (every one has actions).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(10..))]
    machines: u32,
    /// Also write the figures here, as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Measure this older `cordon` binary first, on the same rows at the
    /// schema before migration 8; then migrate and measure the new one.
    #[arg(long)]
    before: Option<PathBuf>,
    /// Measurement rounds (each figure is the median of the rounds).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Where to make the data directory (removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the data directory at the end (to look at its queries).
    #[arg(long)]
    keep: bool,
}

/// A small, fast generator (SplitMix64): the rows need variety, not secrecy.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn guid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }
    fn hex(&mut self, bytes: usize) -> String {
        let mut out = String::with_capacity(bytes * 2);
        while out.len() < bytes * 2 {
            out.push_str(&format!("{:016x}", self.next()));
        }
        out.truncate(bytes * 2);
        out
    }
}

/// The machine group a machine's name puts it in (by prefix), and its name.
fn machine_name(i: u32) -> String {
    let prefix = if i % 1000 == 999 {
        "lab"
    } else if i % 100 < 10 {
        "fin"
    } else if i % 100 < 30 {
        "eng"
    } else {
        "ws"
    };
    format!("{prefix}-{i:07}")
}

struct Filled {
    machine_ids: Vec<String>,
    /// The machines of the narrow user's group.
    lab_ids: Vec<String>,
    tenant: String,
    client_id: String,
    secret: String,
    seconds: f64,
}

const WIDE_USER: &str = "wide@example.com";
const NARROW_USER: &str = "narrow@example.com";
const PASSWORD: &str = "bench password, long enough";

async fn fill(data: &Path, cli: &StoreCli, schema: usize) -> anyhow::Result<Filled> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let started = Instant::now();
    std::fs::DirBuilder::new().mode(0o700).create(data)?;
    let db = data.join(server::DATABASE_FILE);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&db)?;
    let store = store::Store::open_migrated_to(&db, schema)?;
    let tenant = server::tenant_id(&store).await?;
    let bench::Prepared {
        client_id, secret, ..
    } = bench::prepare_store(&store, "bench").await?;
    drop(store);

    let machines = cli.machines;
    let now = server::now_nanos();
    let mut rng = Rng(0x00c0_ffee);
    let mut conn = rusqlite::Connection::open(&db)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    // The store's writer thread closes its connection after the drop
    // above returned, and leaving WAL mode needs the file alone (SQLite
    // answers "locked" at once, without waiting): try again a while.
    let mut tries = 0;
    while let Err(e) = conn.execute_batch("PRAGMA journal_mode = DELETE") {
        tries += 1;
        if tries == 200 {
            return Err(e.into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    conn.execute_batch(
        "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -2000000;",
    )?;
    let platforms = [
        ("Ubuntu", "24.04"),
        ("Debian", "12"),
        ("RedHatEnterpriseLinux", "9.4"),
        ("Fedora", "41"),
    ];
    let mut machine_ids = Vec::with_capacity(machines as usize);
    let mut lab_ids = Vec::new();
    let tx = conn.transaction()?;
    {
        let mut machine = tx.prepare(
            "INSERT INTO machines (id, public_key, computer_dns_name, first_seen, last_seen, \
             os_platform, os_version, os_processor, os_architecture, os_build, agent_version, \
             last_ip_address, last_external_ip_address) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'x64', '64-bit', ?8, '0.1.0', ?9, ?10)",
        )?;
        let mut address = tx.prepare(
            "INSERT INTO machine_addresses (machine_id, position, ip_address, mac_address, \
             interface_type, operational_status) VALUES (?1, 0, ?2, ?3, 'Ethernet', 'Up')",
        )?;
        let mut tag = tx.prepare("INSERT INTO machine_tags (machine_id, tag) VALUES (?1, ?2)")?;
        for i in 0..machines {
            let id = rng.hex(20);
            let name = machine_name(i);
            let (platform, version) = platforms[rng.below(4) as usize];
            // Most agents are connected (seen within the last minute);
            // some have been gone for days.
            let last_seen = if rng.below(10) < 8 {
                now - rng.below(60_000_000_000) as i64
            } else {
                now - rng.below(30 * DAY as u64) as i64
            };
            let ip = format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255);
            machine.execute(params![
                id,
                rng.hex(32).into_bytes(),
                name,
                now - 400 * DAY,
                last_seen,
                platform,
                version,
                6000 + rng.below(100) as i64,
                ip,
                format!("203.0.113.{}", i % 250),
            ])?;
            address.execute(params![id, ip, format!("02:00:{}", &rng.hex(4))])?;
            if rng.below(5) == 0 {
                tag.execute(params![id, ["prod", "dev", "pci"][rng.below(3) as usize]])?;
            }
            if name.starts_with("lab-") {
                lab_ids.push(id.clone());
            }
            machine_ids.push(id);
        }
    }
    tx.commit()?;

    // Which machine each action is for: every machine has at least one,
    // the rest are spread at random.
    let total = cli.actions.max(u64::from(machines));
    let mut owner: Vec<u32> = (0..total)
        .map(|k| {
            if k < u64::from(machines) {
                k as u32
            } else {
                rng.below(u64::from(machines)) as u32
            }
        })
        .collect();
    // Shuffle the first `machines` among the first tenth, so that the
    // start of the table does not hold every machine once in order.
    let head = (total / 10).max(u64::from(machines)) as usize;
    for k in (1..head).rev() {
        owner.swap(k, rng.below(k as u64 + 1) as usize);
    }
    let mut remaining = vec![0u32; machines as usize];
    for &m in &owner {
        remaining[m as usize] += 1;
    }
    let mut isolated = vec![false; machines as usize];
    let mut in_flight: Vec<Option<&'static str>> = vec![None; machines as usize];
    let requestors: Vec<String> = (0..4)
        .map(|_| rng.guid())
        .chain((0..12).map(|n| format!("analyst{n}@example.com")))
        .collect();
    let span = 365 * DAY;
    let step = span / total as i64;
    let mut k = 0u64;
    while k < total {
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO actions (id, action_type, title, requestor, requestor_comment, \
                 status, machine_id, computer_dns_name, created_at, updated_at, \
                 cancellation_requestor, cancellation_comment, cancellation_at, error_hresult, \
                 scope, request_source, troubleshoot_info) \
                 VALUES (?1, ?2, NULL, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, \
                 'PublicApi', ?15)",
            )?;
            let end = (k + 200_000).min(total);
            while k < end {
                let m = owner[k as usize] as usize;
                remaining[m] -= 1;
                let kind = if isolated[m] { "Unisolate" } else { "Isolate" };
                let mut created = now - span + k as i64 * step + rng.below(step as u64) as i64;
                let roll = rng.below(100);
                let mut status = match roll {
                    0..85 => "Succeeded",
                    85..91 => "Failed",
                    91..96 => "Cancelled",
                    _ => "TimeOut",
                };
                // One machine in a hundred has its last action in flight.
                if remaining[m] == 0 && m % 100 == 7 {
                    status = if m % 200 == 7 {
                        "Pending"
                    } else {
                        "InProgress"
                    };
                    created = now - rng.below(60_000_000_000) as i64;
                    in_flight[m] = Some(if kind == "Isolate" {
                        "Isolating"
                    } else {
                        "Releasing"
                    });
                }
                let updated = if status == "Pending" {
                    created
                } else {
                    created + rng.below(120_000_000_000) as i64
                };
                if status == "Succeeded" {
                    isolated[m] = !isolated[m];
                }
                let requestor = &requestors[rng.below(requestors.len() as u64) as usize];
                let cancelled = status == "Cancelled";
                let (hresult, info) = match status {
                    "Failed" => (
                        -2147467259i64,
                        Some("The agent could not apply the action."),
                    ),
                    "TimeOut" => (
                        0,
                        Some("The machine did not receive the action within the delivery window."),
                    ),
                    _ => (0, None),
                };
                let scope = (kind == "Isolate").then(|| {
                    if rng.below(5) == 0 {
                        "Selective"
                    } else {
                        "Full"
                    }
                });
                insert.execute(params![
                    rng.guid(),
                    kind,
                    requestor,
                    format!("Contain the host after alert {}", rng.below(1_000_000)),
                    status,
                    machine_ids[m],
                    machine_name(m as u32),
                    created,
                    updated,
                    cancelled.then_some(requestor),
                    cancelled.then_some("raised in error"),
                    cancelled.then_some(updated),
                    hresult,
                    scope,
                    info,
                ])?;
                k += 1;
            }
        }
        tx.commit()?;
    }
    let tx = conn.transaction()?;
    {
        let mut state = tx.prepare(
            "UPDATE machines SET isolation_state = ?2, isolation_scope = ?3 WHERE id = ?1",
        )?;
        for m in 0..machines as usize {
            let scope = isolated[m].then_some("Full");
            let settled = if isolated[m] {
                "Isolated"
            } else {
                "NotIsolated"
            };
            if isolated[m] || in_flight[m].is_some() {
                state.execute(params![
                    machine_ids[m],
                    in_flight[m].unwrap_or(settled),
                    scope
                ])?;
            }
        }
    }
    tx.commit()?;
    conn.execute_batch("PRAGMA journal_mode = WAL;")?;
    drop(conn);

    // Groups through the store, which assigns every machine; the default
    // group stays empty (`ws` takes what the others leave).
    let store = store::Store::open_migrated_to(&db, schema)?;
    for (rank, (name, prefix)) in [
        ("lab", "lab-"),
        ("fin", "fin-"),
        ("eng", "eng-"),
        ("ws", "ws-"),
    ]
    .into_iter()
    .enumerate()
    {
        store
            .create_group(store::NewGroup {
                name: name.into(),
                rank: rank as i64 + 1,
                match_tag: None,
                match_name_prefix: Some(prefix.into()),
                match_os: None,
                user_groups: vec![format!("g-{name}")],
                now,
            })
            .await?;
    }
    for (upn, groups) in [
        (WIDE_USER, vec!["g-ws", "g-fin"]),
        (NARROW_USER, vec!["g-lab"]),
    ] {
        store
            .create_user(store::UserRecord {
                id: server::crypto::new_guid(),
                upn: upn.into(),
                display_name: upn.into(),
                password_hash: server::crypto::hash_secret(PASSWORD),
                role: "Responder".into(),
                user_groups: groups.into_iter().map(str::to_owned).collect(),
                disabled: false,
                created_at: now,
            })
            .await?;
    }
    drop(store);
    Ok(Filled {
        machine_ids,
        lab_ids,
        tenant,
        client_id,
        secret,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn start(exe: &Path, data: &Path) -> anyhow::Result<Server> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(exe)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("CORDON_DATA_DIR", data)
        .env("CORDON_RATE_LIMIT_PER_MINUTE", "0")
        .env("CORDON_RATE_LIMIT_PER_HOUR", "0")
        .env("CORDON_LOG", "warn")
        .env("CORDON_NEW_CA", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    let server = Server {
        child,
        url: format!("https://localhost:{port}"),
        ca: data.join("ca.pem"),
    };
    // A migration on a big store can take a while before the server listens.
    for _ in 0..1200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && server.ca.exists() {
            return Ok(server);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the server did not start")
}

/// One measured figure: latency of one client, throughput of several.
#[derive(Clone, Debug, Default)]
struct Figure {
    p50_ms: f64,
    p99_ms: f64,
    rps: f64,
    rows: usize,
}

/// Requests `paths` (cycling) one at a time on one connection, then on
/// [`CONNECTIONS`] at once, each phase up to `count` requests or
/// [`PHASE_LIMIT`]; every reply must be 200.
async fn round(
    server: &Server,
    bearer: &str,
    paths: &[String],
    count: usize,
) -> anyhow::Result<Figure> {
    let auth = format!("Bearer {bearer}");
    let mut http = crate::client(server).await?;
    // Warm the connection (TLS handshake) outside the figures.
    get(&mut http, &auth, &paths[0]).await?;
    let mut latencies = Vec::new();
    let started = Instant::now();
    let mut rows = 0;
    while latencies.len() < count && (latencies.is_empty() || started.elapsed() < PHASE_LIMIT) {
        let path = &paths[latencies.len() % paths.len()];
        let t0 = Instant::now();
        rows = get(&mut http, &auth, path).await?;
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let completed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let mut http = crate::client(server).await?;
        let (auth, paths) = (auth.clone(), paths.to_vec());
        let (done, completed) = (done.clone(), completed.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            loop {
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= count || (n >= CONNECTIONS && started.elapsed() >= PHASE_LIMIT) {
                    break;
                }
                get(&mut http, &auth, &paths[i % paths.len()]).await?;
                completed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                i += CONNECTIONS;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let made = completed.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Figure {
        p50_ms: percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        p99_ms: percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        rps: made as f64 / started.elapsed().as_secs_f64(),
        rows,
    })
}

/// GETs `path`; the number of rows in the page.
async fn get(http: &mut HttpsClient, auth: &str, path: &str) -> anyhow::Result<usize> {
    let reply = http
        .request(Method::GET, path, &[("authorization", auth)], Vec::new())
        .await?;
    if reply.status != 200 {
        bail!(
            "{path}: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
    }
    Ok(reply.json()?["value"].as_array().map_or(0, Vec::len))
}

/// The console's paging: 50 machines a page, by name, with the count.
const CONSOLE_PAGE: &str = "$orderby=computerDnsName&$top=50&$count=true";

/// Every figure of one server, by label.
async fn measure(
    server: &Server,
    filled: &Filled,
    rounds: usize,
) -> anyhow::Result<Vec<(String, Figure)>> {
    let app = crate::token(server, &filled.tenant, &filled.client_id, &filled.secret).await?;
    let wide = crate::password_token(server, &filled.tenant, WIDE_USER, PASSWORD).await?;
    let narrow = crate::password_token(server, &filled.tenant, NARROW_USER, PASSWORD).await?;
    let mut rng = Rng(0x5eed);
    let by_machine = |ids: &[String], rng: &mut Rng| -> Vec<String> {
        (0..500)
            .map(|_| {
                format!(
                    "/api/machineactions?$filter=machineId%20eq%20'{}'",
                    ids[rng.below(ids.len() as u64) as usize]
                )
            })
            .collect()
    };
    // Machines the wide user reaches (ws and fin: names say which).
    let wide_ids: Vec<String> = filled
        .machine_ids
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            let name = machine_name(*i as u32);
            name.starts_with("ws-") || name.starts_with("fin-")
        })
        .map(|(_, id)| id.clone())
        .collect();
    let deep_machines = filled.machine_ids.len() / 2;
    let one = |p: &str| vec![p.to_owned()];
    let scenarios: Vec<(&str, &str, Vec<String>, usize)> = vec![
        (
            "actions of one machine",
            "app",
            by_machine(&filled.machine_ids, &mut rng),
            500,
        ),
        (
            "actions of one machine",
            "wide",
            by_machine(&wide_ids, &mut rng),
            500,
        ),
        (
            "actions of one machine",
            "narrow",
            by_machine(&filled.lab_ids, &mut rng),
            500,
        ),
        (
            "machines $top=100",
            "app",
            one("/api/machines?$top=100"),
            300,
        ),
        (
            "machines $top=100",
            "wide",
            one("/api/machines?$top=100"),
            300,
        ),
        (
            "machines $top=100",
            "narrow",
            one("/api/machines?$top=100"),
            300,
        ),
        (
            "actions $top=100",
            "app",
            one("/api/machineactions?$top=100"),
            300,
        ),
        (
            "actions $top=100",
            "wide",
            one("/api/machineactions?$top=100"),
            300,
        ),
        (
            "actions $top=100",
            "narrow",
            one("/api/machineactions?$top=100"),
            300,
        ),
        (
            "machines $skip=half $top=100",
            "app",
            one(&format!("/api/machines?$top=100&$skip={deep_machines}")),
            100,
        ),
        (
            "actions $skip=1000000 $top=100",
            "app",
            one("/api/machineactions?$top=100&$skip=1000000"),
            20,
        ),
        (
            "actions status eq 'Pending'",
            "app",
            one("/api/machineactions?$top=100&$filter=status%20eq%20'Pending'"),
            100,
        ),
        (
            "actions status eq 'Failed'",
            "app",
            one("/api/machineactions?$top=100&$filter=status%20eq%20'Failed'"),
            100,
        ),
        // The console's own queries (crates/server/console/pages/machines.js):
        // 50 a page, sorted by name, with the total count.
        (
            "console: machines, first page",
            "wide",
            one(&format!("/api/machines?{CONSOLE_PAGE}")),
            100,
        ),
        (
            "console: search by name",
            "wide",
            one(&format!(
                "/api/machines?$filter=(startswith(computerDnsName,'ws-0001')%20or%20\
                 startswith(lastIpAddress,'ws-0001'))&{CONSOLE_PAGE}"
            )),
            100,
        ),
        (
            "console: isolated machines",
            "wide",
            one(&format!(
                "/api/machines?$filter=isolationState%20eq%20'Isolated'&{CONSOLE_PAGE}"
            )),
            100,
        ),
        (
            "console: machines, a page deep",
            "wide",
            one(&format!(
                "/api/machines?{CONSOLE_PAGE}&$skip={}",
                deep_machines / 50 * 50
            )),
            50,
        ),
    ];
    let mut out = Vec::new();
    for (label, who, paths, count) in scenarios {
        let bearer = match who {
            "app" => &app,
            "wide" => &wide,
            _ => &narrow,
        };
        let mut figures = Vec::new();
        for _ in 0..rounds {
            figures.push(round(server, bearer, &paths, count).await?);
        }
        let pick = |f: fn(&Figure) -> f64| median(&mut figures.iter().map(f).collect::<Vec<_>>());
        let figure = Figure {
            p50_ms: pick(|f| f.p50_ms),
            p99_ms: pick(|f| f.p99_ms),
            rps: pick(|f| f.rps),
            rows: figures[0].rows,
        };
        let label = format!("{label} ({who})");
        println!(
            "  {label:<44} p50 {:>8.2} ms   p99 {:>8.2} ms   {:>7.0} req/s   ({} rows)",
            figure.p50_ms, figure.p99_ms, figure.rps, figure.rows
        );
        out.push((label, figure));
    }
    Ok(out)
}

fn size_of_store(data: &Path) -> u64 {
    ["cordon.db", "cordon.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(data.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn figures_json(figures: &[(String, Figure)]) -> serde_json::Value {
    figures
        .iter()
        .map(|(label, f)| {
            (
                label.clone(),
                serde_json::json!({"p50_ms": f.p50_ms, "p99_ms": f.p99_ms, "rps": f.rps, "rows": f.rows}),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

pub async fn main(cli: StoreCli) -> anyhow::Result<()> {
    let data = cli
        .dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("cordon-store-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let result = run(&cli, &data).await;
    if cli.keep {
        println!("the data directory is kept: {}", data.display());
    } else {
        let _ = std::fs::remove_dir_all(&data);
    }
    result
}

async fn run(cli: &StoreCli, data: &Path) -> anyhow::Result<()> {
    let schema = if cli.before.is_some() {
        BEFORE_SCHEMA
    } else {
        store::Store::schema_version()
    };
    println!(
        "cordon-bench store: {} actions over {} machines, schema {schema}, {} rounds",
        cli.actions.max(u64::from(cli.machines)),
        cli.machines,
        cli.rounds
    );
    let filled = fill(data, cli, schema).await?;
    let filled_size = size_of_store(data);
    println!(
        "filled in {:.1} s; the database takes {:.2} GB",
        filled.seconds,
        filled_size as f64 / 1e9
    );
    let mut report = serde_json::json!({
        "actions": cli.actions.max(u64::from(cli.machines)),
        "machines": cli.machines,
        "rounds": cli.rounds,
        "fill_seconds": filled.seconds,
        "database_bytes": filled_size,
    });
    let mut before = None;
    if let Some(old) = &cli.before {
        println!("before ({}, schema {schema}):", old.display());
        let server = start(old, data)?;
        before = Some(measure(&server, &filled, cli.rounds).await?);
        drop(server);
        let started = Instant::now();
        drop(store::Store::open(&data.join(server::DATABASE_FILE))?);
        let migration = started.elapsed().as_secs_f64();
        println!(
            "migration {BEFORE_SCHEMA} -> {} took {migration:.1} s; the database takes {:.2} GB",
            store::Store::schema_version(),
            size_of_store(data) as f64 / 1e9
        );
        report["migration_seconds"] = migration.into();
        report["database_bytes_migrated"] = size_of_store(data).into();
        report["before"] = figures_json(before.as_deref().unwrap_or_default());
    }
    let exe = std::env::current_exe()?.with_file_name("cordon");
    println!(
        "after ({}, schema {}):",
        exe.display(),
        store::Store::schema_version()
    );
    let server = start(&exe, data)?;
    let after = measure(&server, &filled, cli.rounds).await?;
    drop(server);
    report["after"] = figures_json(&after);
    if let Some(before) = &before {
        println!("p50 before / after:");
        for ((label, b), (_, a)) in before.iter().zip(&after) {
            println!(
                "  {label:<44} {:>8.2} ms -> {:>6.2} ms   x{:.1}",
                b.p50_ms,
                a.p50_ms,
                b.p50_ms / a.p50_ms
            );
        }
    }
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
