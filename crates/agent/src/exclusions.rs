//! Application matching for Selective isolation, with cgroup v2.
//!
//! The kernel can match a packet's socket by the cgroup (v2) it was created
//! in (`socket cgroupv2`). A systemd unit already has a cgroup of its own;
//! for an executable path the agent makes one per rule
//! (`<cgroup2>/cordon-<machine>/x-<n>`) and moves every process started from
//! that file into it: those already running when the rules are applied, and
//! new ones *before* their `exec` completes, so that no socket of theirs is
//! ever created outside the cgroup. For that the agent marks each excluded
//! file for fanotify's exec permission events: the kernel holds the `exec`
//! until the agent has moved the process and answered "allow". (Where
//! fanotify is unavailable, a scan of `/proc` every 20 ms is the fallback,
//! with a short window in which a new process isn't yet excluded.) A process
//! that later `exec`s another program leaves the cgroup (children are not
//! excluded unless a rule covers them), found by a scan every 200 ms. Only
//! processes in the agent's own network namespace are placed. The agent
//! removes every cgroup it made once no rule needs it.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use proto::agent::ExclusionSpec;

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on unified
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones (read from mountinfo).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// A cgroup directory as the kernel identifies it.
fn cgroup_match(root: &Path, dir: &Path) -> anyhow::Result<policy::CgroupMatch> {
    let level = dir
        .strip_prefix(root)
        .context("cgroup outside the hierarchy")?
        .components()
        .count() as u32;
    let id = std::fs::metadata(dir)
        .with_context(|| format!("cannot stat {}", dir.display()))?
        .ino();
    Ok(policy::CgroupMatch { level, id })
}

/// Finds the cgroup of a systemd unit (such as `sshd.service`) anywhere in
/// the first levels of the hierarchy.
fn find_unit(root: &Path, unit: &str) -> Option<PathBuf> {
    let mut frontier = vec![root.to_owned()];
    for _ in 0..4 {
        let mut next = Vec::new();
        for dir in frontier {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    if entry.file_name() == unit {
                        return Some(entry.path());
                    }
                    next.push(entry.path());
                }
            }
        }
        frontier = next;
    }
    None
}

/// Exclusion rules resolved for this host, and the processes to place.
pub struct Resolved {
    pub rules: Vec<policy::Exclusion>,
    /// (executable, cgroup directory) pairs to keep populated.
    pub placements: Vec<(PathBuf, PathBuf)>,
}

/// Turns the server's rules into policy exclusions, making the cgroups that
/// executable rules need. Fails when a rule can't be honoured here.
pub fn resolve(specs: &[ExclusionSpec], machine_id: &str) -> anyhow::Result<Resolved> {
    let needs_cgroups = specs
        .iter()
        .any(|s| s.executable_path.is_some() || s.systemd_unit.is_some());
    let root = if needs_cgroups {
        match cgroup2_root() {
            Some(root) => Some(root),
            None => bail!(
                "cgroup v2 is not mounted on this host, so application exclusions can't be honoured"
            ),
        }
    } else {
        None
    };
    let mut rules = Vec::new();
    let mut placements = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        let mut cgroup = None;
        if let (Some(path), Some(root)) = (&spec.executable_path, &root) {
            let dir = root
                .join(format!(
                    "cordon-{}",
                    &machine_id[..machine_id.len().min(12)]
                ))
                .join(format!("x-{index}"));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create the cgroup {}", dir.display()))?;
            cgroup = Some(cgroup_match(root, &dir)?);
            let exe = std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
            placements.push((exe, dir));
        }
        if let (Some(unit), Some(root)) = (&spec.systemd_unit, &root) {
            if cgroup.is_some() {
                bail!(
                    "exclusion '{}' names both an executable and a unit; a process can't be in both",
                    spec.name
                );
            }
            match find_unit(root, unit) {
                Some(dir) => cgroup = Some(cgroup_match(root, &dir)?),
                None => {
                    // Not running: nothing of it to let through.
                    tracing::info!(unit = %unit, "exclusion for a unit that is not running");
                    continue;
                }
            }
        }
        let (inbound, outbound) = match spec.direction.as_deref() {
            Some("Inbound") => (true, false),
            Some("Outbound") => (false, true),
            _ => (true, true),
        };
        let mut remote = Vec::new();
        for text in &spec.remote_addresses {
            let (addr, len) = match text.split_once('/') {
                Some((a, l)) => (a.parse().ok(), l.parse::<u8>().ok()),
                None => (text.parse().ok(), None),
            };
            let Some(addr) = addr else {
                bail!("exclusion '{}': '{text}' is not an address", spec.name);
            };
            let max = if matches!(addr, std::net::IpAddr::V4(_)) {
                32
            } else {
                128
            };
            let len = len.unwrap_or(max);
            if len > max {
                bail!("exclusion '{}': bad prefix length in '{text}'", spec.name);
            }
            remote.push((addr, len));
        }
        rules.push(policy::Exclusion {
            name: spec.name.clone(),
            cgroup,
            inbound,
            outbound,
            remote,
            ports: spec
                .remote_ports
                .iter()
                .map(|p| (p.first, p.last))
                .collect(),
        });
    }
    Ok(Resolved { rules, placements })
}

/// Keeps processes of excluded executables in their cgroups.
#[derive(Clone, Default)]
pub struct Placer {
    placements: Arc<Mutex<Vec<(PathBuf, PathBuf)>>>,
    machine_dir: Arc<Mutex<Option<PathBuf>>>,
    /// The agent's network namespace: only processes in it are placed.
    own_ns: Option<PathBuf>,
    /// The fanotify group for exec permission events, if available.
    fanotify: Option<Arc<std::os::fd::OwnedFd>>,
}

const FAN_CLASS_CONTENT: u32 = 0x4;
const FAN_CLOEXEC: u32 = 0x1;
const FAN_MARK_ADD: u32 = 0x1;
const FAN_MARK_FLUSH: u32 = 0x80;
const FAN_OPEN_EXEC_PERM: u64 = 0x0004_0000;
const FAN_ALLOW: u32 = 0x01;

fn fanotify_group() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let fd = unsafe {
        libc::fanotify_init(
            FAN_CLASS_CONTENT | FAN_CLOEXEC,
            (libc::O_RDONLY | libc::O_LARGEFILE) as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

fn net_namespace_of(pid: &str) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()
}

impl Placer {
    /// Starts the watcher thread (fanotify exec permission events, or a
    /// `/proc` scan where fanotify is unavailable), and returns once it
    /// listens for process events.
    pub fn start() -> Placer {
        let fanotify = match fanotify_group() {
            Ok(fd) => Some(Arc::new(fd)),
            Err(e) => {
                tracing::info!(error = %e, "no fanotify; scanning /proc for new processes instead");
                None
            }
        };
        let placer = Placer {
            own_ns: net_namespace_of("self"),
            fanotify,
            ..Placer::default()
        };
        let watcher = placer.clone();
        std::thread::Builder::new()
            .name("exclusion-placer".into())
            .spawn(move || watcher.watch())
            .expect("thread");
        placer
    }

    /// Marks each excluded file for exec permission events (replacing the
    /// previous marks).
    fn mark(&self, placements: &[(PathBuf, PathBuf)]) {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let Some(group) = &self.fanotify else { return };
        unsafe {
            libc::fanotify_mark(
                group.as_raw_fd(),
                FAN_MARK_FLUSH,
                0,
                libc::AT_FDCWD,
                std::ptr::null(),
            );
        }
        for (exe, _) in placements {
            let Ok(path) = std::ffi::CString::new(exe.as_os_str().as_bytes()) else {
                continue;
            };
            let marked = unsafe {
                libc::fanotify_mark(
                    group.as_raw_fd(),
                    FAN_MARK_ADD,
                    FAN_OPEN_EXEC_PERM,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                )
            };
            if marked != 0 {
                tracing::warn!(exe = %exe.display(), error = %std::io::Error::last_os_error(), "cannot watch an excluded executable");
            }
        }
    }

    /// What is placed now.
    pub fn placements(&self) -> Vec<(PathBuf, PathBuf)> {
        self.placements.lock().expect("lock").clone()
    }

    /// Sets what to place and places every running process now; cgroups no
    /// longer used are emptied and removed.
    pub fn update(&self, placements: Vec<(PathBuf, PathBuf)>) {
        self.mark(&placements);
        let old = std::mem::replace(
            &mut *self.placements.lock().expect("lock"),
            placements.clone(),
        );
        for (_, dir) in &old {
            if !placements.iter().any(|(_, d)| d == dir) {
                remove_cgroup(dir);
            }
        }
        if let Some((_, dir)) = placements.first() {
            *self.machine_dir.lock().expect("lock") = dir.parent().map(Path::to_owned);
        } else if let Some(dir) = self.machine_dir.lock().expect("lock").take() {
            let _ = std::fs::remove_dir(&dir);
        }
        for pid in process_ids() {
            self.place(&pid);
        }
    }

    /// Puts `pid` where it belongs: into a rule's cgroup if it runs an
    /// excluded executable, out of ours if it no longer does.
    fn place(&self, pid: &str) {
        if self.own_ns.is_some() && net_namespace_of(pid) != self.own_ns {
            return;
        }
        let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            return;
        };
        let placements = self.placements.lock().expect("lock").clone();
        let current = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let target = placements
            .iter()
            .find(|(path, _)| *path == exe)
            .map(|(_, d)| d.clone());
        match target {
            Some(dir) => {
                let _ = std::fs::write(dir.join("cgroup.procs"), format!("{pid}\n"));
            }
            None => {
                // A child that exec'd another program leaves our cgroups.
                let ours = placements.iter().any(|(_, dir)| {
                    dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        current.lines().any(|l| {
                            l.starts_with("0::") && l.contains("/cordon-") && l.ends_with(n)
                        })
                    })
                });
                if ours && let Some(root) = cgroup2_root() {
                    let _ = std::fs::write(root.join("cgroup.procs"), format!("{pid}\n"));
                }
            }
        }
    }

    fn watch(&self) {
        match &self.fanotify {
            Some(group) => {
                let group = group.clone();
                let scanner = self.clone();
                std::thread::Builder::new()
                    .name("exclusion-scan".into())
                    .spawn(move || scanner.scan_every(Duration::from_millis(200)))
                    .expect("thread");
                self.answer_exec_events(&group);
            }
            None => self.scan_every(Duration::from_millis(20)),
        }
    }

    /// Moves each process about to exec an excluded file into its cgroup,
    /// then lets the exec go on. Every event is answered, whatever happens.
    fn answer_exec_events(&self, group: &std::os::fd::OwnedFd) {
        use std::os::fd::AsRawFd;
        let mut buffer = vec![0u8; 4096];
        loop {
            let n =
                unsafe { libc::read(group.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
            if n <= 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::warn!(error = %e, "fanotify failed; scanning /proc instead");
                return self.scan_every(Duration::from_millis(20));
            }
            let mut rest = &buffer[..n as usize];
            // struct fanotify_event_metadata: len u32, vers u8, reserved u8,
            // metadata_len u16, mask u64, fd i32, pid i32.
            while rest.len() >= 24 {
                let length = u32::from_ne_bytes(rest[0..4].try_into().expect("4")) as usize;
                let fd = i32::from_ne_bytes(rest[16..20].try_into().expect("4"));
                let pid = i32::from_ne_bytes(rest[20..24].try_into().expect("4"));
                if fd >= 0 {
                    let file = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
                    let target = file.and_then(|f| {
                        self.placements
                            .lock()
                            .expect("lock")
                            .iter()
                            .find(|(exe, _)| *exe == f)
                            .map(|(_, dir)| dir.clone())
                    });
                    let pid = pid.to_string();
                    if let Some(dir) = target
                        && (self.own_ns.is_none() || net_namespace_of(&pid) == self.own_ns)
                    {
                        let _ = std::fs::write(dir.join("cgroup.procs"), format!("{pid}\n"));
                    }
                    let mut response = [0u8; 8];
                    response[0..4].copy_from_slice(&fd.to_ne_bytes());
                    response[4..8].copy_from_slice(&FAN_ALLOW.to_ne_bytes());
                    unsafe {
                        libc::write(group.as_raw_fd(), response.as_ptr().cast(), response.len());
                        libc::close(fd);
                    }
                }
                if length < 24 || length > rest.len() {
                    break;
                }
                rest = &rest[length..];
            }
        }
    }

    /// Places processes by scanning `/proc`: new ones (fallback) and ones
    /// that exec'd another program since (they leave our cgroups).
    fn scan_every(&self, period: Duration) {
        let mut known: HashMap<String, PathBuf> = HashMap::new();
        loop {
            std::thread::sleep(period);
            if self.placements.lock().expect("lock").is_empty() {
                known.clear();
                continue;
            }
            let mut seen = HashMap::new();
            for pid in process_ids() {
                let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
                    continue;
                };
                if known.get(&pid) != Some(&exe) {
                    self.place(&pid);
                }
                seen.insert(pid, exe);
            }
            known = seen;
        }
    }
}

/// The ids of every process, from `/proc`.
fn process_ids() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .collect()
}

fn remove_cgroup(dir: &Path) {
    if let (Ok(procs), Some(root)) = (
        std::fs::read_to_string(dir.join("cgroup.procs")),
        cgroup2_root(),
    ) {
        for pid in procs.lines() {
            let _ = std::fs::write(root.join("cgroup.procs"), format!("{pid}\n"));
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        tracing::warn!(error = %e, cgroup = %dir.display(), "could not remove an exclusion cgroup");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        // Present on every Linux this project supports (unified or hybrid).
        assert!(cgroup2_root().is_some());
    }

    #[test]
    fn address_rules_resolve_without_cgroups() {
        let spec = ExclusionSpec {
            id: "1".into(),
            name: "web".into(),
            executable_path: None,
            systemd_unit: None,
            direction: Some("Outbound".into()),
            remote_addresses: vec!["198.18.0.4".into(), "fd00::/64".into()],
            remote_ports: vec![proto::agent::PortRange {
                first: 8080,
                last: 8080,
            }],
        };
        let resolved = resolve(std::slice::from_ref(&spec), "0123456789abcdef").unwrap();
        assert_eq!(
            resolved.rules[0].remote,
            vec![
                ("198.18.0.4".parse().unwrap(), 32),
                ("fd00::".parse().unwrap(), 64)
            ]
        );
        assert!(!resolved.rules[0].inbound && resolved.rules[0].outbound);
        assert!(resolved.placements.is_empty());
        let mut bad = spec;
        bad.remote_addresses = vec!["not-an-address".into()];
        assert!(resolve(&[bad], "0123").is_err());
    }
}
