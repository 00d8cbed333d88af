//! Admission: how many connections an instance takes, decided before any
//! work is spent on them.
//!
//! Two bounds, both reserved atomically so concurrent connects cannot both
//! pass a check that only one may pass:
//! - at accept, a semaphore bounds open sockets (`--max-connections`
//!   WebSocket sessions plus [`HTTP_HEADROOM`] for plain HTTP, so health
//!   checks and metrics still answer when the instance is full). A socket
//!   beyond it is answered with a fixed 503 without spawning anything;
//! - at the upgrade, before the 101 is sent, a WebSocket slot (of
//!   `--max-connections`) and a slot of the user (of
//!   `--max-connections-per-user`) are reserved. The session holds them
//!   until it has ended.
//!
//! This module knows nothing of routing or Redis.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Sockets beyond `--max-connections` kept for plain HTTP requests.
pub const HTTP_HEADROOM: usize = 64;

/// Sockets beyond every bound that are still told "503" (the answer is
/// written, the client's request read and discarded, then the socket
/// closed — closing with its request unread would reset the connection and
/// lose the answer). Beyond these, a socket is closed at once.
pub const REFUSALS_IN_FLIGHT: usize = 32;

/// How long a refused socket may take to go away after its 503.
pub const REFUSAL_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The answer to a socket accepted beyond the accept bound, written without
/// reading the request.
pub const FULL_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\ncontent-length: 29\r\nconnection: close\r\n\r\n\
{\"error\":\"instance is full\"}\n";

/// Why an upgrade was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `--max-connections` WebSocket sessions are open.
    InstanceFull,
    /// The user has `--max-connections-per-user` sessions here.
    UserFull,
}

/// The instance's admission state, shared by the accept loop and the routes.
#[derive(Debug)]
pub struct Limits {
    sockets: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    sessions: Arc<Semaphore>,
    per_user: usize,
    users: Arc<DashMap<Arc<str>, usize>>,
}

/// Reservations a WebSocket session holds for its lifetime; dropping it
/// gives them back.
#[derive(Debug)]
pub struct Admission {
    _session: OwnedSemaphorePermit,
    _user: UserSlot,
}

/// One of a user's connection slots.
#[derive(Debug)]
struct UserSlot {
    user: Arc<str>,
    users: Arc<DashMap<Arc<str>, usize>>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        if let Some(mut n) = self.users.get_mut(&self.user) {
            *n = n.saturating_sub(1);
        }
        self.users.remove_if(&self.user, |_, n| *n == 0);
        switchboard_core::registry::shrink_if_sparse(&self.users);
    }
}

impl Limits {
    /// `max_connections` sessions, `per_user` of them for one user.
    pub fn new(max_connections: usize, per_user: usize) -> Self {
        Limits {
            sockets: Arc::new(Semaphore::new(
                max_connections.saturating_add(HTTP_HEADROOM),
            )),
            refusals: Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT)),
            sessions: Arc::new(Semaphore::new(max_connections)),
            per_user,
            users: Arc::default(),
        }
    }

    /// A socket's place, or `None` when the instance has no room for it.
    pub fn accept(&self) -> Option<OwnedSemaphorePermit> {
        self.sockets.clone().try_acquire_owned().ok()
    }

    /// A place to refuse a socket politely (see [`REFUSALS_IN_FLIGHT`]).
    pub fn refusal(&self) -> Option<OwnedSemaphorePermit> {
        self.refusals.clone().try_acquire_owned().ok()
    }

    /// Reserves a session and one of `user`'s slots, both or neither.
    pub fn admit(&self, user: &Arc<str>) -> Result<Admission, Refusal> {
        let session = self
            .sessions
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::InstanceFull)?;
        {
            // The entry guard makes check-and-increment one step.
            let mut n = self.users.entry(user.clone()).or_insert(0);
            if *n >= self.per_user {
                drop(n);
                self.users.remove_if(user, |_, n| *n == 0);
                return Err(Refusal::UserFull);
            }
            *n += 1;
        }
        Ok(Admission {
            _session: session,
            _user: UserSlot {
                user: user.clone(),
                users: self.users.clone(),
            },
        })
    }
}

/// Answers a socket beyond the limits with [`FULL_RESPONSE`] and closes it
/// after the client has had [`REFUSAL_GRACE`] to read it.
pub async fn refuse_full(mut stream: tokio::net::TcpStream, permit: OwnedSemaphorePermit) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + REFUSAL_GRACE;
    let answered = async {
        stream.write_all(FULL_RESPONSE).await?;
        stream.shutdown().await?;
        let mut discard = [0u8; 1024];
        while stream.read(&mut discard).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout_at(deadline, answered).await;
    drop(permit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_and_user_slots_are_reserved_and_given_back() {
        let limits = Limits::new(3, 2);
        let (alice, bob): (Arc<str>, Arc<str>) = (Arc::from("alice"), Arc::from("bob"));
        let a1 = limits.admit(&alice).expect("first");
        let a2 = limits.admit(&alice).expect("second");
        assert_eq!(limits.admit(&alice).err(), Some(Refusal::UserFull));
        let b1 = limits.admit(&bob).expect("bob");
        assert_eq!(limits.admit(&bob).err(), Some(Refusal::InstanceFull));
        drop(a1);
        let a3 = limits.admit(&alice).expect("a slot came back");
        drop((a2, a3, b1));
        assert!(
            limits.users.is_empty(),
            "no entry left for users with no session"
        );
        assert_eq!(limits.sessions.available_permits(), 3);
    }

    #[test]
    fn sockets_have_headroom_beyond_sessions() {
        let limits = Limits::new(1, 1);
        let held: Vec<_> = (0..=HTTP_HEADROOM)
            .filter_map(|_| limits.accept())
            .collect();
        assert_eq!(held.len(), 1 + HTTP_HEADROOM);
        assert!(limits.accept().is_none());
    }

    #[test]
    fn the_full_response_is_well_formed() {
        let text = std::str::from_utf8(FULL_RESPONSE).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }
}
