//! `cordon-agent`: enrolls this machine with a Cordon server.

use std::path::PathBuf;
use std::process::ExitCode;

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
        #[arg(long)]
        server: String,
        /// An enroll token from `cordon enroll-token create`.
        #[arg(long, env = "CORDON_ENROLL_TOKEN")]
        token: String,
        /// The CA certificate the server's certificate chains to.
        #[arg(long)]
        ca_file: PathBuf,
        /// Where the agent keeps its key and state.
        #[arg(long, default_value = "/var/lib/cordon-agent")]
        state_dir: PathBuf,
        /// Computer name to report instead of the host name.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cordon-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Enroll {
                server,
                token,
                ca_file,
                state_dir,
                name,
                json,
            } => {
                let identity =
                    agent::enroll(&server, &token, &ca_file, &state_dir, name.as_deref()).await?;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "machineId": identity.machine_id })
                    );
                } else {
                    println!("Enrolled as machine {}.", identity.machine_id);
                }
                anyhow::Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cordon-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
