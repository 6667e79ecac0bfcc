//! `cordon`: the server (`cordon serve`) and its admin commands.

mod people_cmd;
mod webhook_cmd;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use server::listen::ListenArg;
use server::monitoring::MetricsListen;
use server::{Config, TlsSource, crypto};

#[derive(Parser)]
#[command(
    name = "cordon",
    version,
    about = "Cordon: cut a compromised machine off the network, and let it back on."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: the isolation API, its OAuth authority and the agent gateway.
    Serve(Box<ServeArgs>),
    /// Manage the applications that call the API.
    #[command(subcommand)]
    App(AppCommand),
    /// Manage the tokens agents enroll with.
    #[command(subcommand, name = "enroll-token")]
    EnrollToken(EnrollTokenCommand),
    /// Manage enrolled machines.
    #[command(subcommand)]
    Machine(MachineCommand),
    /// Manage the isolation exclusion rules (what Selective isolation lets through).
    #[command(subcommand)]
    Exclusion(ExclusionCommand),
    /// Check and export the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Manage the people who sign in (delegated access).
    #[command(subcommand)]
    User(people_cmd::UserCommand),
    /// Manage roles: what users may do.
    #[command(subcommand)]
    Role(people_cmd::RoleCommand),
    /// Manage machine groups: which machines each user group reaches.
    #[command(subcommand)]
    Group(people_cmd::GroupCommand),
    /// Manage webhooks: signed HTTPS pushes of events to playbooks.
    #[command(subcommand)]
    Webhook(webhook_cmd::WebhookCommand),
    /// Manage the token-signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Write a backup of the data directory to one file, while the server
    /// runs: the database as of one moment, with the CA and the server
    /// certificate and their keys (keep it as safe as the data directory).
    Backup {
        #[command(flatten)]
        data: DataDir,
        /// The backup file to create (never over an existing file).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// Print what the backup holds as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into a data directory, with the server stopped.
    /// Nothing is deleted: the files it replaces are renamed
    /// `<name>.replaced-<time>` beside them.
    Restore {
        #[command(flatten)]
        data: ServeDataDir,
        /// The backup file (`cordon backup --to`).
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// Print what was restored as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new token-signing key: tokens are signed with it from now on
    /// (a running server takes it within 10 s). The old key stays in the
    /// JWKS, and its tokens stay valid, until every token it signed has
    /// expired (an hour and a few minutes).
    Rotate {
        #[command(flatten)]
        data: DataDir,
        /// Print the old and new key ids as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the hash chain; fails naming the first record that was
    /// altered, removed or moved.
    Verify {
        #[command(flatten)]
        data: DataDir,
    },
    /// Remove the records older than a time, leaving a checkpoint signed
    /// with the server's key from which `audit verify` still checks the rest.
    Prune {
        #[command(flatten)]
        data: DataDir,
        /// Remove the records before this time: an ISO 8601 UTC time such as
        /// 2026-01-31T08:00:00Z, or an age such as 90d (records older than
        /// that). Records from the first one at or after it on are kept.
        #[arg(long, value_parser = parse_since)]
        before: i64,
        /// Print what was removed as JSON: removed, before, checkpointSeq, checkpointHash.
        #[arg(long)]
        json: bool,
    },
    /// Print the records as JSON lines, oldest first.
    Export {
        #[command(flatten)]
        data: DataDir,
        /// Only records at or after this time: an ISO 8601 UTC time such as
        /// 2026-01-31T08:00:00Z, or a duration back from now such as 24h or 7d.
        #[arg(long, value_parser = parse_since)]
        since: Option<i64>,
    },
}

#[derive(Args)]
struct DataDir {
    /// Directory with the database, keys and certificates (made by `cordon serve`).
    #[arg(long, env = "CORDON_DATA_DIR", default_value = "./cordon-data")]
    pub data_dir: PathBuf,
    /// Create the data directory and its database if they don't exist yet
    /// (without it, a missing one is an error).
    #[arg(long)]
    pub init: bool,
}

impl DataDir {
    /// Opens the data directory's store (creating it only with `--init`) and
    /// says on standard error which directory and tenant it is, so a
    /// command run from the wrong folder is noticed.
    async fn open(&self) -> anyhow::Result<store::Store> {
        let store = if self.init {
            server::init_data_dir(&self.data_dir)?
        } else {
            server::open_store(&self.data_dir)?
        };
        let tenant_id = server::tenant_id(&store).await?;
        eprintln!(
            "data directory: {}, tenant: {tenant_id}",
            server::absolute(&self.data_dir).display()
        );
        Ok(store)
    }
}

#[derive(Args)]
struct ServeDataDir {
    /// Directory with the database, keys and certificates (created on first start).
    #[arg(long, env = "CORDON_DATA_DIR", default_value = "./cordon-data")]
    pub data_dir: PathBuf,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    data: ServeDataDir,
    /// Make a new CA when the data directory has none although machines are
    /// enrolled. Every enrolled agent trusts only the missing CA: it loses
    /// this server and must be enrolled again. Without this flag such a start
    /// is refused (restore ca.pem and ca-key.pem from a backup instead).
    /// No effect while the CA is there.
    #[arg(long, env = "CORDON_NEW_CA")]
    new_ca: bool,
    /// Where to serve HTTPS: IP:PORT, [IPv6]:PORT, or HOST:PORT (every address
    /// the name resolves to), such as 0.0.0.0:8443 or localhost:8443.
    #[arg(long, env = "CORDON_LISTEN", default_value = "127.0.0.1:8443")]
    listen: ListenArg,
    /// Canonical base URL (the tokens' issuer), such as https://cordon.example.com:8443:
    /// https, a host, an optional port and path; no user info, query or fragment.
    /// Default: https://<listen host>:<port>, with this machine's host name for 0.0.0.0 and ::.
    #[arg(long, env = "CORDON_PUBLIC_URL")]
    public_url: Option<String>,
    /// PEM certificate chain to serve instead of the generated one (needs --tls-key).
    #[arg(long, env = "CORDON_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "CORDON_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Extra name or address for the generated certificate (repeatable;
    /// comma-separated in the environment variable).
    #[arg(long = "tls-san", env = "CORDON_TLS_SAN", value_delimiter = ',')]
    tls_san: Vec<String>,
    /// How long a Pending action waits for its machine before it times out (e.g. 3d, 12h, 30s).
    #[arg(long, env = "CORDON_ACTION_EXPIRY", default_value = "3d", value_parser = parse_duration)]
    action_expiry: Duration,
    /// How long an action may stay InProgress before it times out.
    #[arg(long, env = "CORDON_APPLY_DEADLINE", default_value = "10m", value_parser = parse_duration)]
    apply_deadline: Duration,
    /// Calls a minute per application and endpoint (0: no limit).
    #[arg(long, env = "CORDON_RATE_LIMIT_PER_MINUTE", default_value_t = 100)]
    rate_limit_per_minute: u32,
    /// Calls an hour per application and endpoint (0: no limit).
    #[arg(long, env = "CORDON_RATE_LIMIT_PER_HOUR", default_value_t = 1500)]
    rate_limit_per_hour: u32,
    /// How often agents send a heartbeat.
    #[arg(long, env = "CORDON_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Failed sign-ins after which an account is locked out for a while (0: never).
    #[arg(long, env = "CORDON_SIGNIN_FAILURES_PER_USER", default_value_t = 5)]
    signin_failures_per_user: u32,
    /// Failed sign-ins after which a source address is locked out for a while (0: never).
    #[arg(long, env = "CORDON_SIGNIN_FAILURES_PER_SOURCE", default_value_t = 20)]
    signin_failures_per_source: u32,
    /// Agent enrollment attempts a minute from one source address (0: no limit).
    #[arg(long, env = "CORDON_ENROLL_LIMIT_PER_SOURCE", default_value_t = 30)]
    enroll_limit_per_source: u32,
    /// Agent enrollment attempts a minute from all sources together (0: no limit).
    #[arg(long, env = "CORDON_ENROLL_LIMIT_TOTAL", default_value_t = 300)]
    enroll_limit_total: u32,
    /// Failed client authentications (wrong or unknown client id or secret
    /// at the token endpoints) after which a client id is locked out for a while (0: never).
    #[arg(long, env = "CORDON_CLIENT_FAILURES_PER_CLIENT", default_value_t = 10)]
    client_failures_per_client: u32,
    /// Failed client authentications after which a source address is locked out for a while (0: never).
    #[arg(long, env = "CORDON_CLIENT_FAILURES_PER_SOURCE", default_value_t = 20)]
    client_failures_per_source: u32,
    /// Agent sessions open at once, at most (agents whose key was proved).
    #[arg(long, env = "CORDON_MAX_AGENT_CONNECTIONS", default_value_t = 120_000)]
    max_agent_connections: usize,
    /// Other connections open at once, at most (API clients, sign-ins,
    /// enrollments); they can never take the agents' share, nor agents theirs.
    #[arg(long, env = "CORDON_MAX_API_CONNECTIONS", default_value_t = 4_096)]
    max_api_connections: usize,
    /// Connections not yet known as either (TLS handshake, first request,
    /// an agent's proof of its key) at once, at most.
    #[arg(long, env = "CORDON_MAX_HANDSHAKES", default_value_t = 1_024)]
    max_handshakes: usize,
    /// TLS handshakes in progress at once, at most, for agents' connections
    /// and as many again for the others (default: 64 per core); the rest
    /// wait up to --admission-queue-timeout for a place, then are closed.
    #[arg(
        long,
        env = "CORDON_MAX_TLS_HANDSHAKES_IN_PROGRESS",
        default_value_t = server::admission::Settings::default().tls_handshakes as u32,
        value_parser = clap::value_parser!(u32).range(1..=100_000)
    )]
    max_tls_handshakes_in_progress: u32,
    /// Agent session set-ups in progress at once, at most (from the agent's
    /// hello to its pending actions sent; default: 64 per core); the rest
    /// wait up to --admission-queue-timeout, then are refused with
    /// `Unavailable` and a time to come back.
    #[arg(
        long,
        env = "CORDON_MAX_SESSION_SETUPS_IN_PROGRESS",
        default_value_t = server::admission::Settings::default().session_setups as u32,
        value_parser = clap::value_parser!(u32).range(1..=100_000)
    )]
    max_session_setups_in_progress: u32,
    /// Agent enrollments in progress at once, at most (default: 16 per
    /// core); the rest wait up to --admission-queue-timeout, then are
    /// answered 503 `ServerBusy` with `Retry-After`.
    #[arg(
        long,
        env = "CORDON_MAX_ENROLLMENTS_IN_PROGRESS",
        default_value_t = server::admission::Settings::default().enrollments as u32,
        value_parser = clap::value_parser!(u32).range(1..=100_000)
    )]
    max_enrollments_in_progress: u32,
    /// How long a TLS handshake, session set-up or enrollment over its
    /// bound waits for a place (10ms to 30s).
    #[arg(long, env = "CORDON_ADMISSION_QUEUE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    admission_queue_timeout: Duration,
    /// The longest time to come back the server hands to agents it turns
    /// away (1s to 5m, whole seconds); the times are spread up to it.
    #[arg(long, env = "CORDON_ADMISSION_MAX_RETRY_AFTER", default_value = "30s", value_parser = parse_duration)]
    admission_max_retry_after: Duration,
    /// Connections from one source address (an IPv6 /64), agent sessions
    /// excepted; further ones are closed at once (0: no cap).
    #[arg(long, env = "CORDON_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 64)]
    max_connections_per_source: usize,
    /// Live-event streams (`GET /api/events`) open at once, at most, in
    /// all; further ones are refused with 429 and Retry-After.
    #[arg(long, env = "CORDON_MAX_EVENT_STREAMS", default_value_t = 1_024)]
    max_event_streams: usize,
    /// Live-event streams one caller (an application or user) may have
    /// open at once, at most.
    #[arg(long, env = "CORDON_MAX_EVENT_STREAMS_PER_CALLER", default_value_t = 8)]
    max_event_streams_per_caller: usize,
    /// How long a connection may wait before sending a request (after
    /// opening, or between keep-alive requests).
    #[arg(long, env = "CORDON_CONNECTION_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    connection_idle_timeout: Duration,
    /// How long a connection other than an agent session is kept at most;
    /// then it is closed once its request in progress is answered.
    #[arg(long, env = "CORDON_CONNECTION_MAX_LIFETIME", default_value = "10m", value_parser = parse_duration)]
    connection_max_lifetime: Duration,
    /// Issuer URL of an external OpenID Connect provider whose access tokens
    /// are accepted (repeatable, or comma-separated; each needs its
    /// --oidc-audience, in order).
    #[arg(
        long = "oidc-issuer",
        env = "CORDON_OIDC_ISSUER",
        value_delimiter = ','
    )]
    oidc_issuers: Vec<String>,
    /// The audience (`aud`) the provider's tokens for Cordon carry.
    #[arg(
        long = "oidc-audience",
        env = "CORDON_OIDC_AUDIENCE",
        value_delimiter = ','
    )]
    oidc_audiences: Vec<String>,
    /// Prune audit records older than this (e.g. 365d) at start and every
    /// hour, leaving a signed checkpoint (default: keep every record).
    #[arg(long, env = "CORDON_AUDIT_RETENTION", value_parser = parse_duration)]
    audit_retention: Option<Duration>,
    /// How long events are kept in the event log (`GET /api/events`
    /// resumes with `Last-Event-ID` within it); older ones are pruned
    /// every minute.
    #[arg(long, env = "CORDON_EVENT_RETENTION", default_value = "24h", value_parser = parse_duration)]
    event_retention: Duration,
    /// Claim of external tokens whose values name Cordon roles.
    #[arg(long, env = "CORDON_OIDC_ROLE_CLAIM", default_value = "roles")]
    oidc_role_claim: String,
    /// Claim of external tokens whose values are user groups.
    #[arg(long, env = "CORDON_OIDC_GROUP_CLAIM", default_value = "groups")]
    oidc_group_claim: String,
    /// VALUE=ROLE: a role-claim value that grants a Cordon role (repeatable),
    /// such as soc-tier1=Viewer. With any mapping given, only mapped values grant roles;
    /// with none, the values name Cordon roles directly. Semicolon-separated
    /// in the environment variable (claim values may hold commas).
    #[arg(
        long = "oidc-role-map",
        env = "CORDON_OIDC_ROLE_MAP",
        value_delimiter = ';'
    )]
    oidc_role_map: Vec<String>,
    /// PEM file of CA certificates trusted for the providers' HTTPS
    /// (besides the system's).
    #[arg(long, env = "CORDON_OIDC_CA_FILE")]
    oidc_ca_file: Option<PathBuf>,
    /// Where to serve the Prometheus metrics (plain HTTP, GET /metrics):
    /// IP:PORT, or off. Default: 127.0.0.1:9464, skipped with a warning when
    /// another process holds it; an address given here that cannot be
    /// bound stops the server.
    #[arg(long, env = "CORDON_METRICS_LISTEN", value_parser = MetricsListen::parse)]
    metrics_listen: Option<MetricsListen>,
    /// Log format on standard error: text (for people) or json (one JSON
    /// object per line, for log collectors).
    #[arg(long, env = "CORDON_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum AppCommand {
    /// Create an application; prints its client id and secret (shown once).
    Create {
        #[command(flatten)]
        data: DataDir,
        /// Display name (the `requestor` of its actions).
        #[arg(long)]
        name: String,
        /// Application permission (repeatable): Machine.Isolate, Machine.Read.All,
        /// Machine.ReadWrite.All (which also allows managing isolation exclusion rules).
        #[arg(long = "permission", required = true)]
        permissions: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List applications.
    List {
        #[command(flatten)]
        data: DataDir,
        #[arg(long)]
        json: bool,
    },
    /// Delete an application; its tokens stop working at once.
    Delete {
        #[command(flatten)]
        data: DataDir,
        /// The application's client id.
        client_id: String,
    },
}

#[derive(Subcommand)]
enum EnrollTokenCommand {
    /// Create a token that agents enroll with (shown once, with its id).
    Create {
        #[command(flatten)]
        data: DataDir,
        /// Lifetime, with its unit: such as 30m, 24h or 7d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        expires_in: Duration,
        /// How many machines may enroll with it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        max_uses: u32,
        #[arg(long)]
        json: bool,
    },
    /// List the enroll tokens (never the tokens themselves): id, created,
    /// expiry, uses left, revoked.
    List {
        #[command(flatten)]
        data: DataDir,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: no machine can enroll with it any more (machines
    /// enrolled with it stay enrolled).
    Revoke {
        #[command(flatten)]
        data: DataDir,
        /// The token's id (from `create` or `list`).
        id: String,
    },
}

#[derive(Subcommand)]
enum MachineCommand {
    /// List enrolled machines.
    List {
        #[command(flatten)]
        data: DataDir,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a machine's enrollment: its agent can no longer connect.
    Revoke {
        #[command(flatten)]
        data: DataDir,
        machine_id: String,
    },
}

#[derive(Subcommand)]
enum ExclusionCommand {
    /// Add a rule. Conditions are ANDed; a rule needs at least one of
    /// --executable, --unit, --remote-address and --remote-port. Agents
    /// isolated Selectively get the new rules within seconds.
    Add {
        #[command(flatten)]
        data: DataDir,
        /// Unique name (case-insensitive).
        #[arg(long)]
        name: String,
        /// What the rule is for (at most 1000 characters).
        #[arg(long)]
        description: Option<String>,
        /// Absolute path of an executable whose processes are let through
        /// (not together with --unit).
        #[arg(long = "executable")]
        executable_path: Option<String>,
        /// A systemd unit (.service, .scope or .slice) whose processes are let through.
        #[arg(long = "unit")]
        systemd_unit: Option<String>,
        /// Inbound, Outbound or Both (the default).
        #[arg(long)]
        direction: Option<String>,
        /// Remote IPv4/IPv6 address or CIDR prefix (repeatable, or comma-separated).
        #[arg(long = "remote-address")]
        remote_addresses: Vec<String>,
        /// Remote port or range such as 8000-8100 (repeatable, or comma-separated).
        #[arg(long = "remote-port")]
        remote_ports: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the rules.
    List {
        #[command(flatten)]
        data: DataDir,
        #[arg(long)]
        json: bool,
    },
    /// Remove a rule, by id or name.
    Remove {
        #[command(flatten)]
        data: DataDir,
        /// The rule's id or its name (case-insensitive).
        name_or_id: String,
    },
}

const PERMISSIONS: &[&str] = &server::auth::APPLICATION_PERMISSIONS;

/// Durations that parse but make no sense for a server (a retention of a
/// millisecond empties the audit trail every hour; a heartbeat every 1000
/// days marks every agent gone) are refused with the range that works.
fn check_duration_ranges(args: &ServeArgs) -> anyhow::Result<()> {
    const SECOND: Duration = Duration::from_secs(1);
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);
    let checks = [
        (
            "--admission-queue-timeout",
            Some(args.admission_queue_timeout),
            Duration::from_millis(10),
            30 * SECOND,
            "10ms",
            "30s",
        ),
        (
            "--admission-max-retry-after",
            Some(args.admission_max_retry_after),
            SECOND,
            300 * SECOND,
            "1s",
            "5m",
        ),
        (
            "--audit-retention",
            args.audit_retention,
            HOUR,
            100 * 365 * DAY,
            "1h",
            "100 years",
        ),
        (
            "--event-retention",
            Some(args.event_retention),
            60 * SECOND,
            365 * DAY,
            "1m",
            "365d",
        ),
        (
            "--heartbeat-interval",
            Some(args.heartbeat_interval),
            SECOND,
            HOUR,
            "1s",
            "1h",
        ),
        (
            "--connection-max-lifetime",
            Some(args.connection_max_lifetime),
            SECOND,
            30 * DAY,
            "1s",
            "30d",
        ),
        (
            "--action-expiry",
            Some(args.action_expiry),
            SECOND,
            365 * DAY,
            "1s",
            "365d",
        ),
        (
            "--apply-deadline",
            Some(args.apply_deadline),
            SECOND,
            7 * DAY,
            "1s",
            "7d",
        ),
    ];
    for (flag, value, least, most, least_text, most_text) in checks {
        if let Some(value) = value
            && !(least..=most).contains(&value)
        {
            bail!("{flag} must be between {least_text} and {most_text}");
        }
    }
    Ok(())
}

/// `--since`: an ISO 8601 UTC time, or a duration back from now.
fn parse_since(text: &str) -> Result<i64, String> {
    if let Some(nanos) = proto::time::parse_utc(text.trim()) {
        return Ok(nanos);
    }
    let duration = parse_duration(text).map_err(|why| {
        if text.trim().starts_with(|c: char| c.is_ascii_digit()) && !text.contains('-') {
            // It looks like a duration: say what is wrong with it.
            why
        } else {
            format!(
                "'{text}' is neither a UTC time such as 2026-01-31T08:00:00Z nor a duration such as 24h"
            )
        }
    })?;
    Ok(server::now_nanos().saturating_sub(i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)))
}

/// Parses `500ms`, `30s`, `10m`, `24h`, `3d`. The unit is required (a bare
/// `24` meant 24 seconds to someone who meant hours) and zero is refused.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration such as 30s, 10m, 24h or 3d"))?;
    let seconds = match unit {
        "ms" => 0,
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "" => {
            return Err(format!(
                "'{text}' has no unit; say {text}s, {text}m, {text}h or {text}d"
            ));
        }
        _ => {
            return Err(format!(
                "unknown unit '{unit}' in '{text}'; use ms, s, m, h or d"
            ));
        }
    };
    if number == 0 {
        return Err(format!("'{text}' is zero; give a positive duration"));
    }
    if seconds == 0 {
        return Ok(Duration::from_millis(number));
    }
    // At most what nanoseconds in an i64 hold (about 292 years), which is
    // how times are computed with it.
    number
        .checked_mul(seconds)
        .filter(|s| *s <= i64::MAX as u64 / 1_000_000_000)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("'{text}' is too long"))
}

fn main() -> ExitCode {
    // Every file this process creates is private to its user: the data
    // directory holds the token-signing key and the CA's key.
    // SAFETY: umask only sets the process's file mode creation mask.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cordon: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cordon: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::App(command) => app_command(command).await,
        Command::EnrollToken(command) => enroll_token_command(command).await,
        Command::Machine(command) => machine_command(command).await,
        Command::Exclusion(command) => exclusion_command(command).await,
        Command::Audit(command) => audit_command(command).await,
        Command::User(command) => people_cmd::user_command(command).await,
        Command::Role(command) => people_cmd::role_command(command).await,
        Command::Group(command) => people_cmd::group_command(command).await,
        Command::Webhook(command) => webhook_cmd::webhook_command(command).await,
        Command::Keys(KeysCommand::Rotate { data, json }) => {
            let store = data.open().await?;
            let (old, new) = server::rotate_signing_key(&store).await?;
            server::audit::record_command(&store, "keys.rotate", &new).await?;
            let until = server::now_nanos()
                + server::jwt::RETIRED_KEY_GRACE_SECONDS.saturating_mul(1_000_000_000);
            let until = proto::time::format_utc(until);
            if json {
                let out = serde_json::json!({
                    "oldKeyId": old,
                    "newKeyId": new,
                    "oldKeyValidUntil": until,
                });
                println!("{out}");
            } else {
                println!("New token-signing key {new} (it replaces {old}).");
                println!(
                    "A running server signs with it within 10 s; tokens signed with {old} stay \
                     valid, and it stays in the JWKS, until {until}."
                );
            }
            Ok(())
        }
        Command::Backup { data, to, json } => backup_command(data, to, json).await,
        Command::Restore { data, from, json } => restore_command(data, from, json).await,
    }
}

fn backup_json(summary: &store::BackupSummary) -> serde_json::Value {
    serde_json::json!({
        "tenantId": summary.tenant_id,
        "schemaVersion": summary.schema_version,
        "machines": summary.machines,
        "actions": summary.actions,
        "files": summary.files,
    })
}

async fn backup_command(data: DataDir, to: PathBuf, json: bool) -> anyhow::Result<()> {
    let store = data.open().await?;
    let started = std::time::Instant::now();
    let summary = server::backup::backup(&data.data_dir, &store, &to).await?;
    server::audit::record_command(&store, "backup.create", &to.display().to_string()).await?;
    let size = std::fs::metadata(&to).map_or(0, |m| m.len());
    if json {
        let mut out = backup_json(&summary);
        out["file"] = serde_json::json!(server::absolute(&to));
        out["bytes"] = serde_json::json!(size);
        println!("{out}");
    } else {
        println!(
            "Wrote {} ({} bytes in {:.1} s): {} machines, {} actions, schema version {}, with {}.",
            to.display(),
            size,
            started.elapsed().as_secs_f64(),
            summary.machines,
            summary.actions,
            summary.schema_version,
            if summary.files.is_empty() {
                "no TLS files".to_owned()
            } else {
                summary.files.join(", ")
            }
        );
        if summary.files.iter().any(|f| f == "ca-key.pem") {
            println!(
                "It holds the token-signing key and the CA's key: keep it as safe as the data directory."
            );
        } else {
            println!(
                "It holds the token-signing key: keep it as safe as the data directory. The data \
                 directory has no CA yet (`cordon serve` makes it on its first start)."
            );
        }
    }
    Ok(())
}

async fn restore_command(data: ServeDataDir, from: PathBuf, json: bool) -> anyhow::Result<()> {
    let restored = server::backup::restore(&data.data_dir, &from)?;
    // The restore itself goes into the restored audit trail.
    let store = server::open_store(&data.data_dir)?;
    server::audit::record_command(&store, "backup.restore", &from.display().to_string()).await?;
    drop(store);
    if json {
        let mut out = backup_json(&restored.summary);
        out["dataDir"] = serde_json::json!(server::absolute(&data.data_dir));
        out["movedAside"] = restored
            .moved_aside
            .iter()
            .map(|(from, to)| serde_json::json!({"file": from, "movedTo": to}))
            .collect();
        println!("{out}");
    } else {
        println!(
            "Restored {} into {}: tenant {}, {} machines, {} actions.",
            from.display(),
            server::absolute(&data.data_dir).display(),
            restored.summary.tenant_id.as_deref().unwrap_or("?"),
            restored.summary.machines,
            restored.summary.actions
        );
        for (file, moved) in &restored.moved_aside {
            println!("  {file} was moved aside to {moved}");
        }
        println!(
            "Start the server on it: cordon serve --data-dir {}",
            data.data_dir.display()
        );
    }
    Ok(())
}

async fn audit_command(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { data } => {
            let store = data.open().await?;
            let checkpoint = store.audit_checkpoint().await?;
            if let Some(c) = &checkpoint {
                let keys = server::key_ring(&store).await?;
                if !keys.verify_text(&c.signed_text(), &c.signature) {
                    bail!(
                        "the audit chain is broken: the checkpoint of the last prune (record {}) \
                         is not signed by this server's key (it was altered)",
                        c.seq
                    );
                }
            }
            match store.verify_audit().await? {
                Ok(count) => {
                    match &checkpoint {
                        Some(c) => println!(
                            "{count} records, chain intact from the signed checkpoint \
                             (records up to {} pruned on {})",
                            c.seq,
                            proto::time::format_utc(c.pruned_at)
                        ),
                        None => println!("{count} records, chain intact"),
                    }
                    Ok(())
                }
                Err(broken) => bail!(
                    "the audit chain is broken at record {} ({}): {}",
                    broken.seq,
                    broken.id,
                    broken.reason
                ),
            }
        }
        AuditCommand::Prune { data, before, json } => {
            if before > server::now_nanos() {
                bail!("--before is in the future: that would remove records still being written");
            }
            let store = server::open_store(&data.data_dir)?;
            let key = std::sync::Arc::new(server::signing_key(&store).await?);
            let (removed, checkpoint) =
                server::audit::prune(&store, key, before, server::audit::cli_principal(), "CLI")
                    .await?;
            let before = proto::time::format_utc(before);
            if json {
                let out = serde_json::json!({
                    "removed": removed,
                    "before": before,
                    "checkpointSeq": checkpoint.as_ref().map(|c| c.seq),
                    "checkpointHash": checkpoint.as_ref().map(|c| c.hash.clone()),
                });
                println!("{out}");
            } else if removed == 0 {
                println!("no audit records before {before}; nothing removed");
            } else if let Some(c) = checkpoint {
                println!(
                    "removed {removed} audit records before {before}; the chain now starts \
                     after record {} (checkpoint hash {})",
                    c.seq, c.hash
                );
            }
            Ok(())
        }
        AuditCommand::Export { data, since } => {
            let store = data.open().await?;
            let mut query = store::Query::<store::AuditField> {
                filter: since.map(|at| {
                    store::Filter::Compare(
                        store::AuditField::At,
                        store::CmpOp::Ge,
                        store::Value::Time(at),
                    )
                }),
                take: 1000,
                ..Default::default()
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            loop {
                let page = store.list_audit(query.clone()).await?;
                for record in &page.items {
                    serde_json::to_writer(&mut out, &server::audit::audit_entity(record))?;
                    out.write_all(b"\n")?;
                }
                match page.next {
                    Some(cursor) => query.after = Some(cursor),
                    None => break,
                }
            }
            out.flush()?;
            Ok(())
        }
    }
}

/// Lines waiting to be written to standard error, at most; past that,
/// lines are dropped rather than slowing the server down.
const LOG_BUFFER_LINES: usize = 65_536;

/// Starts logging to standard error. The lines are written by a thread of
/// their own (the returned guard flushes them when dropped): a slow log
/// pipe never holds up a request, a session or the store's writer, which
/// logs every action's change of status as it commits it.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORDON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = format == LogFormat::Json;
    use std::io::IsTerminal;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("cordon-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    if json {
        // One object per line: the event's fields at the top level, the
        // request's or session's span (request id, route) under `span`.
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.init();
    }
    guard
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let _log_guard = init_logging(args.log_format);
    check_duration_ranges(&args)?;
    let mut config = Config::new(args.data.data_dir);
    config.new_ca = args.new_ca;
    config.listen_host = args.listen.name().map(str::to_owned);
    config.public_url = args.public_url;
    config.tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => TlsSource::Files { cert, key },
        _ => TlsSource::SelfSigned {
            extra_names: args.tls_san,
        },
    };
    config.action_expiry = args.action_expiry;
    config.apply_deadline = args.apply_deadline;
    config.rate_limit_per_minute = args.rate_limit_per_minute;
    config.rate_limit_per_hour = args.rate_limit_per_hour;
    config.heartbeat_interval = args.heartbeat_interval;
    config.signin_failures_per_user = args.signin_failures_per_user;
    config.signin_failures_per_source = args.signin_failures_per_source;
    config.enroll_per_source_per_minute = args.enroll_limit_per_source;
    config.enroll_per_minute = args.enroll_limit_total;
    config.client_failures_per_client = args.client_failures_per_client;
    config.client_failures_per_source = args.client_failures_per_source;
    config.connections = server::conns::Limits {
        agents: args.max_agent_connections,
        api: args.max_api_connections,
        handshakes: args.max_handshakes,
        per_source: args.max_connections_per_source,
    };
    config.admission = server::admission::Settings {
        tls_handshakes: args.max_tls_handshakes_in_progress as usize,
        session_setups: args.max_session_setups_in_progress as usize,
        enrollments: args.max_enrollments_in_progress as usize,
        queue_timeout: args.admission_queue_timeout,
        max_retry_after: Duration::from_secs(args.admission_max_retry_after.as_secs()),
    };
    for (flag, value) in [
        ("--max-agent-connections", args.max_agent_connections),
        ("--max-api-connections", args.max_api_connections),
        ("--max-handshakes", args.max_handshakes),
        ("--max-event-streams", args.max_event_streams),
        (
            "--max-event-streams-per-caller",
            args.max_event_streams_per_caller,
        ),
    ] {
        if value == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if args.connection_idle_timeout.is_zero()
        || args.connection_idle_timeout > Duration::from_secs(86_400)
    {
        bail!("--connection-idle-timeout must be between 1ms and 24h");
    }
    config.idle_timeout = args.connection_idle_timeout;
    config.event_streams = server::events::Limits {
        total: args.max_event_streams,
        per_caller: args.max_event_streams_per_caller,
    };
    config.max_connection_lifetime = args.connection_max_lifetime;
    config.audit_retention = args.audit_retention.filter(|r| !r.is_zero());
    config.event_retention = args.event_retention;
    if let Some(metrics_listen) = args.metrics_listen {
        config.metrics_listen = metrics_listen;
    }
    if args.oidc_issuers.len() != args.oidc_audiences.len() {
        bail!("give one --oidc-audience for each --oidc-issuer, in the same order");
    }
    let providers = args
        .oidc_issuers
        .into_iter()
        .zip(args.oidc_audiences)
        .map(|(issuer, audience)| server::oidc::Provider { issuer, audience })
        .collect();
    let mut oidc = server::oidc::OidcSettings::new(providers);
    oidc.role_claim = args.oidc_role_claim;
    oidc.group_claim = args.oidc_group_claim;
    oidc.ca_file = args.oidc_ca_file;
    for pair in args.oidc_role_map {
        let Some((value, role)) = pair.split_once('=') else {
            bail!("--oidc-role-map takes VALUE=ROLE, not '{pair}'");
        };
        oidc.role_map.push((value.to_owned(), role.to_owned()));
    }
    config.oidc = oidc;
    if let Some(url) = &config.public_url {
        let url = server::urls::public_url(url).map_err(|e| anyhow!("--public-url {e}"))?;
        config.public_url = Some(url);
    }
    let listeners = args.listen.bind()?;
    config.listen = listeners[0].local_addr()?;
    let self_signed = matches!(config.tls, TlsSource::SelfSigned { .. });
    let guessed_url = config.public_url.is_none()
        && args.listen.name().is_none()
        && config.listen.ip().is_unspecified();
    let running = server::start_with(config, listeners).await?;
    let mut out = std::io::stdout().lock();
    for addr in &running.listen_addrs {
        writeln!(out, "Cordon is serving on https://{addr}")?;
    }
    writeln!(out, "  URL:       {}", running.public_url)?;
    if self_signed {
        writeln!(out, "  TLS names: {}", running.tls_names.join(", "))?;
    }
    if guessed_url {
        let port = running.local_addr.port();
        if self_signed {
            writeln!(
                out,
                "  Note:      serving every address, under this machine's host name. Clients must \
                 use one of the TLS names; add a name with --tls-san NAME, and give the URL \
                 clients use with --public-url https://NAME:{port}."
            )?;
        } else {
            writeln!(
                out,
                "  Note:      serving every address, under this machine's host name. Give the URL \
                 clients use (a name your certificate carries) with --public-url https://NAME:{port}."
            )?;
        }
    }
    writeln!(out, "  Tenant id: {}", running.tenant_id)?;
    writeln!(
        out,
        "  Authority: {}/{}",
        running.public_url, running.tenant_id
    )?;
    writeln!(
        out,
        "  Console:   {}/ (sign in as a user: cordon user create)",
        running.public_url
    )?;
    if let Some(address) = running.metrics_addr {
        writeln!(out, "  Metrics:   http://{address}/metrics")?;
    }
    if let Some(ca) = &running.ca_path {
        writeln!(out, "  CA file:   {}", ca.display())?;
    }
    out.flush()?;
    drop(out);
    tracing::info!(address = %running.local_addr, tenant_id = %running.tenant_id, "serving");
    let state = running.state.clone();
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("stopping"),
        _ = running.wait() => {}
    }
    // Refusals counted but not yet recorded.
    server::audit::flush_folds(&state, true).await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn app_command(command: AppCommand) -> anyhow::Result<()> {
    match command {
        AppCommand::Create {
            data,
            name,
            permissions,
            json,
        } => {
            for permission in &permissions {
                if !PERMISSIONS.contains(&permission.as_str()) {
                    bail!(
                        "unknown permission '{permission}'; use {}",
                        PERMISSIONS.join(", ")
                    );
                }
            }
            let name = name.trim().to_owned();
            if name.is_empty() || name.chars().count() > 200 {
                bail!("--name must be 1 to 200 characters");
            }
            if !server::text::is_safe_to_show(&name) {
                bail!("--name {}", server::text::UNSAFE_TEXT);
            }
            let store = data.open().await?;
            let tenant_id = server::tenant_id(&store).await?;
            let mut unique = Vec::new();
            for p in permissions {
                if !unique.contains(&p) {
                    unique.push(p);
                }
            }
            let (client_id, secret) = server::create_app(&store, &name, unique.clone()).await?;
            server::audit::record_command(&store, "app.create", &client_id).await?;
            if json {
                let created = proto::cli::AppCreated {
                    tenant_id,
                    client_id,
                    client_secret: secret,
                };
                println!("{}", serde_json::to_string(&created)?);
            } else {
                println!("Created application '{name}' with {}.", unique.join(", "));
                println!("  Tenant id:     {tenant_id}");
                println!("  Client id:     {client_id}");
                println!("  Client secret: {secret}");
                println!("The secret is shown only now; store it safely.");
            }
            Ok(())
        }
        AppCommand::List { data, json } => {
            let store = data.open().await?;
            let apps = store.list_apps().await?;
            if json {
                let list: Vec<_> = apps
                    .into_iter()
                    .map(|a| proto::cli::AppSummary {
                        client_id: a.client_id,
                        name: a.name,
                        permissions: a.permissions,
                        created: proto::time::format_utc(a.created_at),
                    })
                    .collect();
                println!("{}", serde_json::to_string(&list)?);
            } else if apps.is_empty() {
                println!("No applications.");
            } else {
                for a in apps {
                    println!("{}  {}  {}", a.client_id, a.name, a.permissions.join(","));
                }
            }
            Ok(())
        }
        AppCommand::Delete { data, client_id } => {
            let store = data.open().await?;
            match store.delete_app(&client_id).await {
                Ok(()) => {
                    server::audit::record_command(&store, "app.delete", &client_id).await?;
                    println!("Deleted application {client_id}; its tokens no longer work.");
                    Ok(())
                }
                Err(store::StoreError::NotFound) => {
                    bail!("no application has client id '{client_id}'")
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

async fn enroll_token_command(command: EnrollTokenCommand) -> anyhow::Result<()> {
    match command {
        EnrollTokenCommand::Create {
            data,
            expires_in,
            max_uses,
            json,
        } => {
            let store = data.open().await?;
            let expires_at = i64::try_from(expires_in.as_nanos())
                .ok()
                .and_then(|n| server::now_nanos().checked_add(n))
                .context("--expires-in is too long")?;
            let (id, token) =
                server::create_enroll_token(&store, Some(expires_at), Some(i64::from(max_uses)))
                    .await?;
            server::audit::record_command(&store, "enroll-token.create", &id).await?;
            if json {
                let created = proto::cli::EnrollTokenCreated {
                    id,
                    token,
                    expires: Some(proto::time::format_utc(expires_at)),
                    max_uses: Some(i64::from(max_uses)),
                };
                println!("{}", serde_json::to_string(&created)?);
            } else {
                println!("Enroll token: {token}");
                println!("  Id:      {id}");
                println!("  Expires: {}", proto::time::format_utc(expires_at));
                println!("  Uses:    {max_uses}");
                println!(
                    "The token is shown only now; `cordon enroll-token revoke {id}` withdraws it."
                );
            }
            Ok(())
        }
        EnrollTokenCommand::List { data, json } => {
            let store = data.open().await?;
            let now = server::now_nanos();
            let list: Vec<_> = store
                .list_enroll_tokens()
                .await?
                .into_iter()
                .map(|t| {
                    let mut uses_left = t.max_uses.map(|m| (m - t.uses).max(0));
                    let status = if t.revoked_at.is_some() {
                        "Revoked"
                    } else if t.expires_at.is_some_and(|e| e <= now) {
                        "Expired"
                    } else if uses_left == Some(0) {
                        "UsedUp"
                    } else {
                        "Active"
                    };
                    if status != "Active" {
                        uses_left = Some(0);
                    }
                    proto::cli::EnrollTokenSummary {
                        id: t.id,
                        created: proto::time::format_utc(t.created_at),
                        expires: t.expires_at.map(proto::time::format_utc),
                        max_uses: t.max_uses,
                        uses: t.uses,
                        uses_left,
                        revoked: t.revoked_at.map(proto::time::format_utc),
                        status: status.to_owned(),
                    }
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("No enroll tokens.");
            } else {
                for t in list {
                    let left = t
                        .uses_left
                        .map_or("unlimited".to_owned(), |n| n.to_string());
                    println!(
                        "{}  {}  created {}  expires {}  uses left {left}",
                        t.id,
                        t.status,
                        t.created,
                        t.expires.as_deref().unwrap_or("never"),
                    );
                }
            }
            Ok(())
        }
        EnrollTokenCommand::Revoke { data, id } => {
            let store = data.open().await?;
            let id = id.trim().to_ascii_lowercase();
            match store.revoke_enroll_token(&id, server::now_nanos()).await {
                Ok(_) => {
                    server::audit::record_command(&store, "enroll-token.revoke", &id).await?;
                    println!("Revoked enroll token {id}; no machine can enroll with it any more.");
                    Ok(())
                }
                Err(store::StoreError::NotFound) => {
                    bail!("no enroll token has id '{id}' (`cordon enroll-token list` shows them)")
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

async fn machine_command(command: MachineCommand) -> anyhow::Result<()> {
    match command {
        MachineCommand::List { data, json } => {
            let store = data.open().await?;
            let page = store
                .list_machines(store::Query::default(), store::SqlContext::default())
                .await?;
            let list: Vec<_> = page
                .items
                .into_iter()
                .map(|m| proto::cli::MachineSummary {
                    machine_id: m.id,
                    computer_dns_name: m.facts.computer_dns_name,
                    revoked: m.revoked,
                    isolation_state: m.isolation_state,
                    last_seen: Some(proto::time::format_utc(m.last_seen)),
                    rbac_group_name: m.rbac_group_name,
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("No machines.");
            } else {
                for m in list {
                    let revoked = if m.revoked { "  (revoked)" } else { "" };
                    println!(
                        "{}  {}  {}  [{}]{revoked}",
                        m.machine_id, m.computer_dns_name, m.isolation_state, m.rbac_group_name
                    );
                }
            }
            Ok(())
        }
        MachineCommand::Revoke { data, machine_id } => {
            let store = data.open().await?;
            match store.revoke_machine(&machine_id.to_ascii_lowercase()).await {
                Ok(()) => {
                    let machine_id = machine_id.to_ascii_lowercase();
                    server::audit::record_command(&store, "machine.revoke", &machine_id).await?;
                    println!("Revoked machine {machine_id}; its agent can no longer connect.");
                    Ok(())
                }
                Err(store::StoreError::NotFound) => bail!("no machine has id '{machine_id}'"),
                Err(e) => Err(e.into()),
            }
        }
    }
}

async fn exclusion_command(command: ExclusionCommand) -> anyhow::Result<()> {
    use server::exclusions::{self, Field, RuleInput};
    let field = |value: Option<String>| value.map_or(Field::Absent, Field::Value);
    let list = |values: Vec<String>| {
        if values.is_empty() {
            Field::Absent
        } else {
            Field::Value(values)
        }
    };
    match command {
        ExclusionCommand::Add {
            data,
            name,
            description,
            executable_path,
            systemd_unit,
            direction,
            remote_addresses,
            remote_ports,
            json,
        } => {
            // The API's own checks, with the API's messages.
            let fields = exclusions::new_rule(RuleInput {
                name: Field::Value(name),
                description: field(description),
                executable_path: field(executable_path),
                systemd_unit: field(systemd_unit),
                direction: field(direction),
                remote_addresses: list(remote_addresses),
                remote_ports: list(remote_ports),
            })
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            let store = data.open().await?;
            let rule = exclusions::create_rule(&store, fields)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            server::audit::record_command(&store, "exclusion.create", &rule.id).await?;
            if json {
                println!("{}", serde_json::to_string(&exclusions::entity(&rule))?);
            } else {
                println!(
                    "Added exclusion rule '{}' ({}); rule-set version {}.",
                    rule.fields.name, rule.id, rule.version
                );
            }
            Ok(())
        }
        ExclusionCommand::List { data, json } => {
            let store = data.open().await?;
            let rules = store.list_exclusion_rules().await?;
            if json {
                let list: Vec<_> = rules.iter().map(exclusions::entity).collect();
                println!("{}", serde_json::to_string(&list)?);
            } else if rules.is_empty() {
                println!("No exclusion rules.");
            } else {
                for rule in &rules {
                    println!("{}", describe_rule(&exclusions::entity(rule)));
                }
            }
            Ok(())
        }
        ExclusionCommand::Remove { data, name_or_id } => {
            let store = data.open().await?;
            let by_id = if crypto::is_guid(&name_or_id) {
                store
                    .get_exclusion_rule(&name_or_id.to_ascii_lowercase())
                    .await?
            } else {
                None
            };
            let rule = match by_id {
                Some(rule) => rule,
                None => store
                    .get_exclusion_rule_by_name(&name_or_id)
                    .await?
                    .with_context(|| {
                        format!("no exclusion rule has the id or name '{name_or_id}'")
                    })?,
            };
            exclusions::delete_rule(&store, &rule.id)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            server::audit::record_command(&store, "exclusion.delete", &rule.id).await?;
            println!(
                "Removed exclusion rule '{}' ({}).",
                rule.fields.name, rule.id
            );
            Ok(())
        }
    }
}

/// One line of `cordon exclusion list`.
fn describe_rule(rule: &proto::api::ExclusionRule) -> String {
    let mut conditions = Vec::new();
    if let Some(path) = &rule.executable_path {
        conditions.push(format!("executable {path}"));
    }
    if let Some(unit) = &rule.systemd_unit {
        conditions.push(format!("unit {unit}"));
    }
    if !rule.remote_addresses.is_empty() {
        conditions.push(format!("addresses {}", rule.remote_addresses.join(",")));
    }
    if !rule.remote_ports.is_empty() {
        conditions.push(format!("ports {}", rule.remote_ports.join(",")));
    }
    format!(
        "{}  {}  {}  {}",
        rule.id,
        rule.name,
        rule.direction,
        conditions.join(" and ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3d"), Ok(Duration::from_secs(259_200)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        // `--expires-in 24` once meant 24 seconds; `0s` made a dead token.
        assert!(parse_duration("24").unwrap_err().contains("no unit"));
        assert!(parse_duration("0s").unwrap_err().contains("zero"));
        assert!(parse_duration("0ms").is_err());
        assert!(parse_duration("3x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(parse_duration("106751d").is_ok());
        assert!(parse_duration("106752d").is_err(), "past i64 nanoseconds");
    }
}
