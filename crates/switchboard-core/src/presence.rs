//! Presence: which instances hold which users. The [`Presence`] trait is the
//! router's view of it for connects, disconnects and queries (routing a DM
//! reads presence inside [`crate::bus::Bus::route_direct`], in one step with
//! the publishes).
//!
//! Every instance writes only its own entries (the number of a user's
//! connections it holds), so its local state is the truth it can always
//! re-assert. Readers only ever see live instances: filtering out entries of
//! dead instances is the implementation's job, not the router's.
//!
//! Implementations: [`crate::local::LocalBackend`] (in-process) and
//! `switchboard_redis::RedisBackend`. This module never talks to Redis itself.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::BackendError;

/// One instance holding a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The instance id.
    pub instance: Arc<str>,
    /// How many of the user's connections it holds.
    pub connections: u32,
}

/// The presence store as the router sees it.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Records one more connection of `user` on this instance.
    ///
    /// On failure the store remembers the local truth and re-asserts it when
    /// the backend is back, so a connection is never refused for it.
    async fn connect(&self, user: &str) -> Result<(), BackendError>;

    /// Records one connection fewer; the entry disappears at zero.
    async fn disconnect(&self, user: &str) -> Result<(), BackendError>;

    /// The live instances holding `user` (this instance included).
    async fn locate(&self, user: &str) -> Result<Vec<Holder>, BackendError>;

    /// [`Presence::locate`] for many users in one round trip.
    async fn locate_many(&self, users: &[String]) -> Result<Vec<Vec<Holder>>, BackendError>;

    /// Removes every entry of this instance (graceful shutdown).
    async fn withdraw(&self) -> Result<(), BackendError>;
}
