//! Responders for the `ext` host: TCP echo, UDP echo and a minimal HTTP
//! server, each on `0.0.0.0` and `[::]` (the IPv6 sockets are IPv6-only), all
//! served by one thread that joined the host's namespace.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Body of every HTTP answer.
pub const HTTP_BODY: &str = "ext";
/// How often connection threads look at the stop flag (they are also
/// woken at once by a shutdown of their socket).
const TICK: Duration = Duration::from_millis(50);

/// Running responders; dropping this stops them (so does dropping the lab).
#[derive(Debug)]
pub struct Responders {
    shared: Arc<Shared>,
    /// TCP echo port.
    pub tcp_port: u16,
    /// UDP echo port.
    pub udp_port: u16,
    /// HTTP port.
    pub http_port: u16,
}

impl Responders {
    pub(crate) fn new(shared: Arc<Shared>, tcp_port: u16, udp_port: u16, http_port: u16) -> Self {
        Responders {
            shared,
            tcp_port,
            udp_port,
            http_port,
        }
    }

    /// Stops the responders now and waits until their sockets are closed.
    pub fn stop(self) {}
}

impl Drop for Responders {
    fn drop(&mut self) {
        self.shared.stop();
    }
}

/// What the handle and the lab share: whoever goes first stops the thread.
#[derive(Debug)]
pub(crate) struct Shared {
    stop: AtomicBool,
    /// Writing a byte here wakes the responder thread's poll.
    wake: UnixStream,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Shared {
    /// Sets the stop flag and waits for the responder thread (which waits
    /// for its connection threads).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = (&self.wake).write(&[1]);
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

/// The six sockets, in poll order.
struct Sockets {
    tcp: [TcpListener; 2],
    udp: [UdpSocket; 2],
    http: [TcpListener; 2],
}

/// Starts the responder thread in the namespace at `netns` and waits until
/// its sockets are bound.
pub(crate) fn start(
    netns: &Path,
    tcp_port: u16,
    udp_port: u16,
    http_port: u16,
) -> anyhow::Result<Arc<Shared>> {
    let file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let (wake, woken) = UnixStream::pair().context("creating the wake-up socket pair")?;
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        wake,
        thread: Mutex::new(None),
    });
    let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
    let thread_shared = shared.clone();
    let handle = thread::Builder::new()
        .name("lab-responders".into())
        .spawn(move || {
            let bound =
                crate::enter_netns(&file).and_then(|()| bind_all(tcp_port, udp_port, http_port));
            drop(file);
            match bound {
                Ok(sockets) => {
                    let _ = ready_tx.send(Ok(()));
                    serve(sockets, &woken, &thread_shared);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .context("spawning the responder thread")?;
    *shared.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    let ready = ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("responders did not start within 5 s");
    match ready {
        Ok(Ok(())) => Ok(shared),
        Ok(Err(e)) => {
            shared.stop();
            Err(e).context("binding the responder sockets")
        }
        Err(e) => {
            shared.stop();
            Err(e)
        }
    }
}

fn bind_all(tcp_port: u16, udp_port: u16, http_port: u16) -> io::Result<Sockets> {
    let v4 = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let v6 = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let listener = |addr| -> io::Result<TcpListener> {
        let l = TcpListener::from(bind(addr, libc::SOCK_STREAM)?);
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let udp = |addr| -> io::Result<UdpSocket> {
        let s = UdpSocket::from(bind(addr, libc::SOCK_DGRAM)?);
        s.set_nonblocking(true)?;
        Ok(s)
    };
    Ok(Sockets {
        tcp: [listener(v4(tcp_port))?, listener(v6(tcp_port))?],
        udp: [udp(v4(udp_port))?, udp(v6(udp_port))?],
        http: [listener(v4(http_port))?, listener(v6(http_port))?],
    })
}

/// A bound socket (listening, for streams); IPv6 sockets are IPv6-only so
/// that `0.0.0.0` and `[::]` can both be bound to one port.
fn bind(addr: SocketAddr, kind: libc::c_int) -> io::Result<OwnedFd> {
    let domain = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_flag(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)?;
    if domain == libc::AF_INET6 {
        set_flag(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?;
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` holds a valid socket address of `len` bytes.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const storage).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("bind {addr}: {e}")));
    }
    if kind == libc::SOCK_STREAM {
        // SAFETY: listen on a bound stream socket we own.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

fn set_flag(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the option value is a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const one).cast::<libc::c_void>(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `addr` as a C socket address.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data for which all zeros is valid.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // socket address.
            let sin = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The responder loop: polls the six sockets until the stop flag is set
/// (`woken` becomes readable then), then closes every connection and waits
/// for the threads serving them.
fn serve(sockets: Sockets, woken: &UnixStream, shared: &Arc<Shared>) {
    let fds = [
        sockets.tcp[0].as_raw_fd(),
        sockets.tcp[1].as_raw_fd(),
        sockets.udp[0].as_raw_fd(),
        sockets.udp[1].as_raw_fd(),
        sockets.http[0].as_raw_fd(),
        sockets.http[1].as_raw_fd(),
        woken.as_raw_fd(),
    ];
    let mut pollfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let mut workers: Vec<Worker> = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        // SAFETY: `pollfds` is a valid array of `pollfds.len()` entries.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, -1) };
        if n <= 0 {
            continue;
        }
        for (i, pfd) in pollfds.iter_mut().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            pfd.revents = 0;
            match i {
                0 | 1 => accept_all(&sockets.tcp[i], shared, &mut workers, echo_tcp),
                2 | 3 => echo_udp(&sockets.udp[i - 2]),
                4 | 5 => accept_all(&sockets.http[i - 4], shared, &mut workers, answer_http),
                _ => {} // woken: the loop condition sees the stop flag
            }
        }
        workers.retain(|w| !w.thread.is_finished());
    }
    drop(sockets);
    for worker in &workers {
        let _ = worker.stream.shutdown(Shutdown::Both);
    }
    for worker in workers {
        let _ = worker.thread.join();
    }
}

/// A thread serving one connection, and a handle on its socket to shut it
/// down.
struct Worker {
    thread: JoinHandle<()>,
    stream: TcpStream,
}

fn accept_all(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    workers: &mut Vec<Worker>,
    handler: fn(TcpStream, &AtomicBool),
) {
    while let Ok((stream, _)) = listener.accept() {
        if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(TICK)).is_err() {
            continue;
        }
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let shared = shared.clone();
        let spawned = thread::Builder::new()
            .name("lab-responder-conn".into())
            .spawn(move || handler(stream, &shared.stop));
        if let Ok(thread) = spawned {
            workers.push(Worker {
                thread,
                stream: handle,
            });
        }
    }
}

fn echo_udp(socket: &UdpSocket) {
    let mut buf = [0u8; 65536];
    while let Ok((n, peer)) = socket.recv_from(&mut buf) {
        let _ = socket.send_to(&buf[..n], peer);
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Echoes until the peer closes, an error, or stop.
fn echo_tcp(mut stream: TcpStream, stop: &AtomicBool) {
    let mut buf = [0u8; 16384];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// Reads a request head (up to 16 KiB, 5 s) and answers `200 OK`, body
/// `ext`, whatever was asked.
fn answer_http(mut stream: TcpStream, stop: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if stop.load(Ordering::SeqCst) || Instant::now() >= deadline || head.len() > 16384 {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{HTTP_BODY}",
        HTTP_BODY.len()
    );
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
}
