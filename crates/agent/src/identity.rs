//! The agent's identity: an Ed25519 key pair made on the machine (the
//! private key never leaves it) and the machine id the server assigned.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use proto::agent::{
    AgentError, EnrollRequest, EnrollResponse, HostAddress, HostFacts, StoredIdentity,
};

use crate::https::{HttpsClient, tls_config};

const KEY_FILE: &str = "agent.key";
/// Attempts an enrollment makes at most while the server answers that it
/// is busy (503) or rate-limited (429) with a `Retry-After`.
pub const ENROLL_ATTEMPTS: u32 = 8;
/// How long an enrollment keeps trying a busy server at most.
pub const ENROLL_PATIENCE: std::time::Duration = std::time::Duration::from_secs(180);
const IDENTITY_FILE: &str = "identity.json";
const CA_FILE: &str = "ca.pem";

/// An enrolled agent's identity, loaded from its state directory.
pub struct Identity {
    pub machine_id: String,
    pub server: String,
    /// The computer name given at enrollment; `None`: the host name.
    pub name: Option<String>,
    pub key: Ed25519KeyPair,
    pub tls: Arc<rustls::ClientConfig>,
    pub state_dir: PathBuf,
}

/// What `state_dir` says about its enrollment: `None` when it was never
/// enrolled (no `identity.json`).
pub fn stored(state_dir: &Path) -> anyhow::Result<Option<StoredIdentity>> {
    let path = state_dir.join(IDENTITY_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .with_context(|| format!("{IDENTITY_FILE} in {} is corrupt", state_dir.display()))
}

impl Identity {
    /// Loads the identity; first makes the state directory and its files
    /// private to the agent's user where they are not (with a warning).
    pub fn load(state_dir: &Path) -> anyhow::Result<Identity> {
        if state_dir.is_dir() {
            for change in secure_state_dir(state_dir)? {
                tracing::warn!(%change, "the state directory or a file in it was open to other users; made private");
            }
        }
        let stored: StoredIdentity = serde_json::from_slice(
            &std::fs::read(state_dir.join(IDENTITY_FILE)).with_context(|| {
                format!(
                    "{} is not enrolled (no {IDENTITY_FILE})",
                    state_dir.display()
                )
            })?,
        )
        .with_context(|| format!("{IDENTITY_FILE} in {} is corrupt", state_dir.display()))?;
        let key = Ed25519KeyPair::from_pkcs8(&std::fs::read(state_dir.join(KEY_FILE))?)
            .map_err(|e| anyhow::anyhow!("the agent key is unusable: {e}"))?;
        Ok(Identity {
            machine_id: stored.machine_id,
            server: stored.server,
            name: stored.name,
            key,
            tls: tls_config(&state_dir.join(CA_FILE))?,
            state_dir: state_dir.to_owned(),
        })
    }

    /// What this host looks like, under the name given here (`run --name`),
    /// else the name it was enrolled with, else its host name.
    pub fn host_facts(&self, name: Option<&str>) -> HostFacts {
        host_facts(name.or(self.name.as_deref()))
    }

    pub fn sign(&self, message: &[u8]) -> String {
        STANDARD.encode(self.key.sign(message).as_ref())
    }
}

/// Makes `dir` 0700 and each file in it 0600 where they are looser (the
/// agent's private key is there); returns what it changed. Fails when a
/// mode cannot be fixed.
pub fn secure_state_dir(dir: &Path) -> anyhow::Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    let mut fixed = Vec::new();
    let mut tighten = |path: &Path, wanted: u32| -> anyhow::Result<()> {
        let mode = std::fs::symlink_metadata(path)
            .with_context(|| format!("cannot read the mode of {}", path.display()))?
            .permissions()
            .mode()
            & 0o7777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted)).with_context(
                || {
                    format!(
                        "{} has mode {mode:04o}, open to other users, and it cannot be \
                         changed to {wanted:04o}; fix it (chmod {wanted:o}) and start again",
                        path.display()
                    )
                },
            )?;
            fixed.push(format!("{}: {mode:04o} -> {wanted:04o}", path.display()));
        }
        Ok(())
    };
    tighten(dir, 0o700)?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            tighten(&entry.path(), 0o600)?;
        }
    }
    Ok(fixed)
}

/// Writes `data` to `path` atomically and durably: temp file, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(data)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// What this host looks like; `name` overrides the host name.
pub fn host_facts(name: Option<&str>) -> HostFacts {
    let hostname = name.map(str::to_owned).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into())
    });
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |key: &str| {
        os_release.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|v| v.strip_prefix('='))
                .map(|v| v.trim_matches('"').to_owned())
        })
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .ok();
    let arch = std::env::consts::ARCH;
    HostFacts {
        computer_dns_name: hostname,
        os_platform: Some("Linux".into()),
        os_version: field("VERSION_ID").or(kernel),
        os_processor: Some(if arch == "x86_64" {
            "x64".into()
        } else {
            arch.into()
        }),
        os_architecture: Some(
            if arch.contains("64") {
                "64-bit"
            } else {
                "32-bit"
            }
            .into(),
        ),
        os_build: None,
        agent_version: Some(env!("CARGO_PKG_VERSION").into()),
        addresses: local_addresses(),
    }
}

/// Addresses of this host's interfaces, read from procfs (IPv6) and the
/// routing table's local entries (IPv4).
fn local_addresses() -> Vec<HostAddress> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") {
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let Some(hex) = fields.first().filter(|h| h.len() == 32) {
                let groups: Vec<String> =
                    (0..8).map(|i| hex[i * 4..i * 4 + 4].to_owned()).collect();
                if let Ok(ip) = groups.join(":").parse::<std::net::Ipv6Addr>() {
                    out.push(HostAddress {
                        ip_address: ip.to_string(),
                        interface_type: Some(
                            if ip.is_loopback() {
                                "SoftwareLoopback"
                            } else {
                                "Ethernet"
                            }
                            .into(),
                        ),
                        operational_status: Some("Up".into()),
                        mac_address: None,
                    });
                }
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/fib_trie") {
        let mut last_ip: Option<String> = None;
        for line in text.lines() {
            let trimmed = line.trim();
            if let Some(ip) = trimmed.strip_prefix("|-- ") {
                last_ip = Some(ip.to_owned());
            } else if trimmed.contains("/32 host LOCAL")
                && let Some(ip) = last_ip.take()
                && !out.iter().any(|a| a.ip_address == ip)
            {
                let loopback = ip.starts_with("127.");
                out.insert(
                    0,
                    HostAddress {
                        ip_address: ip,
                        interface_type: Some(
                            if loopback {
                                "SoftwareLoopback"
                            } else {
                                "Ethernet"
                            }
                            .into(),
                        ),
                        operational_status: Some("Up".into()),
                        mac_address: None,
                    },
                );
            }
        }
    }
    out.sort_by_key(|a| a.interface_type.as_deref() == Some("SoftwareLoopback"));
    // The server refuses longer lists.
    out.truncate(proto::agent::MAX_ADDRESSES);
    out
}

/// A new Ed25519 key pair (also as its PKCS#8 document, to keep) and the
/// enrollment request that proves it to the server with `token` (the
/// proof: the key's signature of the token and the public key).
pub fn enroll_request(
    token: &str,
    facts: HostFacts,
) -> anyhow::Result<(aws_lc_rs::pkcs8::Document, Ed25519KeyPair, EnrollRequest)> {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("key generation failed"))?;
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|e| anyhow::anyhow!("key generation failed: {e}"))?;
    let public_key = STANDARD.encode(key.public_key().as_ref());
    let proof = STANDARD.encode(
        key.sign(&proto::agent::enroll_proof_message(token, &public_key))
            .as_ref(),
    );
    let request = EnrollRequest {
        token: token.to_owned(),
        public_key,
        proof,
        facts,
    };
    Ok((pkcs8, key, request))
}

/// Enrolls this machine: makes a key pair, proves it to the server with the
/// enroll token, and stores the identity in `state_dir`.
pub async fn enroll(
    server: &str,
    token: &str,
    ca_file: &Path,
    state_dir: &Path,
    name: Option<&str>,
) -> anyhow::Result<Identity> {
    let server = server.trim_end_matches('/').to_owned();
    let tls = tls_config(ca_file)?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
    }
    secure_state_dir(state_dir)?;
    let (pkcs8, key, request) = enroll_request(token, host_facts(name))?;
    let mut client = HttpsClient::new(tls.clone(), &server)?;
    let body = bytes::Bytes::from(serde_json::to_vec(&request)?);
    let started = std::time::Instant::now();
    let mut attempt = 0u32;
    let reply = loop {
        let reply = client
            .request(
                http::Method::POST,
                proto::agent::ENROLL_PATH,
                &[("content-type", "application/json")],
                body.clone(),
            )
            .await?;
        if reply.status.is_success() {
            break reply;
        }
        let (code, reason) = match serde_json::from_slice::<AgentError>(&reply.body) {
            Ok(error) => (error.code, error.reason),
            Err(_) => bail!("enrollment refused with HTTP {}", reply.status),
        };
        // Busy (503) or rate-limited (429), with a time to come back:
        // nothing was stored, so the same request is sent again, a few
        // times at most.
        let hint = reply
            .header("retry-after")
            .and_then(crate::retry::parse_retry_after)
            .filter(|_| {
                matches!(
                    reply.status,
                    http::StatusCode::SERVICE_UNAVAILABLE | http::StatusCode::TOO_MANY_REQUESTS
                )
            });
        attempt += 1;
        let Some(hint) = hint else {
            bail!("enrollment refused: {reason} ({code})");
        };
        let wait = crate::retry::next_wait(attempt, Some(hint));
        // The first time asked is always waited (it may be longer than the
        // patience: `--admission-max-retry-after` goes up to 5 minutes).
        if attempt >= ENROLL_ATTEMPTS || (attempt > 1 && started.elapsed() + wait > ENROLL_PATIENCE)
        {
            bail!(
                "enrollment refused: {reason} ({code}); the server was still busy after \
                 {attempt} attempts over {} s: try again later",
                started.elapsed().as_secs()
            );
        }
        tracing::info!(
            %code,
            %reason,
            attempt,
            wait_ms = wait.as_millis() as u64,
            "the server is busy; enrolling again when it asked"
        );
        tokio::time::sleep(wait).await;
    };
    let response: EnrollResponse =
        serde_json::from_slice(&reply.body).context("the server's enrollment answer is invalid")?;
    write_atomic(&state_dir.join(KEY_FILE), pkcs8.as_ref(), 0o600)?;
    write_atomic(&state_dir.join(CA_FILE), &std::fs::read(ca_file)?, 0o600)?;
    let name = name.map(str::to_owned);
    let stored = StoredIdentity {
        machine_id: response.machine_id.clone(),
        server: server.clone(),
        name: name.clone(),
    };
    write_atomic(
        &state_dir.join(IDENTITY_FILE),
        &serde_json::to_vec_pretty(&stored)?,
        0o600,
    )?;
    Ok(Identity {
        machine_id: response.machine_id,
        server,
        name,
        key,
        tls,
        state_dir: state_dir.to_owned(),
    })
}
