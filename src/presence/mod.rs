//! Presence: which instances hold which users. The [`Presence`] trait is the
//! router's only view of it.
//!
//! Every instance writes only its own entries (the number of a user's
//! connections it holds), so its local state is the truth it can always
//! re-assert. Readers only ever see live instances: filtering out entries of
//! dead instances is the implementation's job, not the router's.
//!
//! Implementations: [`local::LocalPresence`] (in-process) and
//! `crate::redis::RedisPresence`. This module never talks to Redis itself.

pub mod local;

use std::sync::Arc;

use async_trait::async_trait;

/// One instance holding a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The instance id.
    pub instance: Arc<str>,
    /// How many of the user's connections it holds.
    pub connections: u32,
}

/// Why a presence operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// The shared store cannot be reached; the caller answers `unavailable`.
    #[error("presence store unavailable: {0}")]
    Unavailable(String),
}

/// The presence store as the router sees it.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Records one more connection of `user` on this instance.
    ///
    /// On failure the store remembers the local truth and re-asserts it when
    /// the backend is back, so a connection is never refused for it.
    async fn connect(&self, user: &str) -> Result<(), PresenceError>;

    /// Records one connection fewer; the entry disappears at zero.
    async fn disconnect(&self, user: &str) -> Result<(), PresenceError>;

    /// The live instances holding `user` (this instance included).
    async fn locate(&self, user: &str) -> Result<Vec<Holder>, PresenceError>;

    /// [`Presence::locate`] for many users in one round trip.
    async fn locate_many(&self, users: &[String]) -> Result<Vec<Vec<Holder>>, PresenceError>;

    /// A publish to `instance` reached no listener: its entries are stale.
    fn report_stale(&self, _instance: &str) {}

    /// Removes every entry of this instance (graceful shutdown).
    async fn withdraw(&self) -> Result<(), PresenceError>;
}
