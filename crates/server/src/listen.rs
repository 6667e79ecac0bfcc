//! Where `cordon serve` listens, and the names clients reach it by.
//!
//! `--listen` takes `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`; a host name is
//! resolved and every address it names is served. The generated server
//! certificate must carry every name a client may use, and the default
//! public URL must be one a client can use: on an unspecified address
//! (`0.0.0.0`, `::`) that is the machine's host name and every local address,
//! not `localhost`.

use std::fmt;
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::str::FromStr;

use anyhow::{Context, bail};
use rustls::pki_types::ServerName;

/// `--listen` as typed: a host (an IP literal or a name) and a port.
/// Parsing does no I/O; [`ListenArg::resolve`] looks the name up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenArg {
    pub host: Host,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    /// A DNS name, lower case.
    Name(String),
}

impl FromStr for ListenArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let usage = || {
            format!(
                "'{text}' is not an address to listen on: use HOST:PORT, such as \
                 0.0.0.0:8443, [::]:8443, localhost:8443 or cordon.example.com:8443"
            )
        };
        let (host, port) = text.trim().rsplit_once(':').ok_or_else(usage)?;
        let port: u16 = port.parse().map_err(|_| {
            format!("'{port}' in '{text}' is not a port (0-65535; 0 picks a free one)")
        })?;
        let host = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Host::Ip(IpAddr::V6(inner.parse().map_err(|_| usage())?))
        } else if host.contains(':') {
            // Without brackets, an IPv6 address's last group reads as the port.
            return Err(format!(
                "'{text}': put an IPv6 address in brackets, such as [::1]:8443 or [::]:8443"
            ));
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            Host::Ip(ip)
        } else if valid_dns_name(host) {
            Host::Name(host.to_ascii_lowercase())
        } else {
            return Err(usage());
        };
        Ok(ListenArg { host, port })
    }
}

impl fmt::Display for ListenArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

impl ListenArg {
    /// The host name given, if a name (not an address) was given.
    pub fn name(&self) -> Option<&str> {
        match &self.host {
            Host::Name(name) => Some(name),
            Host::Ip(_) => None,
        }
    }

    /// Every address to serve: the address given, or each one the name
    /// resolves to (in the resolver's order, without duplicates).
    pub fn resolve(&self) -> anyhow::Result<Vec<SocketAddr>> {
        match &self.host {
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, self.port)]),
            Host::Name(name) => {
                let mut addrs: Vec<SocketAddr> = Vec::new();
                for addr in (name.as_str(), self.port)
                    .to_socket_addrs()
                    .with_context(|| format!("cannot resolve the host name {name} of --listen"))?
                {
                    if !addrs.contains(&addr) {
                        addrs.push(addr);
                    }
                }
                if addrs.is_empty() {
                    bail!("the host name {name} of --listen resolves to no address");
                }
                Ok(addrs)
            }
        }
    }

    /// Resolves and opens a listener on every address. An address that
    /// can't be bound is skipped with a warning when another one works (such
    /// as `::1` for `localhost` on a host without IPv6); when none works, the
    /// error names each address and why.
    pub fn bind(&self) -> anyhow::Result<Vec<TcpListener>> {
        let addrs = self.resolve()?;
        let mut listeners = Vec::new();
        let mut failures = Vec::new();
        for addr in &addrs {
            // Port 0 with several addresses: the others take the port the first got.
            let addr = match listeners.first() {
                Some(first) if addr.port() == 0 => {
                    SocketAddr::new(addr.ip(), TcpListener::local_addr(first)?.port())
                }
                _ => *addr,
            };
            match TcpListener::bind(addr) {
                Ok(listener) => listeners.push(listener),
                Err(e) => failures.push(format!("{addr}: {e}")),
            }
        }
        if listeners.is_empty() {
            let hint = if self.name().is_some() {
                "; to serve under a name that is not this machine's, listen on 0.0.0.0 \
                 and pass --public-url"
            } else {
                ""
            };
            bail!("cannot listen on {self} ({}){hint}", failures.join("; "));
        }
        for failure in failures {
            tracing::warn!(listen = %self, "not listening on {failure}");
        }
        Ok(listeners)
    }
}

/// Whether `name` is a DNS name a certificate can carry.
pub fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.parse::<IpAddr>().is_err()
        && matches!(ServerName::try_from(name), Ok(ServerName::DnsName(_)))
}

/// This machine's host name, if it is a usable DNS name.
pub fn host_name() -> Option<String> {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at
    // most that many bytes.
    let status = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if status != 0 {
        return None;
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    let name = std::str::from_utf8(&buffer[..end])
        .ok()?
        .trim()
        .to_ascii_lowercase();
    valid_dns_name(&name).then_some(name)
}

/// The addresses of this machine's interfaces that a client can name: IPv4
/// only for `0.0.0.0`, both families for `::` (which also accepts IPv4 on
/// Linux); IPv6 link-local addresses are left out (they need a zone).
pub fn local_addresses(unspecified: IpAddr) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for interface in if_addrs::get_if_addrs().unwrap_or_default() {
        let ip = interface.ip();
        let usable = match ip {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => unspecified.is_ipv6() && !v6.is_unicast_link_local(),
        };
        if usable && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// What a server listening on `listeners` (the first decides) is called.
pub struct Served {
    /// The host of the default public URL.
    pub url_host: String,
    /// Every name and address the generated certificate carries, the URL's
    /// host first.
    pub names: Vec<String>,
}

/// The default URL host and the certificate's names, for listeners on
/// `ips`, `--listen`'s host name if one was given, and `extra` names.
pub fn served(listen_name: Option<&str>, ips: &[IpAddr], extra: &[String]) -> Served {
    let host_name = host_name();
    let url_host = match (listen_name, ips.first()) {
        (Some(name), _) => name.to_owned(),
        (None, Some(ip)) if ip.is_unspecified() => {
            host_name.clone().unwrap_or_else(|| "localhost".into())
        }
        (None, Some(IpAddr::V6(ip))) => format!("[{ip}]"),
        (None, Some(ip)) => ip.to_string(),
        (None, None) => "localhost".into(),
    };
    let mut names = vec![url_host.trim_matches(|c| c == '[' || c == ']').to_owned()];
    names.push("localhost".into());
    for ip in ips {
        if ip.is_unspecified() {
            names.extend(host_name.iter().cloned());
            names.extend(local_addresses(*ip).iter().map(IpAddr::to_string));
            names.push(if ip.is_ipv6() { "::1" } else { "127.0.0.1" }.into());
        } else {
            names.push(ip.to_string());
        }
    }
    names.extend(extra.iter().cloned());
    let mut unique: Vec<String> = Vec::new();
    for name in names {
        if !unique.contains(&name) {
            unique.push(name);
        }
    }
    Served {
        url_host,
        names: unique,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ListenArg, String> {
        text.parse()
    }

    #[test]
    fn listen_takes_addresses_and_host_names() {
        let cases = [
            ("127.0.0.1:8443", "127.0.0.1:8443", None),
            ("0.0.0.0:8443", "0.0.0.0:8443", None),
            ("[::]:8443", "[::]:8443", None),
            ("[::1]:0", "[::1]:0", None),
            ("localhost:8443", "localhost:8443", Some("localhost")),
            (
                "Cordon.Example.com:443",
                "cordon.example.com:443",
                Some("cordon.example.com"),
            ),
        ];
        for (text, shown, name) in cases {
            let arg = parse(text).unwrap();
            assert_eq!(arg.to_string(), shown);
            assert_eq!(arg.name(), name);
        }
    }

    #[test]
    fn listen_refuses_what_is_not_host_and_port() {
        for text in [
            "8443",
            "localhost",
            "localhost:",
            "localhost:http",
            "localhost:70000",
            "::1:8443",
            "[::1:8443",
            "[not-v6]:8443",
            "bad host:8443",
            ":8443",
            "",
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains(text) || text.is_empty(), "{text}: {error}");
        }
    }

    #[test]
    fn localhost_resolves_to_loopback() {
        let addrs = parse("localhost:8443").unwrap().resolve().unwrap();
        assert!(!addrs.is_empty());
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 8443)
        );
    }

    #[test]
    fn an_unspecified_address_is_served_under_the_host_name_and_every_local_address() {
        let served = served(None, &["0.0.0.0".parse().unwrap()], &[]);
        let host = host_name().unwrap_or_else(|| "localhost".into());
        assert_eq!(served.url_host, host);
        assert_eq!(served.names[0], host);
        for ip in local_addresses("0.0.0.0".parse().unwrap()) {
            assert!(ip.is_ipv4());
            assert!(served.names.contains(&ip.to_string()), "{:?}", served.names);
        }
        assert!(served.names.contains(&"127.0.0.1".to_owned()));
        assert!(served.names.contains(&"localhost".to_owned()));

        let named = served_with_name();
        assert_eq!(named.url_host, "cordon.example.com");
        assert_eq!(named.names[..2], ["cordon.example.com", "localhost"]);
    }

    fn served_with_name() -> Served {
        served(
            Some("cordon.example.com"),
            &["127.0.0.1".parse().unwrap()],
            &["extra.example.com".into()],
        )
    }

    #[test]
    fn a_specific_address_is_served_under_itself() {
        let v6 = served(None, &["::1".parse().unwrap()], &[]);
        assert_eq!(v6.url_host, "[::1]");
        assert_eq!(v6.names, ["::1", "localhost"]);
        let named = served_with_name();
        assert!(named.names.contains(&"extra.example.com".to_owned()));
        assert!(named.names.contains(&"127.0.0.1".to_owned()));
    }
}
