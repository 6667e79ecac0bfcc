//! Connection caps: in all and per source address, with separate shares
//! for agent sessions and for everyone else, so that neither can starve the
//! other.
//!
//! Agents and API clients connect to the same port, and which one a
//! connection is shows only once it has spoken. So every connection starts
//! as a *handshake* (TLS, then the first request, then for an agent the
//! proof of its key), in a share of its own that is bounded in number and
//! in time. The first request that is not an agent's session upgrade makes
//! it an *API* connection; a session whose agent proved its key makes it an
//! *agent* connection. An agent also announces itself in its TLS
//! ClientHello (ALPN [`proto::agent::SESSION_ALPN`]): its connection then
//! leaves the handshake share for the agents' at once, as an *announced
//! agent* that can only open a session; and when the handshake share is
//! full, a new connection is still taken, in the agents' share, if its
//! ClientHello announces an agent (any other is closed then). So clients
//! slow to make their first request cannot keep agents out.
//! Handshakes, announced agents and API connections count against their
//! source address (IPv6 addresses by their /64, which one host usually
//! holds); agent sessions don't, since a whole fleet may sit behind one NAT.
//!
//! The file descriptors these shares need at most are their sum plus a
//! small reserve; [`raise_file_limit`] raises the process's limit at start,
//! and [`Limits::fit`] shrinks the shares if the limit is still too low, so
//! that `accept` never runs out of descriptors.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Descriptors kept for everything but client connections (the database,
/// its journal, log files, outgoing connections to identity providers).
pub const RESERVED_FILES: u64 = 256;

/// The caps, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Agent sessions whose agent proved its key.
    pub agents: usize,
    /// Connections that made a request other than an agent session.
    pub api: usize,
    /// Connections not yet known as either.
    pub handshakes: usize,
    /// Handshakes and API connections from one source address (0: no cap).
    pub per_source: usize,
}

impl Default for Limits {
    /// Sized for a fleet of 100,000 agents with room to reconnect.
    fn default() -> Limits {
        Limits {
            agents: 120_000,
            api: 4_096,
            handshakes: 1_024,
            per_source: 64,
        }
    }
}

impl Limits {
    /// The shares shrunk, if need be, so that their sum and
    /// [`RESERVED_FILES`] fit within `files` descriptors: the handshake and
    /// API shares keep their size while they need at most half of the room
    /// (else they share that half in proportion), and the agents get the
    /// rest.
    pub fn fit(&self, files: u64) -> Limits {
        let budget = usize::try_from(files.saturating_sub(RESERVED_FILES))
            .unwrap_or(usize::MAX)
            .max(3);
        if self
            .agents
            .saturating_add(self.api)
            .saturating_add(self.handshakes)
            <= budget
        {
            return self.clone();
        }
        let (mut api, mut handshakes) = (self.api, self.handshakes);
        let half = budget / 2;
        if api + handshakes > half {
            let others = (api + handshakes) as u128;
            api = ((api as u128 * half as u128 / others) as usize).max(1);
            handshakes = ((handshakes as u128 * half as u128 / others) as usize).max(1);
        }
        Limits {
            agents: budget
                .saturating_sub(api + handshakes)
                .clamp(1, self.agents),
            api,
            handshakes,
            per_source: self.per_source,
        }
    }
}

/// What a connection is known to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Handshake,
    /// Announced an agent's session in its ClientHello, key not proven
    /// yet: in the agents' share, counted against its source address, and
    /// only a session may be opened on it.
    AnnouncedAgent,
    Api,
    Agent,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source address holds its cap of connections.
    PerSource,
    /// The handshake share is full.
    Handshakes,
    /// The API share is full.
    Api,
    /// The agent share is full.
    Agents,
    /// A request other than a session on a connection that announced an
    /// agent's session.
    AgentOnly,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PerSource => "the source address holds its cap of connections",
            Refusal::Handshakes => "too many connections are being set up",
            Refusal::Api => "the API connections are at their cap",
            Refusal::Agents => "the agent sessions are at their cap",
            Refusal::AgentOnly => "the connection announced an agent's session",
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub handshakes: usize,
    pub api: usize,
    pub agents: usize,
}

#[derive(Default)]
struct Inner {
    counts: Counts,
    per_source: HashMap<IpAddr, usize>,
}

/// The connections open now, by kind and source.
pub struct Connections {
    limits: Limits,
    inner: Mutex<Inner>,
    /// Refusals and accept errors come in floods: one line every ten
    /// seconds for each kind, with the count of those held back.
    pub log: LogLimiter,
}

/// One open connection's place; dropping it gives the place back. An agent
/// session holds it after its HTTP connection handed the socket over.
pub struct Slot {
    connections: Arc<Connections>,
    source: IpAddr,
    kind: Mutex<Kind>,
    opened: Instant,
}

/// The address a source is counted under: IPv4 as is (an IPv4-mapped IPv6
/// address as IPv4), IPv6 by its /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
        },
    }
}

impl Connections {
    pub fn new(limits: Limits) -> Arc<Connections> {
        Arc::new(Connections {
            limits,
            inner: Mutex::new(Inner::default()),
            log: LogLimiter::new(Duration::from_secs(10)),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts
    }

    /// Admits a new connection from `peer` as a handshake.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Refusal> {
        let source = source_key(peer);
        let mut inner = self.lock();
        if inner.counts.handshakes >= self.limits.handshakes {
            return Err(Refusal::Handshakes);
        }
        let from_source = inner.per_source.get(&source).copied().unwrap_or(0);
        if self.limits.per_source > 0 && from_source >= self.limits.per_source {
            return Err(Refusal::PerSource);
        }
        inner.counts.handshakes += 1;
        *inner.per_source.entry(source).or_insert(0) += 1;
        Ok(Slot {
            connections: self.clone(),
            source,
            kind: Mutex::new(Kind::Handshake),
            opened: Instant::now(),
        })
    }

    /// Admits a new connection from `peer` in the agents' share, when the
    /// handshake share is full: it is kept only if its ClientHello
    /// announces an agent's session.
    pub fn admit_announced(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Refusal> {
        let source = source_key(peer);
        let mut inner = self.lock();
        if inner.counts.agents >= self.limits.agents {
            return Err(Refusal::Handshakes);
        }
        let from_source = inner.per_source.get(&source).copied().unwrap_or(0);
        if self.limits.per_source > 0 && from_source >= self.limits.per_source {
            return Err(Refusal::PerSource);
        }
        inner.counts.agents += 1;
        *inner.per_source.entry(source).or_insert(0) += 1;
        Ok(Slot {
            connections: self.clone(),
            source,
            kind: Mutex::new(Kind::AnnouncedAgent),
            opened: Instant::now(),
        })
    }
}

impl Inner {
    fn release_source(&mut self, source: IpAddr) {
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }

    fn count(&mut self, kind: Kind) -> &mut usize {
        match kind {
            Kind::Handshake => &mut self.counts.handshakes,
            Kind::Api => &mut self.counts.api,
            Kind::AnnouncedAgent | Kind::Agent => &mut self.counts.agents,
        }
    }
}

impl Slot {
    fn kind_lock(&self) -> std::sync::MutexGuard<'_, Kind> {
        self.kind.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn kind(&self) -> Kind {
        *self.kind_lock()
    }

    /// How long the connection has been open.
    pub fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    /// Moves the connection into the share of `to`, if it has room: a
    /// handshake may become an API connection or an agent session, an API
    /// connection an agent session (an agent enrolls, then opens its
    /// session on the same connection), never back.
    fn become_(&self, to: Kind) -> Result<(), Refusal> {
        let mut kind = self.kind_lock();
        let from = *kind;
        if from == to || from == Kind::Agent || (from == Kind::Api && to == Kind::Handshake) {
            return Ok(());
        }
        if from == Kind::AnnouncedAgent && to != Kind::Agent {
            return Err(Refusal::AgentOnly);
        }
        let connections = &self.connections;
        let mut inner = connections.lock();
        let (count, cap, refusal) = match to {
            Kind::Api => (inner.counts.api, connections.limits.api, Refusal::Api),
            // An announced agent holds its place in the agents' share already.
            Kind::Agent if from == Kind::AnnouncedAgent => (0, 1, Refusal::Agents),
            Kind::AnnouncedAgent if from != Kind::Handshake => return Ok(()),
            Kind::AnnouncedAgent | Kind::Agent => (
                inner.counts.agents,
                connections.limits.agents,
                Refusal::Agents,
            ),
            Kind::Handshake => return Ok(()),
        };
        if count >= cap {
            return Err(refusal);
        }
        *inner.count(from) -= 1;
        *inner.count(to) += 1;
        if to == Kind::Agent {
            inner.release_source(self.source);
        }
        *kind = to;
        Ok(())
    }

    /// Makes a handshake an API connection.
    pub fn become_api(&self) -> Result<(), Refusal> {
        self.become_(Kind::Api)
    }

    /// Makes the connection an agent session (its agent proved its key).
    pub fn become_agent(&self) -> Result<(), Refusal> {
        self.become_(Kind::Agent)
    }

    /// Moves a handshake whose ClientHello announced an agent's session to
    /// the agents' share; when that is full it stays a handshake (and its
    /// session is refused with the reason once the agent proved its key).
    pub fn announce_agent(&self) -> Result<(), Refusal> {
        self.become_(Kind::AnnouncedAgent)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let kind = self.kind();
        let mut inner = self.connections.lock();
        *inner.count(kind) -= 1;
        if kind != Kind::Agent {
            inner.release_source(self.source);
        }
    }
}

/// The [`Slot`] of the connection a request arrived on (a request
/// extension).
#[derive(Clone)]
pub struct ConnSlot(pub Arc<Slot>);

/// Left on a request whose connection could not become an API connection
/// (a request extension), for [`classify`] to answer.
#[derive(Debug, Clone, Copy)]
pub struct Refused(pub Refusal);

/// Seconds a client refused for a full share is asked to wait.
const RETRY_AFTER_FULL: u64 = 5;

/// Called for each request as soon as its head is read, before its body:
/// the first request on a connection that is not an agent's session
/// upgrade makes it an API connection; when the API share is full, the
/// request is marked [`Refused`].
pub fn on_request_head(slot: &Slot, request: &mut http::Request<impl Sized>) {
    if request.uri().path() != proto::agent::SESSION_PATH
        && let Err(refusal) = slot.become_api()
    {
        request.extensions_mut().insert(Refused(refusal));
    }
}

/// Middleware: a request marked [`Refused`] is answered 503
/// (`ServiceUnavailable`, or the OAuth `temporarily_unavailable` on the
/// token endpoints) with `Retry-After`, and its connection closed.
pub async fn classify(request: Request, next: Next) -> Response {
    let Some(Refused(refusal)) = request.extensions().get::<Refused>().copied() else {
        return next.run(request).await;
    };
    if refusal == Refusal::AgentOnly {
        let mut response = crate::error::ApiError::bad_request(format!(
            "This connection announced an agent's session (ALPN {}); only a session \
             can be opened on it, at {}.",
            String::from_utf8_lossy(proto::agent::SESSION_ALPN),
            proto::agent::SESSION_PATH
        ))
        .into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let message = format!(
        "The server is at its cap of connections ({}); try again later.",
        refusal.as_str()
    );
    let mut response = if request.uri().path().contains("/oauth2/") {
        crate::error::oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            message,
        )
        .into_response()
    } else {
        crate::error::ApiError {
            retry_after: Some(RETRY_AFTER_FULL),
            ..crate::error::ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                message,
            )
        }
        .into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_FULL));
    response
}

/// Raises the soft limit on open files to the hard limit; returns the
/// limit now in force.
pub fn raise_file_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            tracing::warn!(error = %std::io::Error::last_os_error(), "could not raise the open file limit");
        }
    }
    Ok(limit.rlim_cur)
}

/// Lets a repeated log line through once per interval, and says how many
/// repeats were held back since: a flood of identical errors (such as
/// `accept` failing) costs one line every few seconds.
pub struct LogLimiter {
    interval: Duration,
    seen: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> LogLimiter {
        LogLimiter {
            interval,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(repeats held back since the last line)` when a line about
    /// `what` may be logged now; `None` when it is held back.
    pub fn allow(&self, what: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(what) {
            Some((last, held)) if now.duration_since(*last) < self.interval => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                let suppressed = *held;
                *last = now;
                *held = 0;
                Some(suppressed)
            }
            None => {
                seen.insert(what, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn each_share_and_each_source_has_its_cap() {
        let connections = Connections::new(Limits {
            agents: 2,
            api: 2,
            handshakes: 3,
            per_source: 2,
        });
        let a1 = connections.admit(ip("10.0.0.1")).unwrap();
        let a2 = connections.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            connections.admit(ip("10.0.0.1")).err(),
            Some(Refusal::PerSource)
        );
        let b1 = connections.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(
            connections.admit(ip("10.0.0.3")).err(),
            Some(Refusal::Handshakes)
        );
        a1.become_api().unwrap();
        a2.become_api().unwrap();
        // The API share is full, the agent share is not.
        assert_eq!(b1.become_api(), Err(Refusal::Api));
        b1.become_agent().unwrap();
        assert_eq!(
            connections.counts(),
            Counts {
                handshakes: 0,
                api: 2,
                agents: 1
            }
        );
        // An agent session no longer counts against its address.
        let b2 = connections.admit(ip("10.0.0.2")).unwrap();
        let b3 = connections.admit(ip("10.0.0.2")).unwrap();
        b2.become_agent().unwrap();
        assert_eq!(b3.become_agent(), Err(Refusal::Agents));
        drop((a1, b1));
        assert_eq!(
            connections.counts(),
            Counts {
                handshakes: 1,
                api: 1,
                agents: 1
            }
        );
        drop((a2, b2, b3));
        assert_eq!(connections.counts(), Counts::default());
        assert!(connections.lock().per_source.is_empty());
    }

    #[test]
    fn announced_agents_take_the_agents_share_and_open_only_sessions() {
        let connections = Connections::new(Limits {
            agents: 2,
            api: 1,
            handshakes: 1,
            per_source: 0,
        });
        let handshake = connections.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            connections.admit(ip("10.0.0.2")).err(),
            Some(Refusal::Handshakes)
        );
        // A full handshake share still takes an agent, in the agents' share…
        let announced = connections.admit_announced(ip("10.0.0.2")).unwrap();
        assert_eq!(announced.kind(), Kind::AnnouncedAgent);
        // …and a handshake that announces an agent leaves it.
        handshake.announce_agent().unwrap();
        assert_eq!(
            connections.counts(),
            Counts {
                handshakes: 0,
                api: 0,
                agents: 2
            }
        );
        assert!(connections.admit_announced(ip("10.0.0.3")).is_err());
        assert_eq!(announced.become_api(), Err(Refusal::AgentOnly));
        // Proven, it keeps its place and no longer counts against its address.
        announced.become_agent().unwrap();
        assert_eq!(connections.counts().agents, 2);
        assert_eq!(connections.lock().per_source.len(), 1);
        drop((handshake, announced));
        assert_eq!(connections.counts(), Counts::default());
        assert!(connections.lock().per_source.is_empty());
    }

    #[test]
    fn ipv6_sources_count_by_their_64() {
        assert_eq!(source_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(source_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        let connections = Connections::new(Limits {
            per_source: 1,
            ..Limits::default()
        });
        let _first = connections.admit(ip("2001:db8::1")).unwrap();
        assert!(connections.admit(ip("2001:db8::2")).is_err());
        assert!(connections.admit(ip("2001:db8:0:1::1")).is_ok());
    }

    #[test]
    fn shares_shrink_to_fit_the_file_limit() {
        let limits = Limits::default();
        assert_eq!(limits.fit(1 << 20), limits);
        // The agents give way first…
        let fitted = limits.fit(20_000);
        assert_eq!((fitted.api, fitted.handshakes), (4_096, 1_024));
        assert_eq!(
            fitted.agents + fitted.api + fitted.handshakes,
            20_000 - RESERVED_FILES as usize
        );
        // …down to half of the room.
        let fitted = limits.fit(1_024);
        let sum = fitted.agents + fitted.api + fitted.handshakes;
        assert!(sum <= 1_024 - RESERVED_FILES as usize, "{fitted:?}");
        assert!(fitted.agents >= sum / 2, "{fitted:?}");
        assert!(fitted.api > fitted.handshakes, "{fitted:?}");
        let tiny = limits.fit(0);
        assert!(tiny.agents >= 1 && tiny.api >= 1 && tiny.handshakes >= 1);
    }

    #[test]
    fn a_repeated_line_is_logged_once_per_interval_with_a_count() {
        let limiter = LogLimiter::new(Duration::from_millis(200));
        assert_eq!(limiter.allow("accept"), Some(0));
        for _ in 0..20 {
            assert_eq!(limiter.allow("accept"), None);
        }
        assert_eq!(limiter.allow("other"), Some(0));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(limiter.allow("accept"), Some(20));
    }
}
