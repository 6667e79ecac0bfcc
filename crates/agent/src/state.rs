//! What the agent enforces, on disk: `state.json`, written (temp file,
//! fsync, rename) before success is reported, with the previous version kept
//! as `state.prev.json` so that a corrupt file falls back to the last good
//! one instead of to "not isolated".

use std::path::{Path, PathBuf};

use anyhow::Context;
use proto::agent::{ActionOutcome, Enforced, SavedState};

use crate::identity::write_atomic;

const STATE_FILE: &str = "state.json";
const PREVIOUS_FILE: &str = "state.prev.json";
/// Outcomes of this many recent actions are kept.
const RECENT: usize = 64;

/// The outcome of loading the saved state.
#[derive(Debug)]
pub enum Loaded {
    /// Never isolated, nothing saved.
    Nothing,
    Good(SavedState),
    /// `state.json` was unreadable; this is the previous good copy.
    Recovered(SavedState, String),
    /// Neither copy could be read.
    Corrupt(String),
}

pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> StateFile {
        StateFile {
            dir: dir.to_owned(),
        }
    }

    fn parse(path: &Path) -> Result<Option<SavedState>, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{} is corrupt: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{} is unreadable: {e}", path.display())),
        }
    }

    pub fn load(&self) -> Loaded {
        match Self::parse(&self.dir.join(STATE_FILE)) {
            Ok(Some(state)) => Loaded::Good(state),
            Ok(None) => match Self::parse(&self.dir.join(PREVIOUS_FILE)) {
                Ok(Some(previous)) => Loaded::Recovered(previous, "state.json is missing".into()),
                _ => Loaded::Nothing,
            },
            Err(problem) => match Self::parse(&self.dir.join(PREVIOUS_FILE)) {
                Ok(Some(previous)) => Loaded::Recovered(previous, problem),
                _ => Loaded::Corrupt(problem),
            },
        }
    }

    /// Saves `state` durably, keeping the current file as the previous copy.
    pub fn save(&self, state: &SavedState) -> anyhow::Result<()> {
        let current = self.dir.join(STATE_FILE);
        if let Ok(Some(good)) = Self::parse(&current) {
            write_atomic(
                &self.dir.join(PREVIOUS_FILE),
                &serde_json::to_vec_pretty(&good)?,
                0o600,
            )?;
        }
        write_atomic(&current, &serde_json::to_vec_pretty(state)?, 0o600)
            .with_context(|| format!("cannot save {}", current.display()))
    }
}

/// Records an action's outcome in `state`, keeping the most recent ones.
pub fn remember(state: &mut SavedState, outcome: ActionOutcome) {
    state.recent.retain(|o| o.action_id != outcome.action_id);
    state.recent.push(outcome);
    let excess = state.recent.len().saturating_sub(RECENT);
    state.recent.drain(..excess);
}

pub fn empty_state() -> SavedState {
    SavedState {
        enforced: Enforced::NotIsolated,
        server_addresses: Vec::new(),
        server_port: 0,
        agent_gid: 0,
        action_id: None,
        exclusions: Vec::new(),
        exclusion_version: None,
        updated: proto::time::format_utc(0),
        recent: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(label: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cordon-state-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_corrupt_file_falls_back_to_the_previous_good_copy() {
        let d = dir("corrupt");
        let file = StateFile::new(&d);
        assert!(matches!(file.load(), Loaded::Nothing));
        let mut isolated = empty_state();
        isolated.enforced = Enforced::Full;
        file.save(&isolated).unwrap();
        let mut later = isolated.clone();
        later.action_id = Some("a".into());
        file.save(&later).unwrap();
        assert!(matches!(file.load(), Loaded::Good(s) if s == later));
        std::fs::write(d.join(STATE_FILE), b"{\"enforced\": \"Fu").unwrap();
        match file.load() {
            Loaded::Recovered(s, why) => {
                assert_eq!(s, isolated);
                assert!(why.contains("corrupt"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(d.join(PREVIOUS_FILE), b"garbage").unwrap();
        assert!(matches!(file.load(), Loaded::Corrupt(_)));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn remembers_a_bounded_number_of_outcomes() {
        let mut state = empty_state();
        for i in 0..100 {
            remember(
                &mut state,
                ActionOutcome {
                    action_id: i.to_string(),
                    succeeded: true,
                    error_h_result: 0,
                    reason: None,
                    enforced: Enforced::Full,
                },
            );
        }
        assert_eq!(state.recent.len(), RECENT);
        assert_eq!(state.recent.last().unwrap().action_id, "99");
    }
}
