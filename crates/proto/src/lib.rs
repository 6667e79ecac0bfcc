//! Wire types of Cordon: the only types that are serialized.
//!
//! Everything that crosses a process boundary (REST bodies, the error body,
//! tokens, the agent protocol, JSON printed by the admin commands) is defined
//! here, so that a change to the wire format is a change to this crate.

pub mod agent;
pub mod api;
pub mod auth;
pub mod cli;
pub mod time;
