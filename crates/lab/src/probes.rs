//! Probes run from inside a host's namespace, each bounded by a timeout.
//!
//! They answer "did the exchange succeed?": a refused, reset, rejected or
//! timed-out exchange is `Ok(false)` (or `Ok(None)`); `Err` means the lab
//! itself failed (e.g. the namespace could not be entered).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{Host, Lab};

/// How long [`open_tcp`] waits for the connection.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// Distinct payloads, so a late echo of an earlier probe never counts.
static PROBE_SEQ: AtomicU64 = AtomicU64::new(0);

fn payload(kind: &str) -> Vec<u8> {
    let n = PROBE_SEQ.fetch_add(1, Ordering::Relaxed);
    format!("cordon-lab {kind} {} {n}\n", std::process::id()).into_bytes()
}

/// Time left until `deadline`, at least 1 ms (a zero socket timeout means
/// "block forever" or is refused).
fn left(deadline: Instant) -> Option<Duration> {
    let now = Instant::now();
    (now < deadline).then(|| (deadline - now).max(Duration::from_millis(1)))
}

/// Reads exactly `buf.len()` bytes before `deadline`.
fn read_exact_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let Some(wait) = left(deadline) else {
            return Err(io::ErrorKind::TimedOut.into());
        };
        stream.set_read_timeout(Some(wait))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `data` and reads the same bytes back before `deadline`.
fn echo_exchange(stream: &mut TcpStream, data: &[u8], deadline: Instant) -> io::Result<bool> {
    let wait = left(deadline).ok_or(io::ErrorKind::TimedOut)?;
    stream.set_write_timeout(Some(wait))?;
    stream.write_all(data)?;
    let mut back = vec![0u8; data.len()];
    read_exact_by(stream, &mut back, deadline)?;
    Ok(back == data)
}

/// TCP connect to `to` and echo of a few bytes, from inside `from`.
pub fn tcp_echo(lab: &Lab, from: &Host, to: SocketAddr, timeout: Duration) -> anyhow::Result<bool> {
    lab.in_host(from, move || {
        let deadline = Instant::now() + timeout;
        let Ok(mut stream) = TcpStream::connect_timeout(&to, timeout.max(Duration::from_millis(1)))
        else {
            return false;
        };
        echo_exchange(&mut stream, &payload("tcp"), deadline).unwrap_or(false)
    })
}

/// One UDP datagram to `to` and its echo, from inside `from`.
pub fn udp_echo(lab: &Lab, from: &Host, to: SocketAddr, timeout: Duration) -> anyhow::Result<bool> {
    lab.in_host(from, move || -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        let local: SocketAddr = match to {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local)?;
        if socket.connect(to).is_err() {
            return Ok(false);
        }
        let data = payload("udp");
        if socket.send(&data).is_err() {
            return Ok(false);
        }
        let mut buf = [0u8; 2048];
        while let Some(wait) = left(deadline) {
            socket.set_read_timeout(Some(wait))?;
            match socket.recv(&mut buf) {
                Ok(n) if buf[..n] == data[..] => return Ok(true),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Timed out, refused (ICMP port unreachable), rejected.
                Err(_) => return Ok(false),
            }
        }
        Ok(false)
    })?
    .context("UDP probe socket")
}

/// ICMP (or ICMPv6) echo request to `to` and its reply, from inside `from`.
///
/// Uses an ICMP datagram ("ping") socket, which the lab allows in every
/// host (`net.ipv4.ping_group_range`), so no `ping` binary is needed.
pub fn icmp_echo(lab: &Lab, from: &Host, to: IpAddr, timeout: Duration) -> anyhow::Result<bool> {
    lab.in_host(from, move || ping(to, timeout))?
        .context("ICMP datagram socket")
}

fn ping(to: IpAddr, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    let (domain, protocol, request, reply) = match to {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8, 0u8),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8, 129u8),
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, protocol) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns. A ping socket is
    // a datagram socket, so UdpSocket's sendto/recv calls apply to it
    // unchanged; the kernel fills in the identifier and the checksum.
    let socket = UdpSocket::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let seq = (PROBE_SEQ.fetch_add(1, Ordering::Relaxed) & 0xffff) as u16;
    let mut packet = vec![request, 0, 0, 0, 0, 0];
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(b"cordon-lab ping");
    if socket.send_to(&packet, SocketAddr::new(to, 0)).is_err() {
        return Ok(false);
    }
    let mut buf = [0u8; 2048];
    while let Some(wait) = left(deadline) {
        socket.set_read_timeout(Some(wait))?;
        match socket.recv(&mut buf) {
            Ok(n) if n >= 8 && buf[0] == reply && buf[6..8] == seq.to_be_bytes() => {
                return Ok(true);
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(false),
        }
    }
    Ok(false)
}

/// HTTP/1.0 `GET /` to `to` from inside `from`; the body of a `200`
/// answer, or `None` if there was no such answer in time.
pub fn http_get(
    lab: &Lab,
    from: &Host,
    to: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Option<String>> {
    lab.in_host(from, move || {
        let deadline = Instant::now() + timeout;
        let mut stream =
            TcpStream::connect_timeout(&to, timeout.max(Duration::from_millis(1))).ok()?;
        let request = format!("GET / HTTP/1.0\r\nHost: {to}\r\nConnection: close\r\n\r\n");
        stream.set_write_timeout(left(deadline)).ok()?;
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            stream.set_read_timeout(Some(left(deadline)?)).ok()?;
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.lines().next()?;
        let mut parts = status.split_whitespace();
        (parts.next()?.starts_with("HTTP/1.") && parts.next()? == "200").then(|| body.to_string())
    })
}

/// Opens a TCP connection from inside `from` to an echo server at `to` and
/// keeps it open (waits up to 2 s for it). Fails if it cannot connect.
pub fn open_tcp(lab: &Lab, from: &Host, to: SocketAddr) -> anyhow::Result<OpenConnection> {
    let stream = lab
        .in_host(from, move || TcpStream::connect_timeout(&to, OPEN_TIMEOUT))?
        .with_context(|| format!("connecting from {} to {to}", from.name))?;
    Ok(OpenConnection {
        stream,
        to,
        broken: false,
    })
}

/// A TCP connection to an echo server opened by [`open_tcp`], used to prove
/// that a connection opened before isolation is cut.
#[derive(Debug)]
pub struct OpenConnection {
    stream: TcpStream,
    to: SocketAddr,
    broken: bool,
}

impl OpenConnection {
    /// Writes a few bytes and checks they are echoed back within `timeout`.
    /// False if reset, closed or timed out; once false, always false (the
    /// stream is out of step with the echo server from then on).
    pub fn alive(&mut self, timeout: Duration) -> bool {
        if self.broken {
            return false;
        }
        let deadline = Instant::now() + timeout;
        let ok = echo_exchange(&mut self.stream, &payload("open"), deadline).unwrap_or(false);
        self.broken = !ok;
        ok
    }

    /// The echo server's address.
    pub fn peer(&self) -> SocketAddr {
        self.to
    }

    /// The local address of the connection (inside the host).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }
}
