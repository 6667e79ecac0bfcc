//! One session with the server: the upgrade, the proof, and framed messages.

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use proto::agent::{AgentError, AgentMessage, Enforced, HostFacts, MAX_LINE, ServerMessage};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};

use crate::https::{connect_tls_from, parse_server};
use crate::identity::Identity;

type Io = TokioIo<hyper::upgrade::Upgraded>;

/// The server refused the session, in its HTTP answer or its `refused`
/// message. The error [`Session::open`] returns then carries it: find it
/// with `error.downcast_ref::<Refused>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Such as `Unavailable`, `InvalidProof`, `Revoked` (or `HTTP 503` when
    /// the answer had no error body).
    pub code: String,
    pub reason: String,
    /// When to come back, if the server said (`retryAfterSeconds`, or the
    /// HTTP answer's `Retry-After`): it is busy, and this is no failure of
    /// the agent's ([`crate::retry`]).
    pub retry_after: Option<std::time::Duration>,
}

impl Refused {
    /// Whether the server no longer accepts this machine at all (revoked,
    /// or not enrolled): trying again is pointless.
    pub fn is_final(&self) -> bool {
        matches!(self.code.as_str(), "Revoked" | "UnknownMachine")
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "session refused: {} ({})", self.reason, self.code)?;
        if let Some(wait) = self.retry_after {
            write!(f, "; the server asks to try again in {} s", wait.as_secs())?;
        }
        Ok(())
    }
}

impl std::error::Error for Refused {}

/// An open, authenticated session.
pub struct Session {
    reader: BufReader<ReadHalf<Io>>,
    writer: WriteHalf<Io>,
    pub heartbeat_seconds: u64,
    /// The server's address this session is connected to.
    pub peer: std::net::SocketAddr,
    line: Vec<u8>,
}

impl Session {
    /// Connects, upgrades, answers the challenge and waits for the welcome.
    pub async fn open(
        identity: &Identity,
        facts: HostFacts,
        enforced: Enforced,
    ) -> anyhow::Result<Session> {
        Session::open_from(identity, facts, enforced, None).await
    }

    /// Like [`Session::open`], from the local address `local` (see
    /// [`crate::https::connect_tls_from`]).
    pub async fn open_from(
        identity: &Identity,
        facts: HostFacts,
        enforced: Enforced,
        local: Option<std::net::IpAddr>,
    ) -> anyhow::Result<Session> {
        let machine_id = identity.machine_id.clone();
        Session::open_with_hello(identity, local, move |proof| {
            let hello = AgentMessage::Hello {
                machine_id,
                proof,
                facts,
                enforced,
            };
            serde_json::to_vec(&hello).expect("a hello serializes")
        })
        .await
    }

    /// Like [`Session::open_from`], with the `hello` line (without its
    /// `\n`) made by `hello` from the proof: the protocol's compatibility
    /// tests send the messages of earlier agents with it.
    pub async fn open_with_hello(
        identity: &Identity,
        local: Option<std::net::IpAddr>,
        hello: impl FnOnce(String) -> Vec<u8>,
    ) -> anyhow::Result<Session> {
        let (host, port) = parse_server(&identity.server)?;
        // Announced as an agent's session connection: the server counts it
        // in the agents' share, not the API clients'.
        let mut tls_config = (*identity.tls).clone();
        tls_config.alpn_protocols = vec![proto::agent::SESSION_ALPN.to_vec(), b"http/1.1".to_vec()];
        let tls = connect_tls_from(std::sync::Arc::new(tls_config), &host, port, local).await?;
        let peer = tls.get_ref().0.peer_addr()?;
        let exporter = tls
            .get_ref()
            .1
            .export_keying_material([0u8; 32], proto::agent::EXPORTER_LABEL, None)
            .context("TLS exporter unavailable")?;
        let exporter = STANDARD.encode(exporter);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        let request = Request::builder()
            .method("GET")
            .uri(proto::agent::SESSION_PATH)
            .header(header::HOST, format!("{host}:{port}"))
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, proto::agent::SESSION_PROTOCOL)
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::retry::parse_retry_after);
            let body = response.into_body().collect().await?.to_bytes();
            let (code, reason) = match serde_json::from_slice::<AgentError>(&body) {
                Ok(e) => (e.code, e.reason),
                // Such as the API's error body of a full connection share.
                Err(_) => (
                    format!("HTTP {}", status.as_u16()),
                    format!("the server answered {status}"),
                ),
            };
            return Err(Refused {
                code,
                reason,
                retry_after,
            }
            .into());
        }
        let upgraded = hyper::upgrade::on(response).await?;
        let (read, writer) = tokio::io::split(TokioIo::new(upgraded));
        let mut session = Session {
            // Small: the server sends short lines (a longer one is read in
            // parts), and a fleet of simulated agents holds many sessions.
            reader: BufReader::with_capacity(2048, read),
            writer,
            heartbeat_seconds: 30,
            peer,
            line: Vec::new(),
        };
        let nonce = match session.recv().await? {
            ServerMessage::Challenge { nonce } => nonce,
            other => bail!("expected a challenge, got {other:?}"),
        };
        let proof = identity.sign(&proto::agent::session_proof_message(
            &identity.machine_id,
            &nonce,
            &exporter,
        ));
        let mut line = hello(proof);
        line.push(b'\n');
        session.send_raw(&line).await?;
        match session.recv().await? {
            ServerMessage::Welcome {
                heartbeat_seconds, ..
            } => {
                session.heartbeat_seconds = heartbeat_seconds;
                Ok(session)
            }
            ServerMessage::Refused {
                code,
                reason,
                retry_after_seconds,
            } => Err(Refused {
                code,
                reason,
                retry_after: retry_after_seconds.map(std::time::Duration::from_secs),
            }
            .into()),
            other => bail!("expected a welcome, got {other:?}"),
        }
    }

    pub async fn send(&mut self, message: &AgentMessage) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(message)?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Sends bytes as they are, framing included (tests use it to send what
    /// a well-behaved agent never would).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// The next message from the server; an error when the session ends.
    /// Cancel-safe: a partly read line is kept for the next call.
    pub async fn recv(&mut self) -> anyhow::Result<ServerMessage> {
        loop {
            if let Some(end) = self.line.iter().position(|b| *b == b'\n') {
                let parsed = serde_json::from_slice(&self.line[..end]);
                self.line.drain(..=end);
                return parsed.context("the server sent an invalid message");
            }
            if self.line.len() > MAX_LINE {
                bail!("the server sent an over-long message");
            }
            let room = (MAX_LINE + 1 - self.line.len()) as u64;
            let read = (&mut self.reader)
                .take(room)
                .read_until(b'\n', &mut self.line)
                .await?;
            if read == 0 {
                bail!("the server closed the session");
            }
        }
    }
}

use tokio::io::AsyncReadExt as _;
