//! The network lab: Cordon's enforcement is tested for real, in the kernel,
//! inside network namespaces that the test creates and removes.
//!
//! A [`Lab`] is a set of network namespaces owned by one test:
//! - a bridge namespace `cdn-<pid>-<n>-br` holding one bridge, `br0`;
//! - one namespace per host, `cdn-<pid>-<n>-<short>` (`srv`, `m1`, `ext`, ...),
//!   each with `lo` up and an `eth0` whose veth peer is a port of `br0`.
//!
//! Safety rules, which this crate keeps by construction:
//! - nothing of the lab is created in, attached to or changed in the root
//!   network namespace: every `ip` command names its namespace (`ip -n`),
//!   veth pairs are created inside a host namespace with their peer placed
//!   directly in the bridge namespace, and in-process work happens on
//!   short-lived threads that joined a lab namespace with `setns`;
//! - addresses come from 198.18.0.0/15 (`198.18.<lab>.<index>/24`) and the ULA
//!   prefix (`fd00:<lab>::<index>/64`) only, and hosts have on-link routes
//!   only (no default route), so lab traffic cannot leave the lab.
//!
//! Commands run inside a host with `nsenter --net=/run/netns/NAME` (or an
//! equivalent `setns` before `exec`), never `ip netns exec`, which mounts a
//! fresh `/sys` and hides the cgroup hierarchy.
//!
//! Dropping the [`Lab`] (also while a test panics) stops its responders,
//! kills the processes it spawned and deletes every namespace it created.
//! [`Lab::new`] also removes stale lab namespaces left by dead processes.
//!
//! Lab tests need root; they call [`available`] (or [`skip`]) first and skip
//! with a visible message elsewhere. CI runs them as root.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use std::time::Duration;
//!
//! if lab::skip() {
//!     return Ok(());
//! }
//! let mut lab = lab::Lab::new()?;
//! let srv = lab.add_host("srv")?;
//! let m1 = lab.add_host("m1")?;
//! let ext = lab.add_host("ext")?;
//! let _responders = lab.start_responders(&ext, 7, 7, 80)?;
//! lab.track_connections(&m1)?;
//! let agent = std::process::Command::new("cordon-agent");
//! let _pid = lab.spawn(&m1, agent)?;
//! let to_ext = SocketAddr::new(ext.v4.into(), 7);
//! let mut before = lab::open_tcp(&lab, &m1, to_ext)?;
//! // ... isolate m1 ...
//! assert!(!before.alive(Duration::from_secs(1)));
//! assert!(!lab::tcp_echo(&lab, &m1, to_ext, Duration::from_secs(1))?);
//! assert!(lab::icmp_echo(&lab, &m1, srv.v4.into(), Duration::from_secs(1))?);
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

mod probes;
mod responders;

pub use probes::{OpenConnection, http_get, icmp_echo, open_tcp, tcp_echo, udp_echo};
pub use responders::{HTTP_BODY, Responders};

/// Prefix of every lab namespace name: `cdn-<pid>-<n>-<short>`.
pub const NETNS_PREFIX: &str = "cdn-";
/// Name of the bridge inside the bridge namespace.
pub const BRIDGE: &str = "br0";
/// Name of a host's interface inside its namespace.
pub const HOST_IF: &str = "eth0";
/// Directory where `ip netns` keeps its namespace files.
const NETNS_DIR: &str = "/run/netns";

/// Per-process lab counter: the `<n>` in namespace names, and the source of
/// the per-lab address number.
static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
/// Serializes `ip netns add` within this process: the first one mounts
/// `/run/netns`, and concurrent first mounts race.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// Whether lab tests can run here: the effective user is root, network
/// namespaces can be created, and `ip` (iproute2) and `nsenter` work.
///
/// Tests call this first and skip with a visible message when it fails; see
/// [`skip`].
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    for (program, args) in [
        ("ip", &["netns", "list"][..]),
        ("nsenter", &["--version"][..]),
    ] {
        match Command::new(program).args(args).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                return Err(format!(
                    "`{program} {}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Err(e) => return Err(format!("cannot run `{program}`: {e}")),
        }
    }
    // Prove that a network namespace can be created: unshare on a thread of
    // our own, which leaves the namespace (and it disappears) when it ends.
    let unshared = thread::spawn(|| {
        // SAFETY: unshare(CLONE_NEWNET) only changes the calling thread's
        // network namespace; this thread does nothing else and then ends.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    })
    .join()
    .map_err(|_| "namespace probe thread panicked".to_string())?;
    unshared.map_err(|e| format!("cannot create a network namespace: {e}"))
}

/// Returns true, after printing `skipped: <reason> (needs root and network
/// namespaces; runs in CI)` to stderr, when lab tests cannot run here.
///
/// ```no_run
/// if lab::skip() {
///     return;
/// }
/// ```
pub fn skip() -> bool {
    match available() {
        Ok(()) => false,
        Err(reason) => {
            eprintln!("skipped: {reason} (needs root and network namespaces; runs in CI)");
            true
        }
    }
}

/// One lab host: a network namespace with `lo` and `eth0` on the lab bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Full namespace name, `cdn-<pid>-<n>-<short>`.
    pub name: String,
    /// The short name given to [`Lab::add_host`] (`srv`, `m1`, `ext`, ...).
    pub short: String,
    /// IPv4 address on `eth0` (`198.18.<lab>.<index>/24`).
    pub v4: Ipv4Addr,
    /// IPv6 address on `eth0` (`fd00:<lab>::<index>/64`), usable at once.
    pub v6: Ipv6Addr,
    /// The namespace file, `/run/netns/<name>`.
    pub netns_path: PathBuf,
}

impl Host {
    /// The host's address of the same family as `like`.
    pub fn addr_like(&self, like: IpAddr) -> IpAddr {
        match like {
            IpAddr::V4(_) => self.v4.into(),
            IpAddr::V6(_) => self.v6.into(),
        }
    }

    /// Both addresses, IPv4 first.
    pub fn addrs(&self) -> [IpAddr; 2] {
        [self.v4.into(), self.v6.into()]
    }
}

/// A network lab owned by one test. See the [crate documentation](crate).
///
/// Everything it created is removed when it is dropped, also on panic.
pub struct Lab {
    /// `cdn-<pid>-<n>`.
    prefix: String,
    /// The `<lab>` in this lab's addresses, 1..=255.
    number: u8,
    /// Name of the bridge namespace.
    bridge_ns: String,
    /// Every namespace created, in creation order (bridge first).
    namespaces: Vec<String>,
    hosts: Vec<Host>,
    children: HashMap<u32, Child>,
    responders: Mutex<Vec<Arc<responders::Shared>>>,
    /// Set once [`Lab::add_name`] was called.
    hosts_file: Option<HostsFile>,
}

/// The lab's /etc/hosts-style file and what it holds.
#[derive(Debug)]
struct HostsFile {
    path: PathBuf,
    entries: Vec<(String, Vec<IpAddr>)>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.prefix)
            .field("hosts", &self.hosts)
            .field("children", &self.children.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// Creates a lab: removes stale lab namespaces of dead processes, then
    /// creates the bridge namespace `cdn-<pid>-<n>-br` with bridge `br0` up.
    pub fn new() -> anyhow::Result<Lab> {
        remove_stale_namespaces();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NETNS_PREFIX}{}-{n}", std::process::id());
        let mut lab = Lab {
            bridge_ns: format!("{prefix}-br"),
            prefix,
            number: u8::try_from(n % 255 + 1).expect("1..=255"),
            namespaces: Vec::new(),
            hosts: Vec::new(),
            children: HashMap::new(),
            responders: Mutex::new(Vec::new()),
            hosts_file: None,
        };
        let bridge_ns = lab.bridge_ns.clone();
        lab.add_namespace(&bridge_ns)?;
        // No multicast snooping: the bridge floods multicast, so IPv6
        // neighbour discovery never depends on MLD reports having been seen.
        ip_batch(
            &bridge_ns,
            &[
                "link set lo up".into(),
                format!("link add {BRIDGE} type bridge mcast_snooping 0"),
                format!("link set {BRIDGE} up"),
            ],
        )?;
        Ok(lab)
    }

    /// `cdn-<pid>-<n>`: the prefix of every namespace of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Name of the namespace holding the bridge.
    pub fn bridge_netns(&self) -> &str {
        &self.bridge_ns
    }

    /// The hosts added so far, in order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The host added with this short name.
    pub fn host(&self, short: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.short == short)
    }

    /// Adds a host namespace `<prefix>-<short>`: `lo` up, `eth0` (a veth
    /// whose peer is a port of `br0`) with `198.18.<lab>.<index>/24` and
    /// `fd00:<lab>::<index>/64`, on-link routes only. IPv6 duplicate address
    /// detection is off in the host, so both addresses are usable at once.
    /// ICMP datagram ("ping") sockets are allowed for every group there.
    pub fn add_host(&mut self, short: &str) -> anyhow::Result<Host> {
        if short.is_empty()
            || short.len() > 32
            || !short
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            bail!("host name {short:?}: use 1 to 32 lowercase letters and digits");
        }
        if short == "br" || self.host(short).is_some() {
            bail!("host name {short:?} is already used in this lab");
        }
        let index = u8::try_from(self.hosts.len() + 1)
            .ok()
            .filter(|i| *i < 255)
            .context("a lab holds at most 254 hosts")?;
        let name = format!("{}-{short}", self.prefix);
        let netns_path = netns_path(&name);
        let v4 = Ipv4Addr::new(198, 18, self.number, index);
        // Decimal digits read as hex groups: fd00:12::3 goes with 198.18.12.3.
        let v6: Ipv6Addr = format!("fd00:{}::{index}", self.number)
            .parse()
            .expect("valid IPv6 address");
        let peer = format!("v{index}");

        self.add_namespace(&name)?;
        // Before eth0 exists, so that it inherits these settings.
        run_in_netns(&netns_path, || -> io::Result<()> {
            for (key, value) in [
                ("net/ipv6/conf/all/accept_dad", "0"),
                ("net/ipv6/conf/default/accept_dad", "0"),
                ("net/ipv6/conf/all/accept_ra", "0"),
                ("net/ipv6/conf/default/accept_ra", "0"),
                ("net/ipv4/ping_group_range", "0 2147483647"),
            ] {
                write_sysctl(key, value)?;
            }
            Ok(())
        })?
        .with_context(|| format!("setting sysctls in {name}"))?;
        ip_batch(
            &name,
            &[
                "link set lo up".into(),
                format!(
                    "link add {HOST_IF} type veth peer name {peer} netns {}",
                    self.bridge_ns
                ),
                format!("addr add {v4}/24 dev {HOST_IF}"),
                format!("addr add {v6}/64 dev {HOST_IF} nodad"),
                format!("link set {HOST_IF} up"),
            ],
        )?;
        ip_batch(
            &self.bridge_ns,
            &[
                format!("link set {peer} master {BRIDGE}"),
                format!("link set {peer} up"),
            ],
        )?;
        wait_addresses_ready(&netns_path, v6)
            .with_context(|| format!("waiting for the addresses of {name}"))?;
        let host = Host {
            name,
            short: short.to_string(),
            v4,
            v6,
            netns_path,
        };
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// Adds `name` -> `addrs` to an /etc/hosts-style file the lab owns and
    /// returns its path (the same for every call). The file is removed when
    /// the lab is dropped.
    pub fn add_name(&mut self, name: &str, addrs: &[IpAddr]) -> anyhow::Result<PathBuf> {
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '#') {
            bail!("invalid host name {name:?}");
        }
        let prefix = self.prefix.clone();
        let file = self.hosts_file.get_or_insert_with(|| HostsFile {
            path: std::env::temp_dir().join(format!("{prefix}-hosts")),
            entries: Vec::new(),
        });
        file.entries.push((name.to_string(), addrs.to_vec()));
        let mut text = String::from("# Cordon network lab\n");
        for (name, addrs) in &file.entries {
            for addr in addrs {
                let _ = writeln!(text, "{addr} {name}");
            }
        }
        std::fs::write(&file.path, text)
            .with_context(|| format!("writing {}", file.path.display()))?;
        Ok(file.path.clone())
    }

    /// The hosts file written by [`Lab::add_name`], if any.
    pub fn hosts_file(&self) -> Option<&Path> {
        self.hosts_file.as_ref().map(|f| f.path.as_path())
    }

    /// Runs `program args` inside the host's network namespace with
    /// `nsenter --net=<netns_path>` and returns its output (stdin is empty).
    /// A non-zero exit status is returned, not turned into an error.
    pub fn exec(&self, host: &Host, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        ensure_exists(host)?;
        nsenter(host)
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in {}", host.name))
    }

    /// Like [`Lab::exec`], but fails unless the program exits successfully,
    /// and returns its standard output.
    pub fn exec_ok(&self, host: &Host, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self.exec(host, program, args)?;
        if !out.status.success() {
            bail!(
                "`{program} {}` in {} failed ({}): {}",
                args.join(" "),
                host.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs an nft script (`nft -f -`) inside the host's namespace.
    pub fn nft(&self, host: &Host, script: &str) -> anyhow::Result<()> {
        ensure_exists(host)?;
        let mut child = nsenter(host)
            .args(["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running nft in {}", host.name))?;
        let written = child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(script.as_bytes());
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft in {} failed ({}): {}",
                host.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        written.context("writing the nft script")?;
        Ok(())
    }

    /// Installs a "host firewall" in the host (and only there): table
    /// `inet hostfw`, an input chain with policy accept and a
    /// `ct state established counter accept` rule. Because a rule needs it,
    /// the kernel then tracks every connection of that namespace, so a test
    /// can prove that a connection opened before isolation is cut. It also
    /// shows that Cordon leaves other tables alone.
    pub fn track_connections(&self, host: &Host) -> anyhow::Result<()> {
        self.nft(
            host,
            "table inet hostfw {\n\
             \tchain input {\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tct state established counter accept\n\
             \t}\n\
             }\n",
        )
    }

    /// Spawns `command` inside the host's network namespace and returns its
    /// pid. The child joins the namespace with `setns` right before `exec`,
    /// exactly what `nsenter --net` does, so the command keeps its stdio,
    /// environment and working directory settings. It runs in a process
    /// group of its own; the lab kills that group when dropped.
    pub fn spawn(&mut self, host: &Host, mut command: Command) -> anyhow::Result<u32> {
        let netns = File::open(&host.netns_path)
            .with_context(|| format!("opening {}", host.netns_path.display()))?;
        let fd = netns.as_raw_fd();
        command.process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setns, which is async-signal-safe. `fd` stays open in the
        // parent until spawn returns (it is close-on-exec in the child).
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("spawning {:?} in {}", command.get_program(), host.name))?;
        drop(netns);
        let pid = child.id();
        self.children.insert(pid, child);
        Ok(pid)
    }

    /// A process started with [`Lab::spawn`], e.g. to take its piped output
    /// or `try_wait` it. The lab still kills it on drop.
    pub fn child_mut(&mut self, pid: u32) -> Option<&mut Child> {
        self.children.get_mut(&pid)
    }

    /// Stops a process started with [`Lab::spawn`]: SIGTERM to it, then
    /// SIGKILL to its process group if it is still running after `grace`.
    /// Returns its exit status; the lab forgets it.
    pub fn stop(&mut self, pid: u32, grace: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self
            .children
            .remove(&pid)
            .with_context(|| format!("pid {pid} was not spawned by this lab"))?;
        if let Some(status) = child.try_wait()? {
            kill_group(pid);
            return Ok(status);
        }
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                kill_group(pid);
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        kill_group(pid);
        Ok(child.wait()?)
    }

    /// Runs `f` on a new thread that has joined the host's network namespace
    /// and returns its result. Sockets `f` creates belong to the host (and
    /// keep working from any thread afterwards). A panic in `f` is resumed
    /// on the calling thread.
    pub fn in_host<T: Send + 'static>(
        &self,
        host: &Host,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        run_in_netns(&host.netns_path, f).with_context(|| format!("entering {}", host.name))
    }

    /// Starts responders inside the host (meant for `ext`): a TCP echo
    /// server, a UDP echo server and a minimal HTTP server answering
    /// `200 OK` with body `ext`, each on `0.0.0.0` and `[::]`. They run on a
    /// thread in the host's namespace until the returned handle or the lab
    /// is dropped, whichever comes first.
    pub fn start_responders(
        &self,
        host: &Host,
        tcp_port: u16,
        udp_port: u16,
        http_port: u16,
    ) -> anyhow::Result<Responders> {
        let shared = responders::start(&host.netns_path, tcp_port, udp_port, http_port)
            .with_context(|| format!("starting responders in {}", host.name))?;
        self.responders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(shared.clone());
        Ok(Responders::new(shared, tcp_port, udp_port, http_port))
    }

    /// Creates a namespace and records it for removal first, so a failure
    /// later on still removes it.
    fn add_namespace(&mut self, name: &str) -> anyhow::Result<()> {
        let _guard = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
        run_ip(&["netns", "add", name], None)?;
        self.namespaces.push(name.to_string());
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let responders =
            std::mem::take(&mut *self.responders.lock().unwrap_or_else(|e| e.into_inner()));
        for shared in responders {
            shared.stop();
        }
        for (pid, mut child) in self.children.drain() {
            kill_group(pid);
            let _ = child.kill();
            let _ = child.wait();
        }
        // Hosts first: deleting a host takes its veth pair with it.
        for name in self.namespaces.drain(..).rev() {
            if let Err(e) = delete_namespace(&name) {
                eprintln!("lab: could not delete network namespace {name}: {e:#}");
            }
        }
        if let Some(file) = self.hosts_file.take() {
            let _ = std::fs::remove_file(file.path);
        }
    }
}

/// `/run/netns/<name>`.
fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn ensure_exists(host: &Host) -> anyhow::Result<()> {
    if !host.netns_path.exists() {
        bail!("network namespace {} does not exist", host.name);
    }
    Ok(())
}

/// `nsenter --net=<path> --` ready for the program and its arguments.
fn nsenter(host: &Host) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", host.netns_path.display()))
        .arg("--");
    cmd
}

/// Runs `ip` with these arguments. Only used for `netns` subcommands; every
/// other `ip` command goes through [`ip_batch`], which names a namespace.
fn run_ip(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new("ip")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip (is iproute2 installed?)")?;
    let mut written = Ok(());
    if let Some(text) = stdin {
        written = child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(text.as_bytes());
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdin
                .map(|s| format!("\ncommands:\n{s}"))
                .unwrap_or_default()
        );
    }
    written.context("writing ip commands")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -n <netns> -batch -` with these commands: never the root
/// namespace.
fn ip_batch(netns: &str, commands: &[String]) -> anyhow::Result<()> {
    assert!(
        netns.starts_with(NETNS_PREFIX),
        "not a lab namespace: {netns}"
    );
    let script = commands.join("\n") + "\n";
    run_ip(&["-n", netns, "-batch", "-"], Some(&script))?;
    Ok(())
}

/// `ip netns delete <name>`.
fn delete_namespace(name: &str) -> anyhow::Result<()> {
    run_ip(&["netns", "delete", name], None)?;
    Ok(())
}

/// The pid in a lab namespace name `cdn-<pid>-...`, if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let (pid, tail) = rest.split_once('-')?;
    if tail.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|p| *p > 0)
}

fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes `cdn-<pid>-*` namespaces whose pid is not a running process,
/// killing processes left inside them first (e.g. an agent spawned by a
/// test that was killed), and their hosts files.
fn remove_stale_namespaces() {
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if name.ends_with("-hosts") && owner_pid(name).is_some_and(|p| !process_alive(p)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let Ok(list) = run_ip(&["netns", "list"], None) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = owner_pid(name) else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        if let Ok(pids) = run_ip(&["netns", "pids", name], None) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                signal(pid, libc::SIGKILL);
            }
        }
        if let Err(e) = delete_namespace(name) {
            eprintln!("lab: could not delete stale network namespace {name}: {e:#}");
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, sig) };
    }
}

/// SIGKILL to the process group led by `pid` (see [`Lab::spawn`]).
fn kill_group(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions; a negative pid
        // names the process group created for this child.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}

/// Joins the calling thread to the network namespace behind `file`.
fn enter_netns(file: &File) -> io::Result<()> {
    // SAFETY: setns with a valid namespace fd only changes the calling
    // thread's network namespace. Callers are dedicated threads.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs `f` on a new thread that joined the namespace at `path`.
fn run_in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let handle = thread::Builder::new()
        .name("lab-netns".into())
        .spawn(move || -> io::Result<T> {
            enter_netns(&file)?;
            drop(file);
            Ok(f())
        })
        .context("spawning a thread")?;
    match handle.join() {
        Ok(result) => result.context("setns"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Writes `/proc/sys/<key>` of the calling thread's network namespace.
fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    std::fs::write(Path::new("/proc/sys").join(key), value)
        .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}: {e}")))
}

/// Waits until `v6` is on the host's `eth0` and no address there is
/// tentative (duplicate address detection is off, so this is immediate).
fn wait_addresses_ready(netns: &Path, v6: Ipv6Addr) -> anyhow::Result<()> {
    let want = v6
        .segments()
        .iter()
        .map(|s| format!("{s:04x}"))
        .collect::<String>();
    let ready = run_in_netns(netns, move || -> io::Result<bool> {
        const IFA_F_TENTATIVE: u32 = 0x40;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            // The thread's own view, not /proc/self/net (the main thread's).
            let table = std::fs::read_to_string("/proc/thread-self/net/if_inet6")?;
            let mut found = false;
            let mut tentative = false;
            for line in table.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 6 || fields[5] != HOST_IF {
                    continue;
                }
                let flags = u32::from_str_radix(fields[4], 16).unwrap_or(0);
                tentative |= flags & IFA_F_TENTATIVE != 0;
                found |= fields[0] == want;
            }
            if found && !tentative {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            thread::sleep(Duration::from_millis(10));
        }
    })??;
    if !ready {
        return Err(anyhow!("IPv6 address {v6} not ready after 3 s"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_lab_names_only() {
        assert_eq!(owner_pid("cdn-1234-0-br"), Some(1234));
        assert_eq!(owner_pid("cdn-1234-17-m1"), Some(1234));
        assert_eq!(owner_pid("cdn-1234"), None);
        assert_eq!(owner_pid("cdn-1234-"), None);
        assert_eq!(owner_pid("cdn-x1-0-br"), None);
        assert_eq!(owner_pid("cdn--0-br"), None);
        assert_eq!(owner_pid("cdn-0-0-br"), None);
        assert_eq!(owner_pid("other-1234-0-br"), None);
        assert_eq!(owner_pid("cdn-+12-0-br"), None);
    }
}
