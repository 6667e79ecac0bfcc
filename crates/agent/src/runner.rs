//! `cordon-agent run`: re-apply what is saved, keep one session with the
//! server, execute pushed actions, send heartbeats, and restore the table
//! when someone tampers with it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use proto::agent::{
    ActionOrder, ActionOutcome, AgentMessage, Enforced, ExclusionSpec, SavedState, ServerMessage,
};
use tokio::sync::mpsc;

use crate::enforce::Enforcer;
use crate::exclusions::{self, Placer};
use crate::https::{HttpsClient, parse_server};
use crate::identity::Identity;
use crate::retry::{AfterFailure, Reconnect, RetryPolicy};
use crate::session::Session;
use crate::state::{Loaded, StateFile, empty_state, remember};

/// The group id the agent's sockets carry unless told otherwise; only
/// sockets of this group may use the management channel under isolation.
pub const DEFAULT_AGENT_GID: u32 = 61742;

#[derive(Debug, Clone)]
pub struct Options {
    pub state_dir: PathBuf,
    pub name: Option<String>,
    pub agent_gid: u32,
    /// How long the management channel has to prove itself after an apply.
    pub verify_timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
}

/// The agent's working state: what is enforced and the kernel handle.
pub struct Agent {
    pub identity: Identity,
    pub options: Options,
    pub state: SavedState,
    /// The state's exclusions, resolved for this host.
    exclusions: Vec<policy::Exclusion>,
    /// The latest exclusion rule set from the server, and its version.
    latest: Option<(i64, Vec<ExclusionSpec>)>,
    placer: Placer,
    file: StateFile,
    enforcer: Enforcer,
}

/// Resolves a state's exclusions (Selective only).
fn resolve_for(state: &SavedState, machine_id: &str) -> anyhow::Result<exclusions::Resolved> {
    if state.enforced == Enforced::Selective {
        exclusions::resolve(&state.exclusions, machine_id)
    } else {
        Ok(exclusions::Resolved {
            rules: Vec::new(),
            placements: Vec::new(),
        })
    }
}

/// Makes every socket the agent opens carry `gid`, the identity the
/// isolation rules let through.
pub fn adopt_agent_gid(gid: u32) -> anyhow::Result<()> {
    // glibc applies setegid to every thread of the process.
    if unsafe { libc::setegid(gid) } != 0 {
        bail!(
            "cannot switch to group id {gid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Loads the saved state and puts it in force, failing safe: a corrupt
/// state file with Cordon's table in the kernel keeps the table as it is.
pub fn reapply_saved(
    file: &StateFile,
    enforcer: &mut Enforcer,
    machine_id: &str,
) -> anyhow::Result<(SavedState, exclusions::Resolved)> {
    let (state, recovered) = match file.load() {
        Loaded::Nothing => {
            let state = empty_state();
            return Ok((
                state,
                exclusions::Resolved {
                    rules: Vec::new(),
                    placements: Vec::new(),
                },
            ));
        }
        Loaded::Good(state) => (state, None),
        Loaded::Recovered(state, problem) => (state, Some(problem)),
        Loaded::Corrupt(problem) => {
            if enforcer.table_present()? {
                bail!(
                    "{problem}; Cordon's table is in force and stays in force (fail safe) until an action or an operator replaces the state file"
                );
            }
            bail!("{problem}; no isolation is in force")
        }
    };
    if let Some(problem) = &recovered {
        tracing::warn!(%problem, "state file unreadable; re-applying the previous good copy");
    }
    let resolved = resolve_for(&state, machine_id)?;
    enforcer.apply(&state, &resolved.rules)?;
    if recovered.is_some() {
        file.save(&state)?;
    }
    tracing::info!(enforced = ?state.enforced, "saved state re-applied");
    Ok((state, resolved))
}

impl Agent {
    pub fn start(options: Options) -> anyhow::Result<Agent> {
        let identity = Identity::load(&options.state_dir)?;
        let file = StateFile::new(&options.state_dir);
        let mut enforcer = Enforcer::open()?;
        let (state, resolved) = reapply_saved(&file, &mut enforcer, &identity.machine_id)?;
        let placer = Placer::start();
        placer.update(resolved.placements);
        // From here on every socket the agent opens carries its group id.
        if let Err(e) = adopt_agent_gid(options.agent_gid) {
            tracing::warn!(error = %e, "the management channel can't be told apart from other traffic");
        }
        Ok(Agent {
            identity,
            options,
            state,
            exclusions: resolved.rules,
            latest: None,
            placer,
            file,
            enforcer,
        })
    }

    /// Every address the server's name resolves to, plus the one the
    /// session is connected to.
    async fn server_addresses(
        &self,
        peer: Option<SocketAddr>,
    ) -> anyhow::Result<(Vec<String>, u16)> {
        let (host, port) = parse_server(&self.identity.server)?;
        let mut addresses: Vec<String> = Vec::new();
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(resolved) => {
                for a in resolved {
                    let ip = a.ip().to_string();
                    if !addresses.contains(&ip) {
                        addresses.push(ip);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, %host, "cannot resolve the server"),
        }
        if let Some(peer) = peer {
            let ip = peer.ip().to_canonical().to_string();
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
        if addresses.is_empty() {
            bail!("the server's name {host} resolves to no address");
        }
        Ok((addresses, port))
    }

    /// Proves the management channel works: a fresh TLS connection to the
    /// server and one request, within the verify timeout.
    async fn prove_channel(&self) -> anyhow::Result<()> {
        let attempt = async {
            let mut client = HttpsClient::new(self.identity.tls.clone(), &self.identity.server)?;
            let reply = client
                .request(
                    http::Method::GET,
                    proto::agent::HEALTH_PATH,
                    &[],
                    Vec::new(),
                )
                .await?;
            if !reply.status.is_success() {
                bail!("the server answered {}", reply.status);
            }
            anyhow::Ok(())
        };
        match tokio::time::timeout(self.options.verify_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => bail!(
                "no answer within {} s",
                self.options.verify_timeout.as_secs_f32()
            ),
        }
    }

    /// Applies an action: the new rules in one batch, read back, the
    /// channel proven, the state saved; otherwise the previous state is
    /// restored. Returns the outcome to report.
    pub async fn execute(
        &mut self,
        order: &ActionOrder,
        peer: Option<SocketAddr>,
        received: std::time::Instant,
    ) -> ActionOutcome {
        let failed = |reason: String, enforced: Enforced| ActionOutcome {
            action_id: order.action_id.clone(),
            succeeded: false,
            error_h_result: -2147467259,
            reason: Some(reason),
            enforced,
        };
        let previous = self.state.clone();
        let target = match (order.action_type.as_str(), order.scope.as_deref()) {
            ("Isolate", Some("Selective")) => Enforced::Selective,
            ("Isolate", _) => Enforced::Full,
            ("Unisolate", _) => Enforced::NotIsolated,
            (other, _) => {
                return failed(format!("unknown action type '{other}'"), previous.enforced);
            }
        };
        let (addresses, port) = if target == Enforced::NotIsolated {
            (Vec::new(), 0)
        } else {
            match self.server_addresses(peer).await {
                Ok(found) => found,
                Err(e) => return failed(format!("{e:#}"), previous.enforced),
            }
        };
        let (exclusion_version, specs) = match (target, &self.latest) {
            (Enforced::Selective, Some((version, rules))) => (Some(*version), rules.clone()),
            (Enforced::Selective, None) => (Some(0), Vec::new()),
            _ => (None, Vec::new()),
        };
        let mut next = SavedState {
            enforced: target,
            server_addresses: addresses,
            server_port: port,
            agent_gid: self.options.agent_gid,
            action_id: Some(order.action_id.clone()),
            exclusions: specs,
            exclusion_version,
            updated: proto::time::format_utc(now_nanos()),
            recent: previous.recent.clone(),
        };
        let resolved = match resolve_for(&next, &self.identity.machine_id) {
            Ok(resolved) => resolved,
            Err(e) => {
                return failed(
                    format!(
                        "an exclusion rule can't be honoured on this host: {e:#}; the machine is unchanged"
                    ),
                    previous.enforced,
                );
            }
        };
        let previous_placements = self.placer.placements();
        self.placer.update(resolved.placements.clone());
        let started = std::time::Instant::now();
        if let Err(e) = self.enforcer.apply(&next, &resolved.rules) {
            let restored = self.restore(&previous, previous_placements);
            return failed(
                format!("could not apply the rules: {e:#}{}", restore_note(restored)),
                previous.enforced,
            );
        }
        let in_force = started.elapsed();
        let received_to_in_force = received.elapsed();
        if let Err(e) = self.prove_channel().await {
            let restored = self.restore(&previous, previous_placements);
            return failed(
                format!(
                    "the management channel did not work through the new rules: {e:#}{}",
                    restore_note(restored)
                ),
                previous.enforced,
            );
        }
        let outcome = ActionOutcome {
            action_id: order.action_id.clone(),
            succeeded: true,
            error_h_result: 0,
            reason: None,
            enforced: target,
        };
        remember(&mut next, outcome.clone());
        if let Err(e) = self.file.save(&next) {
            let restored = self.restore(&previous, previous_placements);
            return failed(
                format!("could not save the state: {e:#}{}", restore_note(restored)),
                previous.enforced,
            );
        }
        tracing::info!(
            action_id = %order.action_id,
            enforced = ?target,
            apply_us = in_force.as_micros() as u64,
            received_to_in_force_us = received_to_in_force.as_micros() as u64,
            proven_ms = started.elapsed().as_millis() as u64,
            "action applied"
        );
        self.state = next;
        self.exclusions = resolved.rules;
        outcome
    }

    /// Puts `previous` back in force after a failed change.
    fn restore(
        &mut self,
        previous: &SavedState,
        placements: Vec<(std::path::PathBuf, std::path::PathBuf)>,
    ) -> bool {
        self.placer.update(placements);
        self.enforcer.apply(previous, &self.exclusions).is_ok()
    }

    /// A new exclusion rule set from the server: remembered, and applied at
    /// once (atomically) when the machine is isolated Selectively.
    pub fn exclusions_changed(
        &mut self,
        version: i64,
        rules: Vec<ExclusionSpec>,
    ) -> Option<AgentMessage> {
        self.latest = Some((version, rules.clone()));
        if self.state.enforced != Enforced::Selective
            || self.state.exclusion_version == Some(version)
        {
            return None;
        }
        let mut next = self.state.clone();
        next.exclusions = rules;
        next.exclusion_version = Some(version);
        next.updated = proto::time::format_utc(now_nanos());
        let previous_placements = self.placer.placements();
        let outcome = resolve_for(&next, &self.identity.machine_id).and_then(|resolved| {
            self.placer.update(resolved.placements.clone());
            self.enforcer.apply(&next, &resolved.rules)?;
            self.file.save(&next)?;
            Ok(resolved)
        });
        match outcome {
            Ok(resolved) => {
                tracing::info!(
                    version,
                    rules = resolved.rules.len(),
                    "exclusion rules applied"
                );
                self.state = next;
                self.exclusions = resolved.rules;
                Some(AgentMessage::ExclusionsApplied {
                    version,
                    succeeded: true,
                    reason: None,
                })
            }
            Err(e) => {
                let previous = self.state.clone();
                let restored = self.restore(&previous, previous_placements);
                let reason = format!("{e:#}{}", restore_note(restored));
                tracing::warn!(version, %reason, "exclusion rules not applied");
                Some(AgentMessage::ExclusionsApplied {
                    version,
                    succeeded: false,
                    reason: Some(reason),
                })
            }
        }
    }

    /// The heartbeat: what is in force, and which exclusion rules.
    fn heartbeat(&self) -> AgentMessage {
        AgentMessage::Heartbeat {
            enforced: self.state.enforced,
            exclusion_version: (self.state.enforced == Enforced::Selective)
                .then_some(self.state.exclusion_version)
                .flatten(),
        }
    }

    /// Records a failed outcome too, so a redelivery gets the same answer.
    fn remember_failure(&mut self, outcome: &ActionOutcome) {
        if !outcome.succeeded {
            let mut state = self.state.clone();
            remember(&mut state, outcome.clone());
            if self.file.save(&state).is_ok() {
                self.state = state;
            }
        }
    }

    /// Checks the table after a change notification; restores it if it
    /// differs. Returns a description when something was restored.
    pub fn check_tamper(&mut self) -> Option<(String, bool)> {
        match self.enforcer.intact(&self.state, &self.exclusions) {
            Ok(true) => None,
            Ok(false) | Err(_) => {
                let restored = self.enforcer.apply(&self.state, &self.exclusions).is_ok();
                let detail = format!(
                    "Cordon's table was removed or changed while the machine was {:?}",
                    self.state.enforced
                );
                if restored {
                    tracing::warn!(%detail, "tampering undone");
                } else {
                    tracing::error!(%detail, "tampering detected and the table could not be restored");
                }
                Some((detail, restored))
            }
        }
    }
}

fn restore_note(restored: bool) -> &'static str {
    if restored {
        "; the previous state was restored"
    } else {
        "; restoring the previous state failed too"
    }
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Watches nftables notifications on a thread of its own and tells the
/// agent when its table may have been touched by someone else.
fn spawn_tamper_watch(own_port: u32) -> mpsc::UnboundedReceiver<()> {
    let (sender, receiver) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("tamper-watch".into())
        .spawn(move || {
            let mut monitor = match nft::Monitor::open() {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch nftables changes; tampering will be noticed only at heartbeats");
                    return;
                }
            };
            loop {
                match monitor.wait_for_foreign_change(own_port) {
                    Ok(true) => {
                        if sender.send(()).is_err() {
                            return;
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "nftables watch failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .expect("thread");
    receiver
}

/// How long a session must have lasted for its end to start the backoff
/// afresh.
const STABLE_SESSION: Duration = Duration::from_secs(30);

/// A `refused` the server sent during a session, as the error that ends
/// it: its time to come back, if any, is honoured like a refusal at the
/// session's start ([`AfterFailure::of`]).
fn ended_by_server(
    code: String,
    reason: String,
    retry_after_seconds: Option<u64>,
) -> anyhow::Error {
    anyhow::Error::new(crate::session::Refused {
        code,
        reason,
        retry_after: retry_after_seconds.map(Duration::from_secs),
    })
    .context("the server ended the session")
}

/// Runs the agent until it is stopped. Stopping never lifts isolation.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let mut agent = Agent::start(options)?;
    let mut tamper = spawn_tamper_watch(agent.enforcer.port_id());
    let mut pending_reports: Vec<AgentMessage> = Vec::new();
    let mut reconnect = Reconnect::new(RetryPolicy::new(agent.options.max_backoff));
    loop {
        let facts = agent.identity.host_facts(agent.options.name.as_deref());
        // When the server asked to come back later (it is busy): not a
        // failure, the backoff doesn't grow.
        let mut server_hint = None;
        match Session::open(&agent.identity, facts, agent.state.enforced).await {
            Ok(mut session) => {
                let opened = std::time::Instant::now();
                tracing::info!(server = %agent.identity.server, "session open");
                for report in pending_reports.drain(..) {
                    let _ = session.send(&report).await;
                }
                let ended =
                    serve(&mut agent, &mut session, &mut tamper, &mut pending_reports).await;
                // Only a session that held for a while resets the backoff:
                // one the server ends at once, again and again, makes the
                // agent wait longer each time, as a failure to connect does.
                if opened.elapsed() >= STABLE_SESSION {
                    reconnect.connected();
                }
                match ended {
                    Ok(()) => tracing::info!("session ended"),
                    Err(e) => {
                        if let AfterFailure::Busy(hint) = AfterFailure::of(&e) {
                            server_hint = Some(hint);
                        }
                        tracing::warn!(error = %format!("{e:#}"), "session ended")
                    }
                }
            }
            Err(e) => match AfterFailure::of(&e) {
                AfterFailure::GiveUp => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot open a session");
                    return Err(e.context("the server no longer accepts this machine"));
                }
                AfterFailure::Busy(hint) => {
                    server_hint = Some(hint);
                    tracing::info!(
                        reason = %format!("{e:#}"),
                        retry_after_s = hint.as_secs(),
                        "the server is busy; trying again when it asked"
                    );
                }
                AfterFailure::Failed => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot open a session")
                }
            },
        }
        let wait = reconnect.next_wait(server_hint);
        // Keep restoring the table while disconnected.
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                Some(()) = tamper.recv() => {
                    if let Some((detail, restored)) = agent.check_tamper() {
                        pending_reports.push(AgentMessage::Tamper { detail, restored });
                    }
                }
            }
        }
    }
}

async fn serve(
    agent: &mut Agent,
    session: &mut Session,
    tamper: &mut mpsc::UnboundedReceiver<()>,
    pending_reports: &mut Vec<AgentMessage>,
) -> anyhow::Result<()> {
    let mut heartbeat =
        tokio::time::interval(Duration::from_secs(session.heartbeat_seconds.max(1)));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let peer = Some(session.peer);
    loop {
        tokio::select! {
            message = session.recv() => {
                match message? {
                    ServerMessage::Action(order) => {
                        let received = std::time::Instant::now();
                        match screen(&order, &agent.identity.machine_id, &agent.state.recent) {
                            Screened::Refuse(why) => {
                                tracing::warn!(action_id = %order.action_id, action_type = %order.action_type, "refused: {why}");
                                continue;
                            }
                            Screened::Replay(outcome) => {
                                // Delivered again: report what happened, don't apply twice.
                                session.send(&result_message(&outcome)).await?;
                                continue;
                            }
                            Screened::Start => {}
                        }
                        session.send(&AgentMessage::Ack { action_id: order.action_id.clone() }).await?;
                        // Wait for the go-ahead. A repeated delivery of the
                        // same action may come first; it is skipped.
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                        loop {
                            let answer = tokio::time::timeout_at(deadline, session.recv()).await
                                .context("no answer to the acknowledgement")??;
                            match answer {
                                ServerMessage::Proceed { action_id } if action_id == order.action_id => {
                                    let outcome = agent.execute(&order, peer, received).await;
                                    agent.remember_failure(&outcome);
                                    session.send(&result_message(&outcome)).await?;
                                    break;
                                }
                                ServerMessage::Withdrawn { action_id, status } if action_id == order.action_id => {
                                    tracing::info!(%action_id, %status, "action withdrawn by the server");
                                    break;
                                }
                                ServerMessage::Refused { code, reason, retry_after_seconds } => {
                                    return Err(ended_by_server(code, reason, retry_after_seconds));
                                }
                                other => tracing::debug!(?other, "skipped while waiting for the go-ahead"),
                            }
                        }
                    }
                    ServerMessage::Exclusions { version, rules } => {
                        if let Some(report) = agent.exclusions_changed(version, rules) {
                            session.send(&report).await?;
                        }
                    }
                    ServerMessage::Refused { code, reason, retry_after_seconds } => {
                        return Err(ended_by_server(code, reason, retry_after_seconds));
                    }
                    other => tracing::debug!(?other, "ignored message"),
                }
            }
            _ = heartbeat.tick() => {
                session.send(&agent.heartbeat()).await?;
            }
            Some(()) = tamper.recv() => {
                if let Some((detail, restored)) = agent.check_tamper() {
                    let report = AgentMessage::Tamper { detail, restored };
                    if session.send(&report).await.is_err() {
                        pending_reports.push(report);
                    }
                }
            }
        }
    }
}

/// What to do with a pushed action, before anything is applied.
#[derive(Debug, PartialEq)]
enum Screened {
    /// Not for this agent to execute: logged, nothing changes.
    Refuse(&'static str),
    /// Already executed: answer with the outcome it had.
    Replay(ActionOutcome),
    /// New: acknowledge and wait for the server's go-ahead.
    Start,
}

fn screen(order: &ActionOrder, machine_id: &str, recent: &[ActionOutcome]) -> Screened {
    if order.machine_id != machine_id {
        return Screened::Refuse("the action is addressed to another machine");
    }
    if !matches!(order.action_type.as_str(), "Isolate" | "Unisolate") {
        return Screened::Refuse("unknown action type");
    }
    if !matches!(
        order.scope.as_deref(),
        None | Some("Full") | Some("Selective")
    ) {
        return Screened::Refuse("unknown isolation scope");
    }
    match recent.iter().find(|o| o.action_id == order.action_id) {
        Some(outcome) => Screened::Replay(outcome.clone()),
        None => Screened::Start,
    }
}

fn result_message(outcome: &ActionOutcome) -> AgentMessage {
    AgentMessage::Result {
        action_id: outcome.action_id.clone(),
        succeeded: outcome.succeeded,
        error_h_result: outcome.error_h_result,
        reason: outcome.reason.clone(),
        enforced: outcome.enforced,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_that_ends_a_session_keeps_its_time_to_come_back() {
        let busy = ended_by_server("Unavailable".into(), "busy".into(), Some(7));
        assert_eq!(
            AfterFailure::of(&busy),
            AfterFailure::Busy(Duration::from_secs(7))
        );
        let revoked = ended_by_server("Revoked".into(), "revoked".into(), None);
        assert_eq!(AfterFailure::of(&revoked), AfterFailure::GiveUp);
        let replaced = ended_by_server("Replaced".into(), "newer".into(), None);
        assert_eq!(AfterFailure::of(&replaced), AfterFailure::Failed);
    }

    fn order(machine: &str, kind: &str, scope: Option<&str>) -> ActionOrder {
        ActionOrder {
            action_id: "a1".into(),
            machine_id: machine.into(),
            action_type: kind.into(),
            scope: scope.map(str::to_owned),
            created: "2026-01-01T00:00:00.0000000Z".into(),
        }
    }

    #[test]
    fn pushed_actions_are_screened_before_anything_is_applied() {
        let me = "aa".repeat(20);
        let other = "bb".repeat(20);
        let done = ActionOutcome {
            action_id: "a1".into(),
            succeeded: true,
            error_h_result: 0,
            reason: None,
            enforced: Enforced::Full,
        };
        assert_eq!(
            screen(&order(&me, "Isolate", Some("Full")), &me, &[]),
            Screened::Start
        );
        assert_eq!(
            screen(&order(&me, "Unisolate", None), &me, &[]),
            Screened::Start
        );
        assert!(matches!(
            screen(&order(&other, "Isolate", Some("Full")), &me, &[]),
            Screened::Refuse(_)
        ));
        assert!(matches!(
            screen(&order(&me, "RunScript", None), &me, &[]),
            Screened::Refuse(_)
        ));
        assert!(matches!(
            screen(&order(&me, "Isolate", Some("Partial")), &me, &[]),
            Screened::Refuse(_)
        ));
        // A replayed delivery gets the stored outcome, never a second apply.
        assert_eq!(
            screen(
                &order(&me, "Isolate", Some("Full")),
                &me,
                std::slice::from_ref(&done)
            ),
            Screened::Replay(done.clone())
        );
    }
}
