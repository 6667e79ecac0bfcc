//! A small HTTPS/1.1 client on hyper, trusting only the CA it is given.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A rustls client configuration that trusts only the CA certificates in `ca_pem`.
pub fn tls_config(ca_pem: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_pem)
        .with_context(|| format!("cannot read the CA file {}", ca_pem.display()))?;
    for cert in certs {
        roots
            .add(cert.with_context(|| format!("bad certificate in {}", ca_pem.display()))?)
            .with_context(|| format!("unusable CA certificate in {}", ca_pem.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no certificate", ca_pem.display());
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `host:port` and the TLS server name of an `https://` URL.
pub fn parse_server(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| anyhow!("the server URL must start with https://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            (host, port.parse().context("bad port in the server URL")?)
        }
        _ => (authority, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        bail!("the server URL has no host");
    }
    Ok((host.to_owned(), port))
}

/// Opens a TLS connection to `host:port`.
pub async fn connect_tls(
    config: Arc<rustls::ClientConfig>,
    host: &str,
    port: u16,
) -> anyhow::Result<TlsStream<TcpStream>> {
    connect_tls_from(config, host, port, None).await
}

/// Opens a TLS connection to `host:port` from the local address `local`
/// (any port), or from the address the system picks when `None`. The fleet
/// benchmark spreads its simulated agents over many loopback addresses so
/// that more sessions fit than one address has ports.
pub async fn connect_tls_from(
    config: Arc<rustls::ClientConfig>,
    host: &str,
    port: u16,
    local: Option<std::net::IpAddr>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = match local {
        None => TcpStream::connect((host, port)).await,
        Some(local) => connect_from(local, host, port).await,
    }
    .with_context(|| format!("cannot connect to {host}:{port}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(host.to_owned()).context("bad server name")?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {host}:{port} failed"))
}

/// Connects to the first address of `host:port` of the same family as
/// `local`, bound to `local` first.
async fn connect_from(
    local: std::net::IpAddr,
    host: &str,
    port: u16,
) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        if addr.is_ipv4() != local.is_ipv4() {
            continue;
        }
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(std::net::SocketAddr::new(local, 0))?;
        match socket.connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{host} has no address of the family of {local}"),
        )
    }))
}

/// A response: status, headers and the whole body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "response is not JSON ({}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A keep-alive HTTPS client for one server.
pub struct HttpsClient {
    config: Arc<rustls::ClientConfig>,
    host: String,
    port: u16,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpsClient {
    pub fn new(config: Arc<rustls::ClientConfig>, server_url: &str) -> anyhow::Result<HttpsClient> {
        let (host, port) = parse_server(server_url)?;
        Ok(HttpsClient {
            config,
            host,
            port,
            sender: None,
        })
    }

    async fn sender(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        let usable = self.sender.as_ref().is_some_and(|s| !s.is_closed());
        if !usable {
            let tls = connect_tls(self.config.clone(), &self.host, self.port).await?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("sender was just set");
        sender.ready().await?;
        Ok(sender)
    }

    /// Sends one request; `headers` are added as given.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Reply> {
        let host = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(body.into()))?;
        let sender = self.sender().await?;
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(e) => {
                self.sender = None;
                return Err(e.into());
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}
