//! Turns the saved state into a policy and puts it in force through the
//! `nft` crate, verifying what the kernel holds afterwards.

use std::net::IpAddr;

use anyhow::{Context, bail};
use proto::agent::{Enforced, SavedState};

/// The policy a saved state stands for, with its exclusions resolved for
/// this host (see `exclusions::resolve`).
pub fn policy_for(
    state: &SavedState,
    exclusions: &[policy::Exclusion],
) -> anyhow::Result<policy::Policy> {
    let scope = match state.enforced {
        Enforced::NotIsolated => return Ok(policy::Policy::NotIsolated),
        Enforced::Full => policy::Scope::Full,
        Enforced::Selective => policy::Scope::Selective,
    };
    let addresses: Vec<IpAddr> = state
        .server_addresses
        .iter()
        .map(|a| {
            a.parse()
                .with_context(|| format!("bad server address '{a}' in the state"))
        })
        .collect::<anyhow::Result<_>>()?;
    if addresses.is_empty() || state.server_port == 0 {
        bail!("the saved isolation names no server address to keep reachable");
    }
    Ok(policy::Policy::Isolated(policy::Isolation {
        scope,
        server_addresses: addresses,
        server_port: state.server_port,
        agent_gid: state.agent_gid,
        exclusions: exclusions.to_vec(),
    }))
}

/// The kernel side: one netlink socket, kept open.
pub struct Enforcer {
    firewall: nft::Firewall,
}

impl Enforcer {
    pub fn open() -> anyhow::Result<Enforcer> {
        Ok(Enforcer {
            firewall: nft::Firewall::open().context("cannot open the nftables netlink socket")?,
        })
    }

    /// The netlink port of our socket: notifications of our own changes carry it.
    pub fn port_id(&self) -> u32 {
        self.firewall.port_id()
    }

    /// Applies `state` in one batch and reads it back.
    pub fn apply(
        &mut self,
        state: &SavedState,
        exclusions: &[policy::Exclusion],
    ) -> anyhow::Result<()> {
        let ruleset = policy::render(&policy_for(state, exclusions)?);
        self.firewall
            .apply(ruleset.as_ref())
            .context("the kernel refused the ruleset")?;
        if !self.firewall.verify(ruleset.as_ref())? {
            bail!("the ruleset read back from the kernel differs from the one applied");
        }
        Ok(())
    }

    /// Whether the kernel holds exactly what `state` stands for.
    pub fn intact(
        &mut self,
        state: &SavedState,
        exclusions: &[policy::Exclusion],
    ) -> anyhow::Result<bool> {
        let ruleset = policy::render(&policy_for(state, exclusions)?);
        Ok(self.firewall.verify(ruleset.as_ref())?)
    }

    /// Whether Cordon's table is in the kernel at all.
    pub fn table_present(&mut self) -> anyhow::Result<bool> {
        Ok(self.firewall.read_back()?.is_some())
    }
}
