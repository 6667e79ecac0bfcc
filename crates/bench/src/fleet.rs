//! `cordon-bench fleet`: a fleet of simulated agents held by one server,
//! while the public API isolates and releases random machines.
//!
//! Each simulated agent is the agent library's own session client
//! ([`agent::Session`]) with a key of its own, enrolled through the real
//! enrollment endpoint and connected over real TLS from an address of its
//! own in 127.0.0.0/8 (127.0.0.2 and up), as each machine of a fleet has
//! its own: so any number of sessions fits (one address has only some
//! 28,000 ports), and the server's caps per source address see what they
//! would see from a real fleet. It answers pushed actions as `cordon-agent` does
//! (ack, wait for proceed, result) except that nothing is applied to the
//! kernel: the result reports success at once. It sends heartbeats at the
//! server's interval, jittered, and reconnects with jittered exponential
//! backoff when its session drops or is refused.
//!
//! Meanwhile an application (client credentials) calls isolate or
//! unisolate at a fixed rate (open loop) on random connected machines that
//! have no action in flight, and polls each action through
//! `GET /api/machineactions/{id}` until it is final: the latency is the time
//! from reading the `201` to seeing `Succeeded`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::retry::{AfterFailure, Reconnect, RetryPolicy};
use agent::{HttpsClient, Identity, Reply, Session};
use anyhow::{Context, bail};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::Ed25519KeyPair;
use http::Method;
use proto::agent::{
    AgentError, AgentMessage, Enforced, EnrollResponse, HostAddress, HostFacts, ServerMessage,
};
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};

/// Enrollments and session openings in flight at once while the fleet
/// comes up (the server's handshake share is 1,024 by default).
const RAMP_CONCURRENCY: usize = 256;
/// HTTPS connections the API driver has open at most (the server caps
/// connections from one source address at 64 by default).
const API_POOL: usize = 24;
/// Tries of one API request refused with "come back later".
const API_ATTEMPTS: u32 = 6;
/// Polls of action status in flight at once.
const POLL_CONCURRENCY: usize = 64;
/// The longest an action may take before the tool counts it as an error.
const ACTION_DEADLINE: Duration = Duration::from_secs(120);

/// `cordon-bench fleet`: simulated agents on loopback held by one server,
/// while the public API isolates and releases random machines.
#[derive(clap::Args, Debug, Clone)]
pub struct FleetArgs {
    /// Simulated agents (each enrolls, then holds one session).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub agents: u64,
    /// Isolate/unisolate calls per second, spread evenly (open loop).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds of API calls.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Kill the server it started (`kill -9`) this many seconds into the
    /// calls, restart it on the same data directory and port, and report
    /// how long the agents take to come back and the actions created just
    /// before the kill take to succeed.
    #[arg(long, value_name = "SECONDS", conflicts_with = "server")]
    pub restart_after: Option<f64>,
    /// After the calls: disconnect this many agents, isolate each through
    /// the API while it is away, reconnect them, and report the time from
    /// reconnecting to the action's arrival and to `Succeeded`.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub offline_probes: usize,
    /// After the calls: isolate this many connected agents in one bulk
    /// call (`POST /api/machines/isolate` with their ids; at most 1,000)
    /// and report the call's latency and the time from the call to the
    /// last `Succeeded`.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub bulk: u64,
    /// Subscribe a webhook receiver in this tool to `machineAction.completed`
    /// and report how long each completion took to reach it (the app needs
    /// Machine.ReadWrite.All).
    #[arg(long)]
    pub webhook: bool,
    /// Use a running server at this URL instead of starting one (then
    /// `--ca`, `--tenant`, `--client-id`, `--client-secret` and
    /// `--enroll-token` are needed; the token needs a use for each agent).
    #[arg(long, requires_all = ["ca", "tenant", "client_id", "client_secret", "enroll_token"])]
    pub server: Option<String>,
    /// The CA certificate the running server's certificate chains to.
    #[arg(long, requires = "server")]
    pub ca: Option<PathBuf>,
    /// The running server's tenant id.
    #[arg(long, requires = "server")]
    pub tenant: Option<String>,
    /// An application with Machine.Isolate and Machine.Read.All.
    #[arg(long, requires = "server")]
    pub client_id: Option<String>,
    /// The application's secret.
    #[arg(long, requires = "server", env = "CORDON_BENCH_CLIENT_SECRET")]
    pub client_secret: Option<String>,
    /// An enroll token with a use for each agent.
    #[arg(long, requires = "server", env = "CORDON_BENCH_ENROLL_TOKEN")]
    pub enroll_token: Option<String>,
    /// The running server's process id, for its memory and CPU figures.
    #[arg(long, requires = "server")]
    pub server_pid: Option<u32>,
    /// The `cordon` binary to start (default: the one beside this program).
    #[arg(long, conflicts_with = "server")]
    pub cordon: Option<PathBuf>,
}

/// Where the server comes from.
pub enum Target {
    /// Start this `cordon` binary on a fresh data directory.
    Spawn(PathBuf),
    /// Start the server in this process (tests).
    InProcess,
    /// A running server.
    External {
        url: String,
        ca: PathBuf,
        tenant: String,
        client_id: String,
        client_secret: String,
        enroll_token: String,
        pid: Option<u32>,
    },
}

/// What a run does.
pub struct Options {
    pub agents: usize,
    pub rate: f64,
    pub duration: Duration,
    pub restart_after: Option<Duration>,
    pub offline_probes: usize,
    /// Machines isolated in one bulk call after the calls (0: none).
    pub bulk: usize,
    /// Measure webhook deliveries of the completions.
    pub webhook: bool,
    pub target: Target,
    /// Progress lines on stderr.
    pub verbose: bool,
}

impl FleetArgs {
    pub fn options(&self) -> anyhow::Result<Options> {
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            bail!("--rate must be a positive number");
        }
        if !(self.duration >= 0.0 && self.duration.is_finite()) {
            bail!("--duration must be a number of seconds");
        }
        let target = match &self.server {
            Some(url) => Target::External {
                url: url.trim_end_matches('/').to_owned(),
                ca: self.ca.clone().context("--ca")?,
                tenant: self.tenant.clone().context("--tenant")?,
                client_id: self.client_id.clone().context("--client-id")?,
                client_secret: self.client_secret.clone().context("--client-secret")?,
                enroll_token: self.enroll_token.clone().context("--enroll-token")?,
                pid: self.server_pid,
            },
            None => Target::Spawn(match &self.cordon {
                Some(path) => path.clone(),
                None => std::env::current_exe()?.with_file_name("cordon"),
            }),
        };
        Ok(Options {
            agents: self.agents as usize,
            rate: self.rate,
            duration: Duration::from_secs_f64(self.duration),
            restart_after: self.restart_after.map(Duration::from_secs_f64),
            offline_probes: self.offline_probes,
            bulk: self.bulk as usize,
            webhook: self.webhook,
            target,
            verbose: true,
        })
    }
}

/// The results (`--json`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub agents: usize,
    /// Agents connected when the calls began.
    pub agents_connected: usize,
    /// Agents connected at the end.
    pub agents_connected_at_end: usize,
    pub rate: f64,
    pub duration_s: f64,
    /// Isolate/unisolate calls answered `201`.
    pub actions: u64,
    pub succeeded: u64,
    /// Calls not answered `201`, actions that ended other than
    /// `Succeeded` or not within two minutes, and (outside a restart)
    /// sessions dropped or refused once the fleet was up.
    pub errors: u64,
    /// 201 → `Succeeded` as seen through the API, over succeeded actions.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub server_pid: u32,
    /// The server's resident memory with every agent connected and idle.
    pub server_rss_bytes: u64,
    /// The server's resident memory, up and idle, before any agent.
    pub server_rss_idle_bytes: u64,
    /// The server's resident memory once every agent is enrolled, before
    /// any session (what the enrolled machines cost, apart from sessions).
    pub server_rss_enrolled_bytes: u64,
    /// (server_rss_bytes − server_rss_enrolled_bytes) ÷ agents connected:
    /// the sessions alone.
    pub rss_per_session_after_enrollment_bytes: u64,
    /// The server's resident memory at the end.
    pub server_rss_end_bytes: u64,
    /// The server's CPU time (user + system) at the end.
    pub server_cpu_seconds: f64,
    /// (server_rss_bytes − server_rss_idle_bytes) ÷ agents connected.
    pub rss_per_session_bytes: u64,
    /// This tool's resident memory with every agent connected.
    pub bench_rss_bytes: u64,
    /// The open-file limit this tool runs with (the server it starts
    /// inherits it).
    pub open_file_limit: u64,
    pub enroll_seconds: f64,
    /// From the first session opening to all connected.
    pub connect_seconds: f64,
    /// Sessions that ended without being asked to (server restarts included).
    pub sessions_dropped: u64,
    /// Session attempts that failed: refused (`Unavailable` and the like)
    /// or the connection failed.
    pub session_failures: u64,
    /// Agents that stopped trying (`Revoked`, `UnknownMachine`).
    pub agents_gave_up: u64,
    /// API requests sent again after a 503 or a refused connection.
    pub api_retries: u64,
    /// Some message for each kind of error, with its count.
    pub error_kinds: HashMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline: Option<OfflineReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk: Option<BulkReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<crate::webhook::WebhookReport>,
}

/// `--bulk`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BulkReport {
    /// Machines named in the call (connected agents, none with an action
    /// in flight).
    pub machines: usize,
    /// Entries answered `201`.
    pub created: usize,
    /// Of those, actions that reached `Succeeded`.
    pub succeeded: usize,
    /// Sending the call → reading its `200`.
    pub call_ms: f64,
    /// Sending the call → the last action's `Succeeded`, by the server's
    /// clock (its `lastUpdateDateTimeUtc`; the tool and the server share
    /// the machine's clock). Null unless every created action succeeded.
    pub last_succeeded_ms: Option<f64>,
    /// Sending the call → the median action's `Succeeded`.
    pub median_succeeded_ms: Option<f64>,
}

/// `--restart-after`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestartReport {
    /// Seconds into the calls the server was killed.
    pub killed_after_s: f64,
    /// Agents connected at the kill.
    pub agents_at_kill: usize,
    /// Kill → the new server answers on its port.
    pub server_up_s: f64,
    /// Kill → every agent connected again (null: not within the limit).
    pub agents_back_s: Option<f64>,
    /// Isolate/unisolate calls made together right before the kill.
    pub actions_before_kill: usize,
    /// Of those, `Pending` or `InProgress` at the kill as far as the tool saw.
    pub actions_unfinished_at_kill: usize,
    /// Kill → every one of those actions `Succeeded` (null: not all did).
    pub actions_succeeded_s: Option<f64>,
    pub pid_after: u32,
}

/// `--offline-probes`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OfflineReport {
    pub probes: usize,
    /// Agents that received their action after reconnecting.
    pub received: usize,
    /// The agent starts to reconnect → the action arrives at it.
    pub reconnect_to_action_p50_ms: f64,
    pub reconnect_to_action_max_ms: f64,
    /// The agent starts to reconnect → `Succeeded` seen through the API.
    pub reconnect_to_succeeded_p50_ms: f64,
    pub reconnect_to_succeeded_max_ms: f64,
}

/// A small, fast, non-cryptographic random source for choices and jitter.
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let mut seed = [0u8; 8];
        let _ = SystemRandom::new().fill(&mut seed);
        Rng(u64::from_le_bytes(seed) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in [0, 1).
    pub fn fraction(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

impl Default for Rng {
    fn default() -> Rng {
        Rng::new()
    }
}

/// The loopback address simulated agent `index` connects from:
/// 127.0.0.2 and up (127.0.0.1 is the API driver's).
pub fn source_address(index: usize) -> IpAddr {
    let n = 2 + (index as u32 % 0x00ff_fff0);
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + n))
}

pub(crate) fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1e3
}

/// Resident memory of a process, from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// User + system CPU time of a process, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: count fields after its ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / per_second
}

/// Descriptors a server with the default connection caps wants beside its
/// agent sessions (API 4,096, handshakes 1,024, reserve 256), and a little
/// room.
const DEFAULT_SERVER_FILES: u64 = 4_096 + 1_024 + 256 + 24;
/// The caps the server is started with when the open-file limit is lower
/// than the agents and [`DEFAULT_SERVER_FILES`] together.
const SMALL_API_CAP: u64 = 256;
const SMALL_HANDSHAKE_CAP: u64 = 512;
/// Descriptors this tool needs beside its agents' sessions.
const BENCH_FILES: u64 = 200;

struct FileLimit {
    limit: u64,
    small_caps: bool,
}

/// Raises the open-file limit for `n` agents (in this process, and in the
/// server it starts, which inherits it), or says why it can't.
fn check_file_limit(target: &Target, n: usize) -> anyhow::Result<FileLimit> {
    let n = n as u64;
    let (wanted, needed) = match target {
        Target::External { .. } => (n + BENCH_FILES, n + BENCH_FILES),
        // Both sides of every session in one process; the server fits its
        // caps to what is left (`conns::Limits::fit`).
        Target::InProcess => (
            2 * n + DEFAULT_SERVER_FILES + BENCH_FILES,
            2 * n + 1_024 + BENCH_FILES,
        ),
        Target::Spawn(_) => (
            n + DEFAULT_SERVER_FILES + BENCH_FILES,
            n + SMALL_API_CAP + SMALL_HANDSHAKE_CAP + 256 + BENCH_FILES,
        ),
    };
    let limit = raise_file_limit(wanted)?;
    if limit < needed {
        let mut hard = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) };
        bail!(
            "the open-file limit is {limit} (hard limit {}), too low for {n} agents: every \
             session is a descriptor in this tool and one in the server, which need {needed}. \
             Raise the hard limit (as root with CAP_SYS_RESOURCE this tool raises it itself, \
             up to /proc/sys/fs/nr_open; otherwise `ulimit -Hn` in a root shell or \
             LimitNOFILE in the service), or run at most {} agents.",
            hard.rlim_max,
            n.saturating_sub(needed - limit)
        );
    }
    Ok(FileLimit {
        limit,
        small_caps: matches!(target, Target::Spawn(_)) && limit < wanted,
    })
}

/// Raises this process's open-file limit (soft and, as root, hard) to
/// `wanted`, within the system's ceiling (`/proc/sys/fs/nr_open`); returns
/// the soft limit in force. Children inherit it.
pub fn raise_file_limit(wanted: u64) -> anyhow::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit");
    }
    if limit.rlim_cur >= wanted {
        return Ok(limit.rlim_cur);
    }
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(limit.rlim_max);
    let target = wanted.min(ceiling);
    // As root the hard limit may go up too; otherwise up to the hard limit.
    for hard in [target.max(limit.rlim_max), limit.rlim_max] {
        let raised = libc::rlimit {
            rlim_cur: target.min(hard),
            rlim_max: hard,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(raised.rlim_cur);
        }
    }
    Ok(limit.rlim_cur)
}

/// Counters the agents and the driver share.
#[derive(Default)]
struct Stats {
    connected: AtomicUsize,
    sessions_dropped: AtomicU64,
    session_failures: AtomicU64,
    gave_up: AtomicU64,
    /// Drops and failures count as errors only while this is set (the
    /// fleet is up and no restart is under way).
    counting: AtomicBool,
    /// While the fleet first connects, session openings wait for a permit
    /// of the ramp (this tool shares the server's two cores); afterwards
    /// agents reconnect as they would, each on its own backoff.
    ramping: AtomicBool,
    errors: AtomicU64,
    error_kinds: Mutex<HashMap<String, u64>>,
}

impl Stats {
    fn error(&self, kind: impl Into<String>) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut kinds = self.error_kinds.lock().expect("lock");
        let kind = kind.into();
        let kind: String = kind.chars().take(200).collect();
        *kinds.entry(kind).or_insert(0) += 1;
    }

    fn session_trouble(&self, kind: String) {
        if self.counting.load(Ordering::Relaxed) {
            self.error(kind);
        }
    }
}

/// One simulated agent's shared part: what the driver reads and commands.
#[derive(Default)]
struct AgentSlot {
    connected: AtomicBool,
    /// Commanded off line (offline probes).
    offline: AtomicBool,
    wake: Notify,
    /// An action is in flight from the driver (don't pick this machine).
    busy: AtomicBool,
    /// What the driver last asked for (isolated or not).
    isolated: AtomicBool,
    /// Offline probes: when the agent began to reconnect, and when its
    /// first action arrived after that.
    probe: Mutex<Option<ProbeTimes>>,
}

#[derive(Clone, Copy, Default)]
struct ProbeTimes {
    reconnect: Option<Instant>,
    action: Option<Instant>,
}

struct Fleet {
    stats: Stats,
    slots: Vec<AgentSlot>,
    machine_ids: Vec<String>,
}

/// The server under test.
struct ServerUnderTest {
    url: String,
    ca: PathBuf,
    tenant: String,
    client_id: String,
    client_secret: String,
    enroll_token: String,
    pid: Option<u32>,
    child: Option<Child>,
    spawn: Option<(PathBuf, PathBuf, u16, bool)>,
    in_process: Option<server::RunningServer>,
    _data: Option<DataDir>,
}

struct DataDir(PathBuf);

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for ServerUnderTest {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_cordon(exe: &Path, data: &Path, port: u16, small_caps: bool) -> anyhow::Result<Child> {
    let mut command = Command::new(exe);
    command.arg("serve");
    if small_caps {
        // The open-file limit is too low for the default caps: leave the
        // descriptors to the agents' share (see check_file_limit).
        command.args([
            "--max-api-connections",
            &SMALL_API_CAP.to_string(),
            "--max-handshakes",
            &SMALL_HANDSHAKE_CAP.to_string(),
        ]);
    }
    command
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            // The benchmark's own enrollments come from a few addresses at
            // once; the API app calls far more than 100 times a minute.
            "--enroll-limit-per-source",
            "0",
            "--enroll-limit-total",
            "0",
            "--rate-limit-per-minute",
            "0",
            "--rate-limit-per-hour",
            "0",
        ])
        .env("CORDON_DATA_DIR", data)
        .env("CORDON_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| {
            format!(
                "cannot run {} (build it with `cargo build --release` first, or give --cordon)",
                exe.display()
            )
        })
}

async fn wait_for_port(
    port: u16,
    ca: &Path,
    limit: Duration,
    child: &mut Child,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("the server stopped: {status}");
        }
        if ca.exists()
            && tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the server did not start within {limit:?}")
}

async fn start_target(target: &Target, small_caps: bool) -> anyhow::Result<ServerUnderTest> {
    match target {
        Target::External {
            url,
            ca,
            tenant,
            client_id,
            client_secret,
            enroll_token,
            pid,
        } => Ok(ServerUnderTest {
            url: url.clone(),
            ca: ca.clone(),
            tenant: tenant.clone(),
            client_id: client_id.clone(),
            client_secret: client_secret.clone(),
            enroll_token: enroll_token.clone(),
            pid: *pid,
            child: None,
            spawn: None,
            in_process: None,
            _data: None,
        }),
        Target::Spawn(exe) => {
            let data = std::env::temp_dir().join(format!("cordon-fleet-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&data);
            std::fs::create_dir_all(&data)?;
            let data = DataDir(data);
            let store = server::init_data_dir(&data.0)?;
            let tenant = server::tenant_id(&store).await?;
            let crate::Prepared {
                client_id,
                secret: client_secret,
                enroll_token,
            } = crate::prepare_store(&store, "fleet bench").await?;
            drop(store);
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let child = spawn_cordon(exe, &data.0, port, small_caps)?;
            let ca = data.0.join("ca.pem");
            let pid = child.id();
            let mut server = ServerUnderTest {
                url: format!("https://localhost:{port}"),
                ca: ca.clone(),
                tenant,
                client_id,
                client_secret,
                enroll_token,
                pid: Some(pid),
                child: Some(child),
                spawn: Some((exe.clone(), data.0.clone(), port, small_caps)),
                in_process: None,
                _data: Some(data),
            };
            let child = server.child.as_mut().expect("just started");
            wait_for_port(port, &ca, Duration::from_secs(30), child).await?;
            Ok(server)
        }
        Target::InProcess => {
            let data = std::env::temp_dir().join(format!(
                "cordon-fleet-{}-{}",
                std::process::id(),
                Rng::new().next_u64() % 1_000_000
            ));
            let _ = std::fs::remove_dir_all(&data);
            let data = DataDir(data);
            let mut config = server::Config::new(data.0.clone());
            config.listen = "127.0.0.1:0".parse()?;
            config.rate_limit_per_minute = 0;
            config.rate_limit_per_hour = 0;
            config.enroll_per_source_per_minute = 0;
            config.enroll_per_minute = 0;
            if small_caps {
                config.connections.api = SMALL_API_CAP as usize;
                config.connections.handshakes = SMALL_HANDSHAKE_CAP as usize;
            }
            let running = server::start(config).await?;
            let crate::Prepared {
                client_id,
                secret: client_secret,
                enroll_token,
            } = crate::prepare_store(&running.state.store, "fleet bench").await?;
            Ok(ServerUnderTest {
                url: format!("https://localhost:{}", running.local_addr.port()),
                ca: running.ca_path.clone().context("self-signed CA")?,
                tenant: running.tenant_id.clone(),
                client_id,
                client_secret,
                enroll_token,
                pid: Some(std::process::id()),
                child: None,
                spawn: None,
                in_process: Some(running),
                _data: Some(data),
            })
        }
    }
}

impl ServerUnderTest {
    /// `kill -9`, then the same command on the same data directory and port.
    async fn kill_and_restart(&mut self) -> anyhow::Result<Duration> {
        let (exe, data, port, small_caps) = self
            .spawn
            .clone()
            .context("only a server this tool started can be restarted")?;
        let killed = Instant::now();
        if let Some(child) = &mut self.child {
            child.kill()?;
            child.wait()?;
        }
        let child = self
            .child
            .insert(spawn_cordon(&exe, &data, port, small_caps)?);
        self.pid = Some(child.id());
        // The CA file stays; wait until the port answers.
        wait_for_port(port, &self.ca, Duration::from_secs(60), child).await?;
        Ok(killed.elapsed())
    }
}

/// A few keep-alive HTTPS connections to the API.
struct Api {
    tls: Arc<rustls::ClientConfig>,
    url: String,
    pool: Mutex<Vec<HttpsClient>>,
    /// A permit for each connection: requests wait for one.
    connections: Semaphore,
    /// Requests sent again after a "come back later".
    retries: AtomicU64,
    auth: Mutex<String>,
}

impl Api {
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Vec<u8>>,
    ) -> anyhow::Result<Reply> {
        let body: Vec<u8> = body.into();
        let _permit = self.connections.acquire().await.expect("never closed");
        let mut attempt = 0;
        loop {
            let client = self.pool.lock().expect("lock").pop();
            let mut client = match client {
                Some(c) => c,
                None => HttpsClient::new(self.tls.clone(), &self.url)?,
            };
            let auth = self.auth.lock().expect("lock").clone();
            let reply = client
                .request(
                    method.clone(),
                    path,
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    body.clone(),
                )
                .await;
            // "Come back later": a 503 (the server's connection caps), or a
            // new connection refused before any request was sent (its
            // handshake share full, as while a fleet reconnects). Retried
            // like a client would, a few times; counted in `api_retries`.
            let hint = match reply {
                Ok(reply) if reply.status == 503 && attempt < API_ATTEMPTS => retry_after(&reply),
                Ok(reply) => {
                    self.pool.lock().expect("lock").push(client);
                    return Ok(reply);
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    let unsent =
                        text.contains("TLS handshake with") || text.contains("cannot connect to");
                    if !unsent || attempt >= API_ATTEMPTS {
                        return Err(e);
                    }
                    None
                }
            };
            self.retries.fetch_add(1, Ordering::Relaxed);
            let wait = agent::retry::next_wait(attempt, hint).min(Duration::from_secs(5));
            tokio::time::sleep(wait.max(Duration::from_millis(20))).await;
            attempt += 1;
        }
    }

    async fn sign_in(&self, server: &ServerUnderTest) -> anyhow::Result<()> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs([
                ("grant_type", "client_credentials"),
                ("client_id", server.client_id.as_str()),
                ("client_secret", server.client_secret.as_str()),
                ("scope", "https://api.securitycenter.microsoft.com/.default"),
            ])
            .finish();
        let mut client = HttpsClient::new(self.tls.clone(), &self.url)?;
        let reply = client
            .request(
                Method::POST,
                &format!("/{}/oauth2/v2.0/token", server.tenant),
                &[("content-type", "application/x-www-form-urlencoded")],
                body,
            )
            .await?;
        let token = reply.json()?["access_token"]
            .as_str()
            .with_context(|| format!("no token: {}", String::from_utf8_lossy(&reply.body)))?
            .to_owned();
        *self.auth.lock().expect("lock") = format!("Bearer {token}");
        Ok(())
    }
}

/// The retry hint of a refusal: `Retry-After` in seconds.
fn retry_after(reply: &Reply) -> Option<Duration> {
    reply
        .header("retry-after")
        .and_then(agent::retry::parse_retry_after)
}

fn facts(index: usize, local: IpAddr) -> HostFacts {
    HostFacts {
        computer_dns_name: format!("fleet-{index}"),
        os_platform: Some("Linux".into()),
        agent_version: Some(concat!("fleet-bench-", env!("CARGO_PKG_VERSION")).into()),
        addresses: vec![HostAddress {
            ip_address: local.to_string(),
            interface_type: Some("SoftwareLoopback".into()),
            operational_status: Some("Up".into()),
            mac_address: None,
        }],
        ..Default::default()
    }
}

/// An enrolled agent: its machine id and key.
type Enrolled = (String, Ed25519KeyPair);

/// Enrolls one simulated agent through the enrollment endpoint; retries
/// "come back later" answers (429, 503) with backoff.
async fn enroll_one(
    client: &mut HttpsClient,
    token: &str,
    index: usize,
) -> anyhow::Result<(String, Ed25519KeyPair)> {
    let (_, key, request) =
        agent::identity::enroll_request(token, facts(index, source_address(index)))?;
    let request = serde_json::to_vec(&request)?;
    let mut attempt = 0;
    loop {
        let reply = client
            .request(
                Method::POST,
                proto::agent::ENROLL_PATH,
                &[("content-type", "application/json")],
                request.clone(),
            )
            .await;
        match reply {
            Ok(reply) if reply.status.is_success() => {
                let response: EnrollResponse = serde_json::from_slice(&reply.body)?;
                return Ok((response.machine_id, key));
            }
            Ok(reply) if matches!(reply.status.as_u16(), 429 | 503) && attempt < 20 => {
                tokio::time::sleep(agent::retry::next_wait(attempt, retry_after(&reply))).await;
            }
            Ok(reply) => match serde_json::from_slice::<AgentError>(&reply.body) {
                Ok(e) => bail!("enrollment refused: {} ({})", e.reason, e.code),
                Err(_) => bail!("enrollment refused with HTTP {}", reply.status),
            },
            Err(_) if attempt < 20 => {
                tokio::time::sleep(agent::retry::next_wait(attempt, None)).await;
            }
            Err(e) => return Err(e),
        }
        attempt += 1;
    }
}

/// How a session ended.
enum Ended {
    /// Commanded off line.
    Offline,
    /// The server refused or closed it, or the connection broke.
    Dropped(String),
}

/// Runs one simulated agent until its task is aborted.
async fn run_agent(fleet: Arc<Fleet>, index: usize, identity: Identity, ramp: Arc<Semaphore>) {
    let local = source_address(index);
    let slot = &fleet.slots[index];
    let stats = &fleet.stats;
    let mut rng = Rng::new();
    let mut enforced = Enforced::NotIsolated;
    // The last action applied, to answer a repeated delivery with its
    // result instead of applying it twice.
    let mut done: Option<(String, Enforced)> = None;
    // The real agent's reconnection rule: jittered exponential backoff,
    // and a busy server's time to come back honoured without growing it.
    let mut reconnect = Reconnect::new(RetryPolicy::default());
    loop {
        while slot.offline.load(Ordering::Acquire) {
            slot.wake.notified().await;
        }
        let began = Instant::now();
        let opened = {
            let _permit = match stats.ramping.load(Ordering::Acquire) {
                true => Some(ramp.acquire().await),
                false => None,
            };
            Session::open_from(&identity, facts(index, local), enforced, Some(local)).await
        };
        let hint = match opened {
            Ok(mut session) => {
                reconnect.connected();
                if let Some(probe) = slot.probe.lock().expect("lock").as_mut()
                    && probe.reconnect.is_none()
                {
                    probe.reconnect = Some(began);
                }
                slot.connected.store(true, Ordering::Release);
                stats.connected.fetch_add(1, Ordering::AcqRel);
                let ended = serve(slot, &mut session, &mut enforced, &mut done, &mut rng).await;
                stats.connected.fetch_sub(1, Ordering::AcqRel);
                slot.connected.store(false, Ordering::Release);
                drop(session);
                match ended {
                    Ended::Offline => continue,
                    Ended::Dropped(why) => {
                        stats.sessions_dropped.fetch_add(1, Ordering::Relaxed);
                        stats.session_trouble(format!("session dropped: {why}"));
                        None
                    }
                }
            }
            Err(e) => {
                let text = format!("{e:#}");
                stats.session_failures.fetch_add(1, Ordering::Relaxed);
                match AfterFailure::of(&e) {
                    AfterFailure::GiveUp => {
                        stats.gave_up.fetch_add(1, Ordering::Relaxed);
                        stats.error(format!("agent gave up: {text}"));
                        return;
                    }
                    // Not an error: a busy server's expected answer.
                    AfterFailure::Busy(wait) => Some(wait),
                    AfterFailure::Failed => {
                        stats.session_trouble(format!("session failed: {}", error_kind(&text)));
                        None
                    }
                }
            }
        };
        let wait = reconnect.next_wait(hint);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = slot.wake.notified() => {}
        }
    }
}

/// The gist of an error message, without what varies per agent.
fn error_kind(text: &str) -> String {
    text.split(": ")
        .filter(|part| !part.contains("127.0.0."))
        .collect::<Vec<_>>()
        .join(": ")
}

async fn serve(
    slot: &AgentSlot,
    session: &mut Session,
    enforced: &mut Enforced,
    done: &mut Option<(String, Enforced)>,
    rng: &mut Rng,
) -> Ended {
    let period = Duration::from_secs(session.heartbeat_seconds.max(1));
    // The first heartbeat at a random point of the period, so that a fleet
    // connecting together doesn't beat together; then every period ± 10 %.
    let mut next_beat = tokio::time::Instant::now() + period.mul_f64(rng.fraction());
    let mut pending: Option<(String, Enforced)> = None;
    loop {
        let message = tokio::select! {
            message = session.recv() => message,
            _ = tokio::time::sleep_until(next_beat) => {
                next_beat += period.mul_f64(0.9 + 0.2 * rng.fraction());
                let beat = AgentMessage::Heartbeat { enforced: *enforced, exclusion_version: None };
                if let Err(e) = session.send(&beat).await {
                    return Ended::Dropped(format!("{e:#}"));
                }
                continue;
            }
            _ = slot.wake.notified() => {
                if slot.offline.load(Ordering::Acquire) {
                    return Ended::Offline;
                }
                continue;
            }
        };
        let reply = match message {
            Err(e) => return Ended::Dropped(format!("{e:#}")),
            Ok(ServerMessage::Action(order)) => {
                if let Some(probe) = slot.probe.lock().expect("lock").as_mut()
                    && probe.reconnect.is_some()
                    && probe.action.is_none()
                {
                    probe.action = Some(Instant::now());
                }
                let target = match (order.action_type.as_str(), order.scope.as_deref()) {
                    ("Isolate", Some("Selective")) => Enforced::Selective,
                    ("Isolate", _) => Enforced::Full,
                    _ => Enforced::NotIsolated,
                };
                match done {
                    Some((id, was)) if *id == order.action_id => AgentMessage::Result {
                        action_id: order.action_id,
                        succeeded: true,
                        error_h_result: 0,
                        reason: None,
                        enforced: *was,
                    },
                    _ => {
                        pending = Some((order.action_id.clone(), target));
                        AgentMessage::Ack {
                            action_id: order.action_id,
                        }
                    }
                }
            }
            Ok(ServerMessage::Proceed { action_id }) => {
                let Some((id, target)) = pending.take().filter(|(id, _)| *id == action_id) else {
                    continue;
                };
                // Where cordon-agent applies the rules: here it succeeds at once.
                *enforced = target;
                *done = Some((id.clone(), target));
                AgentMessage::Result {
                    action_id: id,
                    succeeded: true,
                    error_h_result: 0,
                    reason: None,
                    enforced: target,
                }
            }
            Ok(ServerMessage::Refused { code, reason, .. }) => {
                return Ended::Dropped(format!("refused: {reason} ({code})"));
            }
            Ok(_) => continue,
        };
        if let Err(e) = session.send(&reply).await {
            return Ended::Dropped(format!("{e:#}"));
        }
    }
}

/// Runs the fleet benchmark.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let say = |text: String| {
        if options.verbose {
            eprintln!("fleet: {text}");
        }
    };
    let n = options.agents;
    let files = check_file_limit(&options.target, n)?;
    if files.small_caps {
        say(format!(
            "the open-file limit is {} (hard limit; the server's default caps want {}): \
             the server is started with --max-api-connections {SMALL_API_CAP} --max-handshakes {SMALL_HANDSHAKE_CAP}",
            files.limit,
            n as u64 + DEFAULT_SERVER_FILES
        ));
    }
    let files = files.limit;
    let mut server = start_target(&options.target, files < n as u64 + DEFAULT_SERVER_FILES).await?;
    let tls = agent::https::tls_config(&server.ca)?;
    let api = Arc::new(Api {
        tls: tls.clone(),
        url: server.url.clone(),
        pool: Mutex::new(Vec::new()),
        connections: Semaphore::new(API_POOL),
        retries: AtomicU64::new(0),
        auth: Mutex::new(String::new()),
    });
    api.sign_in(&server).await?;
    let receiver = if options.webhook {
        let receiver = crate::webhook::Receiver::start().await?;
        let reply = api
            .request(
                Method::POST,
                "/api/webhooks",
                serde_json::to_vec(&receiver.subscription())?,
            )
            .await?;
        crate::webhook::check_created(reply.status.as_u16(), &reply.body)?;
        Some(receiver)
    } else {
        None
    };
    // The server is up and has answered: its memory without any session.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = server.pid.unwrap_or(0);
    let rss_idle = server.pid.map_or(0, rss_bytes);
    say(format!(
        "server {} (pid {pid}) up, {} MiB resident; open-file limit {files}",
        server.url,
        rss_idle >> 20
    ));

    // Enroll, through the endpoint, with a few keep-alive connections.
    let enroll_started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<Option<Enrolled>>>> =
        Arc::new(Mutex::new((0..n).map(|_| None).collect()));
    let mut tasks = Vec::new();
    for _ in 0..32.min(n) {
        let next = next.clone();
        let results = results.clone();
        let token = server.enroll_token.clone();
        let mut client = HttpsClient::new(tls.clone(), &server.url)?;
        tasks.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= n {
                    return anyhow::Ok(());
                }
                let enrolled = enroll_one(&mut client, &token, index).await?;
                results.lock().expect("lock")[index] = Some(enrolled);
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let enroll_seconds = enroll_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_enrolled = server.pid.map_or(0, rss_bytes);
    say(format!(
        "{n} agents enrolled in {enroll_seconds:.1} s; server {} MiB resident",
        rss_enrolled >> 20
    ));
    let enrolled: Vec<(String, Ed25519KeyPair)> =
        std::mem::take(&mut *results.lock().expect("lock"))
            .into_iter()
            .map(|e| e.expect("every agent enrolled"))
            .collect();

    // Connect them all.
    let fleet = Arc::new(Fleet {
        stats: Stats {
            ramping: AtomicBool::new(true),
            ..Stats::default()
        },
        slots: (0..n).map(|_| AgentSlot::default()).collect(),
        machine_ids: enrolled.iter().map(|(id, _)| id.clone()).collect(),
    });
    let ramp = Arc::new(Semaphore::new(RAMP_CONCURRENCY));
    let connect_started = Instant::now();
    let mut agents = Vec::with_capacity(n);
    for (index, (machine_id, key)) in enrolled.into_iter().enumerate() {
        let identity = Identity {
            machine_id,
            server: server.url.clone(),
            name: None,
            key,
            tls: tls.clone(),
            state_dir: PathBuf::new(),
        };
        agents.push(tokio::spawn(run_agent(
            fleet.clone(),
            index,
            identity,
            ramp.clone(),
        )));
    }
    let up_limit = Duration::from_secs(120).max(Duration::from_millis(3 * n as u64));
    let all_up = wait_connected(&fleet, n, up_limit).await;
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    fleet.stats.ramping.store(false, Ordering::Release);
    let agents_connected = fleet.stats.connected.load(Ordering::Acquire);
    if !all_up {
        say(format!(
            "only {agents_connected} of {n} agents connected within {up_limit:?}"
        ));
    } else {
        say(format!("{n} agents connected in {connect_seconds:.1} s"));
    }
    // Idle for a moment (heartbeats only), then the server's memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_sessions = server.pid.map_or(0, rss_bytes);
    let bench_rss = rss_bytes(std::process::id());
    let rss_per_session = rss_sessions.saturating_sub(rss_idle) / agents_connected.max(1) as u64;
    say(format!(
        "server {} MiB resident with {agents_connected} sessions: {rss_per_session} bytes a session; this tool {} MiB",
        rss_sessions >> 20,
        bench_rss >> 20
    ));
    fleet.stats.counting.store(true, Ordering::Release);

    // The calls.
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let counts = Arc::new(Counts::default());
    let polls = Arc::new(Semaphore::new(POLL_CONCURRENCY));
    let api_up = Arc::new(AtomicBool::new(true));
    let mut calls = Vec::new();
    let mut restart = None;
    let started = tokio::time::Instant::now();
    let period = Duration::from_secs_f64(1.0 / options.rate);
    let total = (options.duration.as_secs_f64() * options.rate).round() as u64;
    let mut rng = Rng::new();
    let mut restart_at = options.restart_after.map(|after| started + after);
    for k in 0..total {
        let at = started + period.mul_f64(k as f64);
        if let Some(when) = restart_at
            && when <= at
        {
            tokio::time::sleep_until(when).await;
            restart_at = None;
            restart = Some(
                restart_server(
                    &mut server,
                    &fleet,
                    &api,
                    &counts,
                    &latencies,
                    &polls,
                    &api_up,
                    &mut rng,
                    started.elapsed(),
                    &say,
                )
                .await?,
            );
        }
        tokio::time::sleep_until(at).await;
        let Some(index) = pick(&fleet, &mut rng) else {
            // Right after a restart few agents may be back yet.
            if !RESTARTING.load(Ordering::Acquire) {
                fleet.stats.error("no idle connected machine to call on");
            }
            continue;
        };
        calls.push(tokio::spawn(call(
            fleet.clone(),
            api.clone(),
            counts.clone(),
            latencies.clone(),
            polls.clone(),
            api_up.clone(),
            index,
            None,
        )));
    }
    for task in calls {
        let _ = task.await;
    }
    let restart = match restart {
        Some(task) => {
            let report = task.await?;
            say(format!(
                "agents back {:?} s after the kill; the burst's {} actions succeeded {:?} s after it",
                report.agents_back_s, report.actions_before_kill, report.actions_succeeded_s
            ));
            Some(report)
        }
        None => None,
    };
    let calls_done = started.elapsed();
    say(format!(
        "{} calls in {:.1} s",
        counts.actions.load(Ordering::Relaxed),
        calls_done.as_secs_f64()
    ));

    // Offline probes.
    let offline = if options.offline_probes > 0 {
        Some(
            offline_probes(
                &fleet,
                &api,
                &counts,
                &polls,
                &api_up,
                options.offline_probes,
            )
            .await?,
        )
    } else {
        None
    };
    let bulk = if options.bulk > 0 {
        let report = bulk_isolate(&fleet, &api, &counts, options.bulk).await?;
        say(format!(
            "bulk isolate of {} machines: answered in {:.0} ms, last Succeeded {} after the call",
            report.machines,
            report.call_ms,
            report
                .last_succeeded_ms
                .map_or("never".to_owned(), |ms| format!("{ms:.0} ms"))
        ));
        Some(report)
    } else {
        None
    };
    let webhook = match &receiver {
        Some(receiver) => {
            // Every action created completes (or the run counted an error).
            let expected = counts.actions.load(Ordering::Relaxed) as usize;
            receiver.wait_for(expected, Duration::from_secs(30)).await;
            let report = receiver.report();
            say(format!(
                "webhook: {} completions received ({} deliveries, {} badly signed); \
                 completion -> receiver p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                report.distinct,
                report.deliveries,
                report.bad_signatures,
                report.p50_ms,
                report.p99_ms,
                report.max_ms
            ));
            Some(report)
        }
        None => None,
    };
    let agents_connected_at_end = fleet.stats.connected.load(Ordering::Acquire);
    fleet.stats.counting.store(false, Ordering::Release);
    for agent in &agents {
        agent.abort();
    }
    let mut latencies = std::mem::take(&mut *latencies.lock().expect("lock"));
    latencies.sort();
    let pid_end = server.pid.unwrap_or(0);
    let report = Report {
        agents: n,
        agents_connected,
        agents_connected_at_end,
        rate: options.rate,
        duration_s: options.duration.as_secs_f64(),
        actions: counts.actions.load(Ordering::Relaxed),
        succeeded: counts.succeeded.load(Ordering::Relaxed),
        errors: fleet.stats.errors.load(Ordering::Relaxed),
        p50_ms: percentile_ms(&latencies, 0.5),
        p90_ms: percentile_ms(&latencies, 0.9),
        p99_ms: percentile_ms(&latencies, 0.99),
        max_ms: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        server_pid: pid_end,
        server_rss_bytes: rss_sessions,
        server_rss_idle_bytes: rss_idle,
        server_rss_enrolled_bytes: rss_enrolled,
        rss_per_session_after_enrollment_bytes: rss_sessions.saturating_sub(rss_enrolled)
            / agents_connected.max(1) as u64,
        server_rss_end_bytes: server.pid.map_or(0, rss_bytes),
        server_cpu_seconds: server.pid.map_or(0.0, cpu_seconds),
        rss_per_session_bytes: rss_per_session,
        bench_rss_bytes: bench_rss,
        open_file_limit: files,
        enroll_seconds,
        connect_seconds,
        sessions_dropped: fleet.stats.sessions_dropped.load(Ordering::Relaxed),
        session_failures: fleet.stats.session_failures.load(Ordering::Relaxed),
        agents_gave_up: fleet.stats.gave_up.load(Ordering::Relaxed),
        api_retries: api.retries.load(Ordering::Relaxed),
        error_kinds: fleet.stats.error_kinds.lock().expect("lock").clone(),
        restart,
        offline,
        bulk,
        webhook,
    };
    if let Some(running) = &server.in_process {
        running.stop();
    }
    drop(agents);
    Ok(report)
}

async fn wait_connected(fleet: &Fleet, n: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if fleet.stats.connected.load(Ordering::Acquire) >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[derive(Default)]
struct Counts {
    actions: AtomicU64,
    succeeded: AtomicU64,
}

/// A random connected machine with no action in flight, marked busy.
fn pick(fleet: &Fleet, rng: &mut Rng) -> Option<usize> {
    for _ in 0..1_000 {
        let index = rng.below(fleet.slots.len());
        let slot = &fleet.slots[index];
        if slot.connected.load(Ordering::Acquire)
            && !slot.offline.load(Ordering::Acquire)
            && slot
                .busy
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Some(index);
        }
    }
    None
}

/// Isolates or releases machine `index` (whichever is valid now) and polls
/// the action until it is final. Returns the action's id and when its
/// `Succeeded` was seen.
#[allow(clippy::too_many_arguments)]
async fn call(
    fleet: Arc<Fleet>,
    api: Arc<Api>,
    counts: Arc<Counts>,
    latencies: Arc<Mutex<Vec<Duration>>>,
    polls: Arc<Semaphore>,
    api_up: Arc<AtomicBool>,
    index: usize,
    burst: Option<Arc<tokio::sync::Barrier>>,
) -> Option<Instant> {
    let slot = &fleet.slots[index];
    let isolate = !slot.isolated.load(Ordering::Acquire);
    let kind = if isolate { "isolate" } else { "unisolate" };
    let path = format!("/api/machines/{}/{kind}", fleet.machine_ids[index]);
    let reply = api
        .request(Method::POST, &path, r#"{"Comment":"fleet bench"}"#)
        .await;
    let stats = &fleet.stats;
    let id = match reply {
        Ok(reply) if reply.status == 201 => reply
            .json()
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_owned)),
        Ok(reply) => {
            stats.error(format!(
                "{kind}: HTTP {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
                    .chars()
                    .take(120)
                    .collect::<String>()
            ));
            None
        }
        Err(e) => {
            stats.error(format!("{kind}: {e:#}"));
            None
        }
    };
    let answered = Instant::now();
    // A restart's burst: the latencies include the restart, so they are
    // reported apart (RestartReport), not among the steady calls'.
    let in_burst = burst.is_some();
    if let Some(barrier) = burst {
        barrier.wait().await;
    }
    let Some(id) = id else {
        slot.busy.store(false, Ordering::Release);
        return None;
    };
    counts.actions.fetch_add(1, Ordering::Relaxed);
    slot.isolated.store(isolate, Ordering::Release);
    let outcome = poll(&api, &polls, &api_up, &id, answered).await;
    let finished = match outcome {
        Ok(at) => {
            counts.succeeded.fetch_add(1, Ordering::Relaxed);
            if !in_burst {
                latencies
                    .lock()
                    .expect("lock")
                    .push(at.duration_since(answered));
            }
            Some(at)
        }
        Err(e) => {
            stats.error(format!("{kind}: {e:#}"));
            None
        }
    };
    slot.busy.store(false, Ordering::Release);
    finished
}

/// Polls an action until it is final: `Ok` with when `Succeeded` was seen.
async fn poll(
    api: &Api,
    polls: &Semaphore,
    api_up: &AtomicBool,
    id: &str,
    since: Instant,
) -> anyhow::Result<Instant> {
    let path = format!("/api/machineactions/{id}");
    let mut wait = Duration::from_millis(2);
    loop {
        if since.elapsed() > ACTION_DEADLINE {
            bail!("action not final within {ACTION_DEADLINE:?}");
        }
        if api_up.load(Ordering::Acquire) {
            let permit = polls.acquire().await.expect("open");
            let reply = api.request(Method::GET, &path, "").await;
            let seen = Instant::now();
            drop(permit);
            match reply {
                Ok(reply) if reply.status == 200 => {
                    let status = reply.json()?["status"].as_str().unwrap_or("").to_owned();
                    match status.as_str() {
                        "Succeeded" => return Ok(seen),
                        "Pending" | "InProgress" => {}
                        other => bail!("action ended {other}"),
                    }
                }
                // Through a restart the API may be away for a moment.
                Ok(reply) if reply.status.is_server_error() => {}
                Ok(reply) => bail!("GET action: HTTP {}", reply.status),
                Err(_) if !api.is_strict() => {}
                Err(e) => return Err(e),
            }
        }
        tokio::time::sleep(wait).await;
        // Every 2 ms for the first 100 ms, then slower, up to 20 ms.
        if since.elapsed() > Duration::from_millis(100) {
            wait = (wait * 2).min(Duration::from_millis(20));
        }
    }
}

impl Api {
    /// Whether a failed request is an error (not while a restart is run).
    fn is_strict(&self) -> bool {
        !RESTARTING.load(Ordering::Acquire)
    }
}

static RESTARTING: AtomicBool = AtomicBool::new(false);

/// `--restart-after`: a burst of calls, `kill -9` once they are answered,
/// and a restart; returns once the new server answers, with a task that
/// waits for the agents and the burst's actions (the calls go on meanwhile).
#[allow(clippy::too_many_arguments)]
async fn restart_server(
    server: &mut ServerUnderTest,
    fleet: &Arc<Fleet>,
    api: &Arc<Api>,
    counts: &Arc<Counts>,
    latencies: &Arc<Mutex<Vec<Duration>>>,
    polls: &Arc<Semaphore>,
    api_up: &Arc<AtomicBool>,
    rng: &mut Rng,
    after: Duration,
    say: &impl Fn(String),
) -> anyhow::Result<tokio::task::JoinHandle<RestartReport>> {
    let n = fleet.slots.len();
    let burst = (n / 100).clamp(1, 1_000);
    let barrier = Arc::new(tokio::sync::Barrier::new(burst + 1));
    let mut tasks = Vec::new();
    let mut picked = 0;
    for _ in 0..burst {
        match pick(fleet, rng) {
            Some(index) => {
                picked += 1;
                tasks.push(tokio::spawn(call(
                    fleet.clone(),
                    api.clone(),
                    counts.clone(),
                    latencies.clone(),
                    polls.clone(),
                    api_up.clone(),
                    index,
                    Some(barrier.clone()),
                )));
            }
            None => {
                // Keep the barrier's count right.
                let barrier = barrier.clone();
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    None
                }));
            }
        }
    }
    // Every call of the burst answered (201 read): kill now.
    barrier.wait().await;
    RESTARTING.store(true, Ordering::Release);
    fleet.stats.counting.store(false, Ordering::Release);
    api_up.store(false, Ordering::Release);
    let agents_at_kill = fleet.stats.connected.load(Ordering::Acquire);
    let unfinished = fleet
        .slots
        .iter()
        .filter(|s| s.busy.load(Ordering::Acquire))
        .count();
    let killed = Instant::now();
    say(format!(
        "kill -9 of the server with {agents_at_kill} agents connected and {unfinished} actions unfinished"
    ));
    let server_up = server.kill_and_restart().await?;
    api_up.store(true, Ordering::Release);
    say(format!(
        "server restarted (pid {}) {:.2} s after the kill",
        server.pid.unwrap_or(0),
        server_up.as_secs_f64()
    ));
    let fleet = fleet.clone();
    let pid_after = server.pid.unwrap_or(0);
    Ok(tokio::spawn(async move {
        // The agents notice the kill (their connections reset) and come back.
        let limit = Duration::from_secs(120);
        let mut agents_back = None;
        while killed.elapsed() < limit {
            if fleet.stats.connected.load(Ordering::Acquire) >= n {
                agents_back = Some(killed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut finished = Vec::new();
        for task in tasks {
            finished.push(task.await.ok().flatten());
        }
        let all_succeeded = finished.iter().filter(|f| f.is_some()).count() == picked;
        let actions_succeeded = all_succeeded.then(|| {
            finished
                .iter()
                .flatten()
                .map(|at| at.saturating_duration_since(killed))
                .max()
                .unwrap_or_default()
                .as_secs_f64()
        });
        RESTARTING.store(false, Ordering::Release);
        fleet.stats.counting.store(true, Ordering::Release);
        RestartReport {
            killed_after_s: after.as_secs_f64(),
            agents_at_kill,
            server_up_s: server_up.as_secs_f64(),
            agents_back_s: agents_back.map(|d| d.as_secs_f64()),
            actions_before_kill: picked,
            actions_unfinished_at_kill: unfinished,
            actions_succeeded_s: actions_succeeded,
            pid_after,
        }
    }))
}

/// `--offline-probes`: K agents go away, are isolated while away, and come
/// back.
async fn offline_probes(
    fleet: &Arc<Fleet>,
    api: &Arc<Api>,
    counts: &Arc<Counts>,
    polls: &Arc<Semaphore>,
    api_up: &Arc<AtomicBool>,
    k: usize,
) -> anyhow::Result<OfflineReport> {
    let mut rng = Rng::new();
    let mut probes = Vec::new();
    while probes.len() < k.min(fleet.slots.len()) {
        let Some(index) = pick(fleet, &mut rng) else {
            bail!("not enough idle connected machines for {k} offline probes");
        };
        probes.push(index);
    }
    for &index in &probes {
        let slot = &fleet.slots[index];
        *slot.probe.lock().expect("lock") = Some(ProbeTimes::default());
        slot.offline.store(true, Ordering::Release);
        slot.wake.notify_one();
    }
    // Gone from the agents' side; give the server a moment to see the
    // connections close.
    let deadline = Instant::now() + Duration::from_secs(10);
    while probes
        .iter()
        .any(|i| fleet.slots[*i].connected.load(Ordering::Acquire))
    {
        if Instant::now() > deadline {
            bail!("offline probes: agents did not disconnect");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ids = Vec::new();
    for &index in &probes {
        let slot = &fleet.slots[index];
        let isolate = !slot.isolated.load(Ordering::Acquire);
        let kind = if isolate { "isolate" } else { "unisolate" };
        let path = format!("/api/machines/{}/{kind}", fleet.machine_ids[index]);
        let reply = api
            .request(Method::POST, &path, r#"{"Comment":"fleet bench, offline"}"#)
            .await?;
        if reply.status != 201 {
            bail!(
                "offline probe {kind}: HTTP {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        counts.actions.fetch_add(1, Ordering::Relaxed);
        slot.isolated.store(isolate, Ordering::Release);
        ids.push(reply.json()?["id"].as_str().context("id")?.to_owned());
    }
    // Back on line.
    for &index in &probes {
        let slot = &fleet.slots[index];
        slot.offline.store(false, Ordering::Release);
        slot.wake.notify_one();
    }
    let mut to_action = Vec::new();
    let mut to_succeeded = Vec::new();
    for (&index, id) in probes.iter().zip(&ids) {
        let result = poll(api, polls, api_up, id, Instant::now()).await;
        let slot = &fleet.slots[index];
        let times = slot.probe.lock().expect("lock").take().unwrap_or_default();
        slot.busy.store(false, Ordering::Release);
        match (result, times.reconnect) {
            (Ok(at), Some(reconnect)) => {
                counts.succeeded.fetch_add(1, Ordering::Relaxed);
                to_succeeded.push(at.saturating_duration_since(reconnect));
                if let Some(action) = times.action {
                    to_action.push(action.saturating_duration_since(reconnect));
                }
            }
            (Ok(_), None) => fleet
                .stats
                .error("offline probe: succeeded without a reconnection"),
            (Err(e), _) => fleet.stats.error(format!("offline probe: {e:#}")),
        }
    }
    to_action.sort();
    to_succeeded.sort();
    Ok(OfflineReport {
        probes: probes.len(),
        received: to_action.len(),
        reconnect_to_action_p50_ms: percentile_ms(&to_action, 0.5),
        reconnect_to_action_max_ms: percentile_ms(&to_action, 1.0),
        reconnect_to_succeeded_p50_ms: percentile_ms(&to_succeeded, 0.5),
        reconnect_to_succeeded_max_ms: percentile_ms(&to_succeeded, 1.0),
    })
}

/// `--bulk`: `n` connected agents with nothing in flight, isolated in one
/// bulk call; then the actions are awaited through the API.
async fn bulk_isolate(
    fleet: &Arc<Fleet>,
    api: &Arc<Api>,
    counts: &Arc<Counts>,
    n: usize,
) -> anyhow::Result<BulkReport> {
    let mut picked = Vec::new();
    for (index, slot) in fleet.slots.iter().enumerate() {
        if picked.len() == n {
            break;
        }
        if slot.connected.load(Ordering::Acquire)
            && !slot.offline.load(Ordering::Acquire)
            && slot
                .busy
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            picked.push(index);
        }
    }
    if picked.len() < n {
        bail!(
            "only {} idle connected machines for a bulk of {n}",
            picked.len()
        );
    }
    let ids: Vec<&str> = picked
        .iter()
        .map(|&i| fleet.machine_ids[i].as_str())
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "Comment": "fleet bench, bulk",
        "IsolationType": "Full",
        "MachineIds": ids,
    }))?;
    let sent_at = std::time::SystemTime::now();
    let sent = Instant::now();
    let reply = api
        .request(Method::POST, "/api/machines/isolate", body)
        .await?;
    let call = sent.elapsed();
    if reply.status != 200 {
        bail!(
            "bulk isolate: HTTP {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
    }
    let answer: serde_json::Value = reply.json()?;
    let mut created = Vec::new();
    for entry in answer["value"].as_array().context("value")? {
        match entry["machineAction"]["id"].as_str() {
            Some(id) => created.push(id.to_owned()),
            None => fleet.stats.error(format!("bulk isolate entry: {entry}")),
        }
    }
    counts
        .actions
        .fetch_add(created.len() as u64, Ordering::Relaxed);
    let sent_nanos = sent_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    // Until none of them is in flight: a count, cheap for the server while
    // it works; then the actions, once.
    let since = proto::time::format_utc(sent_nanos - 1_000_000);
    let ours = format!("creationDateTimeUtc%20ge%20{since}%20and%20type%20eq%20'Isolate'");
    let in_flight = format!(
        "/api/machineactions?$filter={ours}%20and%20status%20in%20('Pending','InProgress')&$count=true&$top=0"
    );
    let deadline = Instant::now() + ACTION_DEADLINE;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let reply = api.request(Method::GET, &in_flight, "").await?;
        if reply.status != 200 {
            bail!(
                "GET machineactions: HTTP {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        if reply.json()?["@odata.count"] == 0 || Instant::now() > deadline {
            break;
        }
    }
    let reply = api
        .request(
            Method::GET,
            &format!("/api/machineactions?$filter={ours}&$top=1000"),
            "",
        )
        .await?;
    let wanted: std::collections::HashSet<&str> = created.iter().map(String::as_str).collect();
    let page: serde_json::Value = reply.json()?;
    let finished: Vec<&serde_json::Value> = page["value"]
        .as_array()
        .context("value")?
        .iter()
        .filter(|a| a["id"].as_str().is_some_and(|id| wanted.contains(id)))
        .collect();
    let mut succeeded = Vec::new();
    for action in finished {
        match action["status"].as_str() {
            Some("Succeeded") => {
                let at = action["lastUpdateDateTimeUtc"]
                    .as_str()
                    .and_then(proto::time::parse_utc)
                    .context("lastUpdateDateTimeUtc")?;
                succeeded.push(Duration::from_nanos((at - sent_nanos).max(0) as u64));
            }
            other => fleet
                .stats
                .error(format!("bulk isolate: action ended {other:?}")),
        }
    }
    counts
        .succeeded
        .fetch_add(succeeded.len() as u64, Ordering::Relaxed);
    for &index in &picked {
        fleet.slots[index].isolated.store(true, Ordering::Release);
        fleet.slots[index].busy.store(false, Ordering::Release);
    }
    succeeded.sort();
    let all = !created.is_empty() && succeeded.len() == created.len();
    Ok(BulkReport {
        machines: picked.len(),
        created: created.len(),
        succeeded: succeeded.len(),
        call_ms: call.as_secs_f64() * 1e3,
        last_succeeded_ms: all.then(|| percentile_ms(&succeeded, 1.0)),
        median_succeeded_ms: all.then(|| percentile_ms(&succeeded, 0.5)),
    })
}

/// Prints the report for people.
pub fn print(report: &Report) {
    println!(
        "fleet: {} agents ({} connected at the start, {} at the end), {} calls/s for {} s",
        report.agents,
        report.agents_connected,
        report.agents_connected_at_end,
        report.rate,
        report.duration_s
    );
    println!(
        "  actions {}  succeeded {}  errors {}",
        report.actions, report.succeeded, report.errors
    );
    println!(
        "  201 -> Succeeded: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        report.p50_ms, report.p90_ms, report.p99_ms, report.max_ms
    );
    println!(
        "  server pid {}: {:.1} MiB idle, {:.1} MiB enrolled, {:.1} MiB with the sessions ({} bytes a session; {} after enrollment), {:.1} s CPU",
        report.server_pid,
        report.server_rss_idle_bytes as f64 / 1048576.0,
        report.server_rss_enrolled_bytes as f64 / 1048576.0,
        report.server_rss_bytes as f64 / 1048576.0,
        report.rss_per_session_bytes,
        report.rss_per_session_after_enrollment_bytes,
        report.server_cpu_seconds
    );
    println!(
        "  enrolled in {:.1} s, connected in {:.1} s; sessions dropped {}, failed attempts {}, agents gave up {}, API retries {}",
        report.enroll_seconds,
        report.connect_seconds,
        report.sessions_dropped,
        report.session_failures,
        report.agents_gave_up,
        report.api_retries
    );
    if let Some(r) = &report.restart {
        println!(
            "  restart: killed at {:.1} s with {} agents; server up in {:.2} s; agents back in {}; {} actions before the kill succeeded in {}",
            r.killed_after_s,
            r.agents_at_kill,
            r.server_up_s,
            r.agents_back_s
                .map_or("never".to_owned(), |s| format!("{s:.2} s")),
            r.actions_before_kill,
            r.actions_succeeded_s
                .map_or("never".to_owned(), |s| format!("{s:.2} s")),
        );
    }
    if let Some(o) = &report.offline {
        println!(
            "  offline probes: {} ({} received); reconnect -> action p50 {:.1} ms max {:.1} ms; -> Succeeded p50 {:.1} ms max {:.1} ms",
            o.probes,
            o.received,
            o.reconnect_to_action_p50_ms,
            o.reconnect_to_action_max_ms,
            o.reconnect_to_succeeded_p50_ms,
            o.reconnect_to_succeeded_max_ms
        );
    }
    if let Some(b) = &report.bulk {
        println!(
            "  bulk isolate: {} machines, {} created, {} succeeded; call {:.1} ms; call -> last Succeeded {}, median {}",
            b.machines,
            b.created,
            b.succeeded,
            b.call_ms,
            b.last_succeeded_ms
                .map_or("never".to_owned(), |ms| format!("{ms:.1} ms")),
            b.median_succeeded_ms
                .map_or("never".to_owned(), |ms| format!("{ms:.1} ms")),
        );
    }
    if let Some(w) = &report.webhook {
        println!(
            "  webhook: {} completions received ({} deliveries, {} badly signed); completion -> receiver p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            w.distinct, w.deliveries, w.bad_signatures, w.p50_ms, w.p99_ms, w.max_ms
        );
    }
    for (kind, count) in &report.error_kinds {
        println!("  error x{count}: {kind}");
    }
}
