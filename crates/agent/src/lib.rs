//! The Cordon agent's library: enrollment and the session with the server.
//!
//! The binary (`cordon-agent`) is a thin front on this; the server's tests
//! use the same code as their test agent.

pub mod enforce;
pub mod exclusions;
pub mod https;
pub mod identity;
pub mod retry;
pub mod runner;
pub mod session;
pub mod state;

pub use https::{HttpsClient, Reply};
pub use identity::{Identity, enroll, host_facts};
pub use session::Session;
