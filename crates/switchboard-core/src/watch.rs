//! Watches: which local connections watch which users' presence, what this
//! instance last learnt of each watched user and of each member of its local
//! rooms, and so which presence and member events reach which local
//! connection.
//!
//! Events can arrive out of order (two instances announce two transitions
//! of one user and publish them separately), so each carries the version
//! the backend gave it: an event older than the newest known is dropped,
//! and a connection is only ever told a state different from the last one
//! it was told. Hence "the last event equals the truth" and "never two
//! identical events in a row", per connection.
//!
//! It decides and queues; it never talks to the backend and never awaits
//! (it runs inside `Router::handle_inbound`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use dashmap::DashMap;

use crate::metrics::Metrics;
use crate::presence::Announced;
use crate::protocol::{ServerFrame, TextFrame};
use crate::registry::{shrink_if_sparse, ConnHandle, Registry};
use crate::router::now_ms;

/// One watched user on this instance.
#[derive(Debug)]
struct Watched {
    /// The newest state this instance knows of.
    last: Announced,
    /// The local watchers.
    conns: Vec<Watcher>,
}

#[derive(Debug)]
struct Watcher {
    conn: Arc<ConnHandle>,
    /// What the connection was told last; `None` until its watch's reply
    /// was queued (events meanwhile only update [`Watched::last`], and
    /// [`Watches::confirm`] tells the difference after the reply).
    told: Option<bool>,
}

/// The watch registry of one instance.
#[derive(Debug, Default)]
pub struct Watches {
    users: DashMap<Arc<str>, Watched>,
    /// room -> user -> the newest membership state known (for rooms with a
    /// local member only; forgotten with the last local member, so it holds
    /// at most the users the room had while this instance was in it).
    rooms: DashMap<Arc<str>, HashMap<Arc<str>, Announced>>,
}

impl Watches {
    /// Registers `conn` as a watcher of `users` (not watched by it yet),
    /// told nothing until [`Watches::confirm`]; returns those that had no
    /// local watcher: the backend must learn that this instance watches
    /// them.
    pub fn add(&self, conn: &Arc<ConnHandle>, users: &[Arc<str>]) -> Vec<Arc<str>> {
        let mut first = Vec::new();
        for user in users {
            let mut entry = self.users.entry(user.clone()).or_insert_with(|| {
                first.push(user.clone());
                Watched {
                    last: Announced::NONE,
                    conns: Vec::new(),
                }
            });
            if !entry.conns.iter().any(|w| w.conn.id == conn.id) {
                entry.conns.push(Watcher {
                    conn: conn.clone(),
                    told: None,
                });
            }
        }
        first
    }

    /// Takes in the states the backend read when this instance started
    /// watching `users` (each kept only if newer than what is known).
    pub fn merge(&self, users: &[Arc<str>], states: &[Announced]) {
        for (user, state) in users.iter().zip(states) {
            if let Some(mut entry) = self.users.get_mut(user) {
                if state.version > entry.last.version {
                    entry.last = *state;
                }
            }
        }
    }

    /// Holds `conn`'s events for `users` until [`Watches::confirm`], so that
    /// none overtakes a new reply (for users it watched already).
    pub fn hold(&self, conn: &ConnHandle, users: &[Arc<str>]) {
        for user in users {
            if let Some(mut entry) = self.users.get_mut(user) {
                if let Some(watcher) = entry.conns.iter_mut().find(|w| w.conn.id == conn.id) {
                    watcher.told = None;
                }
            }
        }
    }

    /// The newest known state of each of `users`, for a watch's reply.
    pub fn current<'u>(&self, users: &'u [String]) -> BTreeMap<&'u str, bool> {
        users
            .iter()
            .map(|u| {
                let online = self.users.get(u.as_str()).is_some_and(|e| e.last.online);
                (u.as_str(), online)
            })
            .collect()
    }

    /// The watch's reply was queued, saying `replied`: from now on `conn`
    /// gets events for these users. A transition that arrived between the
    /// reply's read and now is told at once, after the reply.
    pub fn confirm(&self, conn: &ConnHandle, replied: &BTreeMap<&str, bool>, metrics: &Metrics) {
        for (user, said) in replied {
            let Some(mut entry) = self.users.get_mut(*user) else {
                continue;
            };
            let last = entry.last;
            let Some(watcher) = entry.conns.iter_mut().find(|w| w.conn.id == conn.id) else {
                continue;
            };
            if watcher.told.is_some() {
                continue; // confirmed already (the user was named twice)
            }
            watcher.told = Some(*said);
            if last.online != *said {
                watcher.told = Some(last.online);
                if conn.send_text(presence_frame(user, last), metrics) {
                    metrics.presence_events_delivered.inc();
                }
            }
        }
    }

    /// Removes `conn` from the watchers of `users`; returns those with no
    /// local watcher left (the backend must stop sending them here).
    pub fn remove(&self, conn: &ConnHandle, users: &[Arc<str>]) -> Vec<Arc<str>> {
        let mut last = Vec::new();
        for user in users {
            let empty = match self.users.get_mut(user) {
                Some(mut entry) => {
                    entry.conns.retain(|w| w.conn.id != conn.id);
                    entry.conns.is_empty()
                }
                None => false,
            };
            if empty
                && self
                    .users
                    .remove_if(user, |_, e| e.conns.is_empty())
                    .is_some()
            {
                last.push(user.clone());
            }
        }
        shrink_if_sparse(&self.users);
        last
    }

    /// Whether a local connection watches `user`.
    pub fn is_watched(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Users watched by at least one local connection.
    pub fn watched(&self) -> Vec<Arc<str>> {
        self.users.iter().map(|e| e.key().clone()).collect()
    }

    /// How many users are watched here.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether nobody watches anything here.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// A presence event from the bus; returns how many connections were told.
    pub fn presence_event(&self, user: &str, state: Announced, metrics: &Metrics) -> usize {
        let Some(mut entry) = self.users.get_mut(user) else {
            return 0;
        };
        if state.version <= entry.last.version {
            return 0; // older than what is known: delivered out of order
        }
        entry.last = state;
        tell(user, &mut entry, metrics)
    }

    /// Reconciliation: `state` was read from the backend and is the truth,
    /// whatever its version (after a backend that restarted empty, a user
    /// who went offline meanwhile reads as never announced).
    pub fn reconcile(&self, user: &str, state: Announced, metrics: &Metrics) -> usize {
        let Some(mut entry) = self.users.get_mut(user) else {
            return 0;
        };
        if state.online == entry.last.online {
            entry.last.version = entry.last.version.max(state.version);
            return 0;
        }
        entry.last = Announced {
            online: state.online,
            version: entry.last.version.max(state.version),
            ts_ms: if state.ts_ms > 0 {
                state.ts_ms
            } else {
                now_ms()
            },
        };
        tell(user, &mut entry, metrics)
    }

    /// A member event from `room`'s channel; returns how many connections
    /// were told. `authoritative`: a reconciliation read, kept whatever its
    /// version.
    pub fn member_event(
        &self,
        registry: &Registry,
        room: &str,
        user: &str,
        state: Announced,
        authoritative: bool,
        metrics: &Metrics,
    ) -> usize {
        if !registry.has_room(room) {
            return 0;
        }
        {
            let mut members = self.rooms.entry(Arc::from(room)).or_default();
            match members.get_mut(user) {
                Some(known) if state.online == known.online => {
                    known.version = known.version.max(state.version);
                    return 0;
                }
                Some(known) if !authoritative && state.version <= known.version => return 0,
                Some(known) => {
                    *known = Announced {
                        version: known.version.max(state.version),
                        ..state
                    };
                }
                None if authoritative => {
                    members.insert(Arc::from(user), state);
                    return 0; // nothing known to differ from
                }
                None => {
                    members.insert(Arc::from(user), state);
                }
            }
        }
        let frame = member_frame(room, user, state);
        let told = registry.deliver_member_event(room, &frame, metrics);
        metrics.member_events_delivered.inc_by(told as u64);
        told
    }

    /// The members of `room` this instance has heard of (reconciliation).
    pub fn known_members(&self, room: &str) -> Vec<(Arc<str>, Announced)> {
        self.rooms
            .get(room)
            .map(|m| m.iter().map(|(u, s)| (u.clone(), *s)).collect())
            .unwrap_or_default()
    }

    /// Rooms with member state kept here.
    pub fn rooms(&self) -> Vec<Arc<str>> {
        self.rooms.iter().map(|e| e.key().clone()).collect()
    }

    /// The last local member of `room` left: forget its members.
    pub fn forget_room(&self, room: &str) {
        self.rooms.remove(room);
        shrink_if_sparse(&self.rooms);
    }
}

/// Tells every confirmed watcher of `entry` its new state, if it differs
/// from what it was told.
fn tell(user: &str, entry: &mut Watched, metrics: &Metrics) -> usize {
    let last = entry.last;
    let mut frame: Option<TextFrame> = None;
    let mut told = 0;
    for watcher in entry.conns.iter_mut() {
        match watcher.told {
            Some(said) if said != last.online => {}
            _ => continue,
        }
        watcher.told = Some(last.online);
        let frame = frame
            .get_or_insert_with(|| presence_frame(user, last))
            .clone();
        if watcher.conn.send_text(frame, metrics) {
            told += 1;
        }
    }
    metrics.presence_events_delivered.inc_by(told as u64);
    told
}

fn presence_frame(user: &str, state: Announced) -> TextFrame {
    ServerFrame::PresenceEvent {
        user,
        online: state.online,
        ts: state.ts_ms,
    }
    .to_frame()
}

fn member_frame(room: &str, user: &str, state: Announced) -> TextFrame {
    if state.online {
        ServerFrame::MemberJoined {
            room,
            user,
            ts: state.ts_ms,
        }
    } else {
        ServerFrame::MemberLeft {
            room,
            user,
            ts: state.ts_ms,
        }
    }
    .to_frame()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::BoundedReceiver;
    use crate::registry::{Outbound, QueueLimits};

    fn conn(id: &str) -> (Arc<ConnHandle>, BoundedReceiver<Outbound>) {
        let limits = QueueLimits {
            frames: 16,
            bytes: 1 << 16,
        };
        ConnHandle::new(Arc::from(id), Arc::from("alice"), limits)
    }

    fn told(rx: &mut BoundedReceiver<Outbound>) -> Vec<bool> {
        let mut out = Vec::new();
        while let Some(Outbound::Text(frame)) = rx.try_recv() {
            let v: serde_json::Value = serde_json::from_str(frame.as_str()).expect("json");
            out.push(v["online"].as_bool().expect("online"));
        }
        out
    }

    fn state(online: bool, version: u64) -> Announced {
        Announced {
            online,
            version,
            ts_ms: version,
        }
    }

    #[test]
    fn older_and_equal_events_are_dropped_and_the_reply_comes_first() {
        let (metrics, watches) = (Metrics::new(), Watches::default());
        let (c, mut rx) = conn("i1/0");
        let bob: Vec<Arc<str>> = vec![Arc::from("bob")];
        assert_eq!(watches.add(&c, &bob), bob, "the first local watcher");
        watches.merge(&bob, &[state(false, 10)]);
        let users = vec!["bob".to_owned()];
        let replied = watches.current(&users);
        // An event between the reply's read and its queueing is held...
        assert_eq!(watches.presence_event("bob", state(true, 11), &metrics), 0);
        watches.confirm(&c, &replied, &metrics);
        // ...and told right after the reply.
        assert_eq!(told(&mut rx), [true]);
        // Older than known: dropped. Same state, newer: not told again.
        assert_eq!(watches.presence_event("bob", state(false, 9), &metrics), 0);
        assert_eq!(watches.presence_event("bob", state(true, 12), &metrics), 0);
        assert_eq!(watches.presence_event("bob", state(false, 13), &metrics), 1);
        assert_eq!(told(&mut rx), [false]);
        // A reconciliation read is the truth whatever its version.
        assert_eq!(watches.reconcile("bob", Announced::NONE, &metrics), 0);
        assert_eq!(watches.reconcile("bob", state(true, 1), &metrics), 1);
        assert_eq!(told(&mut rx), [true]);
        // Re-watching holds events until the new reply is confirmed.
        watches.hold(&c, &bob);
        assert_eq!(watches.presence_event("bob", state(false, 20), &metrics), 0);
        let replied = watches.current(&users);
        assert_eq!(replied.get("bob"), Some(&false));
        watches.confirm(&c, &replied, &metrics);
        assert!(told(&mut rx).is_empty(), "the reply already says offline");
        assert_eq!(watches.remove(&c, &bob), bob, "the last local watcher");
        assert!(watches.is_empty());
    }
}
