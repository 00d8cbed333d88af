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

/// What watchers were told last about a user (or about a user's membership
/// of a room): the announced state, which changes only on user-level
/// transitions. Not announced reads as [`Announced::NONE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    /// Online (a member).
    pub online: bool,
    /// Strictly increasing per user (per room member): `max(previous + 1,
    /// now in microseconds)` on the backend's clock, so a receiver can drop
    /// an event older than one it has, and a version survives a Redis that
    /// restarted empty.
    pub version: u64,
    /// When the transition was announced, unix milliseconds.
    pub ts_ms: u64,
}

impl Announced {
    /// Never announced (or announced gone and deleted).
    pub const NONE: Announced = Announced {
        online: false,
        version: 0,
        ts_ms: 0,
    };
}

/// One page of a room's announced members.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    /// Sorted user ids.
    pub users: Vec<String>,
    /// More members exist than were listed.
    pub truncated: bool,
}

/// The presence store as the router sees it.
///
/// Besides counting connections it announces **user-level transitions**:
/// the first connection of a user anywhere announces it online (a `P`
/// envelope on the personal channel of every instance watching the user);
/// the last one gone announces it offline, but only when the router
/// [`Presence::settle`]s the user a grace after its last local connection
/// closed, or when a dead instance is reaped. Room memberships are announced
/// the same way (`M` envelopes on the room's channel). Announcing is atomic
/// with the state change in the backend, so each transition is announced
/// once however many instances race.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Records one more connection of `user` on this instance.
    ///
    /// On failure the store remembers the local truth and re-asserts it when
    /// the backend is back, so a connection is never refused for it.
    async fn connect(&self, user: &str) -> Result<(), BackendError>;

    /// Records one connection fewer; the entry disappears at zero, but the
    /// user stays *lingering* (still listed as this instance's, so a reaper
    /// settles it if this process dies) until [`Presence::settle`]. Never
    /// announces.
    async fn disconnect(&self, user: &str) -> Result<(), BackendError>;

    /// A grace after the user's last local connection closed (and none
    /// opened since): announces the user offline if no instance holds it,
    /// then forgets the lingering mark. An error leaves it lingering; the
    /// router retries.
    async fn settle(&self, user: &str) -> Result<(), BackendError>;

    /// This instance starts watching `users` (the router asks for the first
    /// local watcher of each): registration and read are one atomic step per
    /// user, so no transition falls between them. Returns each user's state.
    async fn watch(&self, users: &[String]) -> Result<Vec<Announced>, BackendError>;

    /// This instance stops watching `users` (their last local watcher left).
    async fn unwatch(&self, users: &[String]) -> Result<(), BackendError>;

    /// The announced states of `users` (read only: reconciliation).
    async fn announced(&self, users: &[String]) -> Result<Vec<Announced>, BackendError>;

    /// The first local connection of `user` joined `room`: records the
    /// membership and announces `member_joined` if the user was not an
    /// announced member.
    async fn join_room(&self, room: &str, user: &str) -> Result<(), BackendError>;

    /// The last local connection of `user` left `room`: the membership is
    /// removed but lingers until [`Presence::settle_member`].
    async fn leave_room(&self, room: &str, user: &str) -> Result<(), BackendError>;

    /// [`Presence::settle`] for a room membership: announces `member_left`
    /// if no instance holds a membership of `user` in `room`.
    async fn settle_member(&self, room: &str, user: &str) -> Result<(), BackendError>;

    /// The announced members of `room`, sorted, at most `limit`.
    async fn members(&self, room: &str, limit: usize) -> Result<Members, BackendError>;

    /// The announced membership of each of `users` in `room`
    /// (reconciliation).
    async fn member_states(
        &self,
        room: &str,
        users: &[String],
    ) -> Result<Vec<Announced>, BackendError>;

    /// The live instances holding `user` (this instance included).
    async fn locate(&self, user: &str) -> Result<Vec<Holder>, BackendError>;

    /// [`Presence::locate`] for many users in one round trip.
    async fn locate_many(&self, users: &[String]) -> Result<Vec<Vec<Holder>>, BackendError>;

    /// Removes every entry of this instance (graceful shutdown), its watcher
    /// and room-member entries too, announcing every user and membership
    /// that no other instance holds as gone.
    async fn withdraw(&self) -> Result<(), BackendError>;
}
