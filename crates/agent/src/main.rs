//! `cordon-agent`: enrolls this machine and enforces isolation.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agent::runner::{self, DEFAULT_AGENT_GID, Options};
use agent::state::{Loaded, StateFile};
use anyhow::bail;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cordon-agent", version, about = "The Cordon endpoint agent.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this machine with a server, using an enroll token.
    Enroll {
        /// The server's URL, such as https://cordon.example.com:8443.
        #[arg(long, env = "CORDON_SERVER_URL")]
        server: String,
        /// An enroll token from `cordon enroll-token create`.
        #[arg(long, env = "CORDON_ENROLL_TOKEN")]
        token: String,
        /// The CA certificate the server's certificate chains to.
        #[arg(long, env = "CORDON_CA_FILE")]
        ca_file: PathBuf,
        #[arg(
            long,
            env = "CORDON_AGENT_STATE_DIR",
            default_value = "/var/lib/cordon-agent"
        )]
        state_dir: PathBuf,
        /// Computer name to report instead of the host name; kept, and
        /// reported by every later `run`.
        #[arg(long, env = "CORDON_AGENT_NAME", value_parser = parse_name)]
        name: Option<String>,
        /// Enroll again even though the state directory holds an identity
        /// (it is replaced; the server keeps the old machine until revoked).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Keep a session with the server and execute isolation actions.
    Run {
        #[arg(
            long,
            env = "CORDON_AGENT_STATE_DIR",
            default_value = "/var/lib/cordon-agent"
        )]
        state_dir: PathBuf,
        /// Computer name to report for this run, instead of the one given at
        /// enrollment (or, if none was, the host name). Not saved.
        #[arg(long, env = "CORDON_AGENT_NAME", value_parser = parse_name)]
        name: Option<String>,
        /// Group id of the agent's sockets: the only ones isolation lets reach the server.
        #[arg(long, env = "CORDON_AGENT_GID", default_value_t = DEFAULT_AGENT_GID)]
        agent_gid: u32,
        /// Seconds the management channel has to prove itself after new rules.
        #[arg(long, env = "CORDON_AGENT_VERIFY_TIMEOUT", default_value_t = 10)]
        verify_timeout: u64,
        /// Longest wait between reconnection attempts, in seconds.
        #[arg(long, env = "CORDON_AGENT_MAX_BACKOFF", default_value_t = 60)]
        max_backoff: u64,
    },
    /// Say what is enforced now (saved intent and the kernel's table).
    Status {
        #[arg(
            long,
            env = "CORDON_AGENT_STATE_DIR",
            default_value = "/var/lib/cordon-agent"
        )]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Put the saved state in force without any network (run at boot).
    ApplySaved {
        #[arg(
            long,
            env = "CORDON_AGENT_STATE_DIR",
            default_value = "/var/lib/cordon-agent"
        )]
        state_dir: PathBuf,
    },
}

/// `--name`: what the server accepts as a computer name.
fn parse_name(text: &str) -> Result<String, String> {
    let name = text.trim();
    let valid = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if valid {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "'{text}' is not a computer name: use 1 to 255 letters, digits, '.', '-' or '_'"
        ))
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORDON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    // Every file the agent creates is private: its key is in the state directory.
    // SAFETY: umask only sets the process's file mode creation mask.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cordon-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cordon-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enroll {
            server,
            token,
            ca_file,
            state_dir,
            name,
            force,
            json,
        } => {
            if let Some(existing) = agent::identity::stored(&state_dir)?
                && !force
            {
                bail!(
                    "{} is already enrolled as machine {} with {}; pass --force to enroll \
                     again and replace that identity",
                    state_dir.display(),
                    existing.machine_id,
                    existing.server
                );
            }
            let identity =
                agent::enroll(&server, &token, &ca_file, &state_dir, name.as_deref()).await?;
            let response = proto::agent::EnrollResponse {
                machine_id: identity.machine_id.clone(),
            };
            if json {
                println!("{}", serde_json::to_string(&response)?);
            } else {
                println!("Enrolled as machine {}.", identity.machine_id);
            }
            Ok(())
        }
        Command::Run {
            state_dir,
            name,
            agent_gid,
            verify_timeout,
            max_backoff,
        } => {
            runner::run(Options {
                state_dir,
                name,
                agent_gid,
                verify_timeout: Duration::from_secs(verify_timeout.max(1)),
                max_backoff: Duration::from_secs(max_backoff.max(1)),
            })
            .await
        }
        Command::Status { state_dir, json } => {
            let enrolled = agent::identity::stored(&state_dir);
            let loaded = StateFile::new(&state_dir).load();
            let table = agent::enforce::Enforcer::open().and_then(|mut e| e.table_present());
            let (intent, note) = match &loaded {
                Loaded::Nothing => ("NotIsolated".to_owned(), None),
                Loaded::Good(s) => (format!("{:?}", s.enforced), None),
                Loaded::Recovered(s, why) => (format!("{:?}", s.enforced), Some(why.clone())),
                Loaded::Corrupt(why) => ("Unknown".to_owned(), Some(why.clone())),
            };
            let table_text = match &table {
                Ok(true) => "present",
                Ok(false) => "absent",
                Err(_) => "unknown (no access to netlink)",
            };
            let unreadable = enrolled.is_err() || matches!(loaded, Loaded::Corrupt(_));
            let (identity, enrolled_text) = match enrolled {
                Ok(Some(identity)) => {
                    let name = identity.name.as_deref().unwrap_or("the host name");
                    let text = format!(
                        "machine {} at {} (reported as {name})",
                        identity.machine_id, identity.server
                    );
                    (Some(identity), text)
                }
                Ok(None) => (
                    None,
                    format!(
                        "no ({} holds no identity.json; see `cordon-agent enroll`)",
                        state_dir.display()
                    ),
                ),
                Err(e) => (None, format!("unknown: {e:#}")),
            };
            if json {
                let status = proto::agent::AgentStatus {
                    enrolled: identity.is_some(),
                    machine_id: identity.as_ref().map(|i| i.machine_id.clone()),
                    server: identity.as_ref().map(|i| i.server.clone()),
                    name: identity.as_ref().and_then(|i| i.name.clone()),
                    intent: intent.clone(),
                    table: table_text.to_owned(),
                    note: note.clone(),
                };
                println!("{}", serde_json::to_string(&status)?);
            } else {
                println!("Enrolled: {enrolled_text}");
                let shown = match intent.as_str() {
                    "Full" => "Isolated (Full)",
                    "Selective" => "Isolated (Selective)",
                    "NotIsolated" => "Not isolated",
                    other => other,
                };
                println!("Intended: {shown}");
                println!("Cordon's table in the kernel: {table_text}");
                if let Some(note) = note {
                    println!("Note: {note}");
                }
            }
            if unreadable {
                // Said above; the exit status lets scripts and monitoring see it.
                anyhow::bail!(
                    "the state directory {} could not be read whole (see above)",
                    state_dir.display()
                );
            }
            Ok(())
        }
        Command::ApplySaved { state_dir } => {
            let file = StateFile::new(&state_dir);
            let identity = agent::Identity::load(&state_dir)?;
            let mut enforcer = agent::enforce::Enforcer::open()?;
            let (state, _) = runner::reapply_saved(&file, &mut enforcer, &identity.machine_id)?;
            println!("Applied the saved state: {:?}.", state.enforced);
            Ok(())
        }
    }
}
