//! `cordon-bench fleet --webhook`: an HTTPS webhook receiver in the tool,
//! subscribed to `machineAction.completed`, that checks each signature and
//! measures how long each completion took to reach it: from the action's
//! `lastUpdateDateTimeUtc` (the server's clock, the time its final status
//! was written; the tool and the server share the machine's clock) to the
//! moment the request's body was read.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;

/// What the receiver saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WebhookReport {
    /// `machineAction.completed` deliveries received (retries included).
    pub deliveries: usize,
    /// Distinct `webhook-id`s among them.
    pub distinct: usize,
    /// Deliveries whose signature was wrong (answered 401).
    pub bad_signatures: usize,
    /// Completion → receipt, over the distinct deliveries.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Default)]
struct Seen {
    ids: std::collections::HashSet<String>,
    latencies: Vec<Duration>,
    deliveries: usize,
    bad_signatures: usize,
}

/// A running receiver; stops when dropped.
pub struct Receiver {
    pub url: String,
    pub ca_pem: String,
    pub secret: String,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Whether `headers` sign `body` with `key` (Standard Webhooks, `v1`).
fn signed(key: &[u8], headers: &http::HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let mut text = Vec::with_capacity(body.len() + 64);
    text.extend_from_slice(header("webhook-id").as_bytes());
    text.push(b'.');
    text.extend_from_slice(header("webhook-timestamp").as_bytes());
    text.push(b'.');
    text.extend_from_slice(body);
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    let expected = format!(
        "v1,{}",
        STANDARD.encode(aws_lc_rs::hmac::sign(&key, &text).as_ref())
    );
    header("webhook-signature")
        .split(' ')
        .any(|s| s == expected)
}

impl Receiver {
    /// Listens on a free loopback port with a certificate of a CA of its
    /// own.
    pub async fn start() -> anyhow::Result<Receiver> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cordon-bench receiver CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?
            .signed_by(&key, &issuer)?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let secret_key: [u8; 32] = {
            let mut key = [0u8; 32];
            aws_lc_rs::rand::fill(&mut key).map_err(|_| anyhow::anyhow!("no randomness"))?;
            key
        };
        let secret = format!("whsec_{}", STANDARD.encode(secret_key));
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            let log = log.clone();
                            async move {
                                let (parts, body) = request.into_parts();
                                let body = body.collect().await.map(|b| b.to_bytes());
                                let received = now_nanos();
                                let status = match body {
                                    Ok(body) => {
                                        receive(&log, &secret_key, &parts.headers, &body, received)
                                    }
                                    Err(_) => 400,
                                };
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::new()))
                                        .expect("a response"),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(Receiver {
            url: format!("https://127.0.0.1:{port}/bench"),
            ca_pem: ca_cert.pem(),
            secret,
            seen,
            task,
        })
    }

    /// The body of `POST /api/webhooks` that subscribes this receiver.
    pub fn subscription(&self) -> serde_json::Value {
        serde_json::json!({
            "Url": self.url,
            "Events": ["machineAction.completed"],
            "Secret": self.secret,
            "CaCertificate": self.ca_pem,
            "Description": "cordon-bench fleet --webhook",
        })
    }

    /// How many distinct completions arrived so far.
    pub fn distinct(&self) -> usize {
        self.seen.lock().expect("lock").latencies.len()
    }

    /// Waits until `expected` distinct completions arrived, or `limit`.
    pub async fn wait_for(&self, expected: usize, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.distinct() < expected && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn report(&self) -> WebhookReport {
        let seen = self.seen.lock().expect("lock");
        let mut latencies = seen.latencies.clone();
        latencies.sort();
        WebhookReport {
            deliveries: seen.deliveries,
            distinct: latencies.len(),
            bad_signatures: seen.bad_signatures,
            p50_ms: crate::fleet::percentile_ms(&latencies, 0.5),
            p99_ms: crate::fleet::percentile_ms(&latencies, 0.99),
            max_ms: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        }
    }
}

/// Records one delivery; the status to answer.
fn receive(
    seen: &Mutex<Seen>,
    key: &[u8],
    headers: &http::HeaderMap,
    body: &[u8],
    received: i64,
) -> u16 {
    let mut seen = seen.lock().expect("lock");
    seen.deliveries += 1;
    if !signed(key, headers, body) {
        seen.bad_signatures += 1;
        return 401;
    }
    let completed_at = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|event| {
            event["data"]["lastUpdateDateTimeUtc"]
                .as_str()
                .and_then(proto::time::parse_utc)
        });
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if let Some(at) = completed_at
        && seen.ids.insert(id)
    {
        let latency = Duration::from_nanos((received - at).max(0) as u64);
        seen.latencies.push(latency);
    }
    204
}

/// Checks the answer of the `POST /api/webhooks` that subscribed the
/// receiver.
pub fn check_created(status: u16, body: &[u8]) -> anyhow::Result<()> {
    if status != 201 {
        anyhow::bail!(
            "POST /api/webhooks: HTTP {status} {}",
            String::from_utf8_lossy(body)
        );
    }
    serde_json::from_slice::<serde_json::Value>(body).context("the created webhook")?;
    Ok(())
}
