//! `cordon webhook`: the receivers that events are pushed to (docs/soar.md).

use std::io::{BufRead, Read};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use server::webhooks;
use store::StoreError;

use crate::DataDir;

#[derive(Subcommand)]
pub enum WebhookCommand {
    /// Add a webhook: the events of the given types are POSTed to the URL,
    /// signed (Standard Webhooks), from the next event on. Prints its id and
    /// its signing secret (shown once).
    Create {
        #[command(flatten)]
        data: DataDir,
        /// The receiver: an https:// URL.
        #[arg(long)]
        url: String,
        /// An event type to deliver (repeatable, or comma-separated):
        /// machineAction.created, machineAction.updated,
        /// machineAction.completed, machine.isolationChanged,
        /// machine.tamperDetected, exclusionRule.changed, audit.appended.
        #[arg(long = "event", required = true, value_name = "TYPE")]
        events: Vec<String>,
        /// Read the signing secret (whsec_ and the base64 of 24 to 64 bytes)
        /// from the first line of standard input. Without it, a secret is
        /// generated and shown once.
        #[arg(long)]
        secret_stdin: bool,
        /// PEM file of the CA certificates the receiver's certificate must
        /// chain to (default: the system's roots).
        #[arg(long, value_name = "PEM")]
        ca_file: Option<PathBuf>,
        /// What the webhook is for.
        #[arg(long)]
        description: Option<String>,
        /// Print the webhook as JSON, with its secret.
        #[arg(long)]
        json: bool,
    },
    /// List the webhooks (never their secrets).
    List {
        #[command(flatten)]
        data: DataDir,
        #[arg(long)]
        json: bool,
    },
    /// Delete a webhook; its deliveries not yet made are dropped.
    Delete {
        #[command(flatten)]
        data: DataDir,
        /// The webhook's id.
        id: String,
    },
    /// Show the latest deliveries, newest first, with every attempt and its
    /// outcome.
    Deliveries {
        #[command(flatten)]
        data: DataDir,
        /// Only this webhook's.
        #[arg(long, value_name = "ID")]
        webhook: Option<String>,
        /// How many deliveries, at most.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: u64,
        #[arg(long)]
        json: bool,
    },
}

pub async fn webhook_command(command: WebhookCommand) -> anyhow::Result<()> {
    match command {
        WebhookCommand::Create {
            data,
            url,
            events,
            secret_stdin,
            ca_file,
            description,
            json,
        } => {
            let secret = if secret_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .take(4096)
                    .read_line(&mut line)
                    .context("cannot read the secret from standard input")?;
                Some(line.trim().to_owned())
            } else {
                None
            };
            let ca_pem = match ca_file {
                Some(path) => {
                    let meta = std::fs::metadata(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    if meta.len() > webhooks::MAX_CA_PEM as u64 {
                        bail!(
                            "{} is larger than {} KiB; give only the CA certificates",
                            path.display(),
                            webhooks::MAX_CA_PEM / 1024
                        );
                    }
                    Some(
                        std::fs::read_to_string(&path)
                            .with_context(|| format!("cannot read {}", path.display()))?,
                    )
                }
                None => None,
            };
            let input = webhooks::WebhookInput {
                url,
                events,
                secret,
                ca_pem,
                description,
            };
            let webhook = webhooks::new_webhook(input, server::audit::cli_principal())
                .map_err(|e| anyhow::anyhow!(cli_words(&e)))?;
            let store = data.open().await?;
            let webhook = webhooks::create(&store, webhook)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            server::audit::record_command(&store, "webhook.create", &webhook.id).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&webhooks::entity(&webhook, true))?
                );
            } else {
                println!("Created webhook {} to {}", webhook.id, webhook.url);
                println!("  Events: {}", webhook.events.join(", "));
                println!("  Secret: {}", webhook.secret);
                println!(
                    "The secret is shown only now: the receiver checks each delivery's \
                     webhook-signature with it."
                );
            }
            Ok(())
        }
        WebhookCommand::List { data, json } => {
            let store = data.open().await?;
            let list: Vec<_> = store
                .list_webhooks()
                .await?
                .iter()
                .map(|w| webhooks::entity(w, false))
                .collect();
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("No webhooks.");
            } else {
                for w in list {
                    println!("{}  {}  {}", w.id, w.url, w.events.join(","));
                }
            }
            Ok(())
        }
        WebhookCommand::Delete { data, id } => {
            let store = data.open().await?;
            let id = id.trim().to_ascii_lowercase();
            match store.delete_webhook(&id).await {
                Ok(()) => {
                    server::audit::record_command(&store, "webhook.delete", &id).await?;
                    println!("Deleted webhook {id}; its undelivered events are dropped.");
                    Ok(())
                }
                Err(StoreError::NotFound) => bail!("no webhook has id '{id}'"),
                Err(e) => Err(e.into()),
            }
        }
        WebhookCommand::Deliveries {
            data,
            webhook,
            limit,
            json,
        } => {
            let store = data.open().await?;
            let webhook = webhook.map(|w| w.trim().to_ascii_lowercase());
            if let Some(id) = &webhook
                && store.get_webhook(id).await?.is_none()
            {
                bail!("no webhook has id '{id}'");
            }
            let listed = webhooks::deliveries(&store, webhook.as_deref(), limit as usize).await?;
            if json {
                println!("{}", serde_json::to_string(&listed)?);
                return Ok(());
            }
            if listed.is_empty() {
                println!("No deliveries.");
            }
            for d in listed {
                println!(
                    "{}  {}  event {} {}  {}, {} attempt(s){}",
                    d.created_date_time_utc,
                    d.id,
                    d.event_id,
                    d.event_type,
                    d.status,
                    d.attempts.len(),
                    d.next_attempt_date_time_utc
                        .map(|at| format!(", next at {at}"))
                        .unwrap_or_default()
                );
                for a in d.attempts {
                    let status = a
                        .status_code
                        .map_or_else(|| "no answer".to_owned(), |s| format!("HTTP {s}"));
                    println!(
                        "    {}  {status}  {} ms{}",
                        a.date_time_utc,
                        a.duration_ms,
                        a.error.map(|e| format!("  {e}")).unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
    }
}

/// The API's field names, as the command line spells them.
fn cli_words(message: &str) -> String {
    message
        .replace("CaCertificate", "--ca-file")
        .replace("Description", "--description")
        .replace("Events names", "--event names")
        .replace("Secret", "the secret")
        .replace("Url", "--url")
}
