//! The local truth: which WebSocket connections this instance holds, by user
//! and by room, and the bounded outbound queue of each.
//!
//! The registry hands frames to connections without ever blocking: a full
//! queue (in frames or in bytes) marks that connection as a slow consumer and
//! asks its task to close it. It knows nothing of Redis, presence, sockets or
//! routing decisions; it is the state that presence and room subscriptions
//! are derived from.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::protocol::{ServerFrame, TextFrame};
use crate::queue::{bounded, BoundedReceiver, BoundedSender, Refused, Weighed};
use crate::store::Seq;

/// What a connection's writer sends, in queue order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// A text frame: a message, a reply, the welcome.
    Text(TextFrame),
    /// A WebSocket ping (the server's keepalive).
    Ping,
}

impl Weighed for Outbound {
    fn weight(&self) -> usize {
        match self {
            Outbound::Text(frame) => frame.len(),
            Outbound::Ping => 0,
        }
    }
}

/// The two budgets of a connection's outbound queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Most frames queued.
    pub frames: usize,
    /// Most bytes queued.
    pub bytes: usize,
}

/// WebSocket close codes the server uses, with their reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// 1001: the instance is shutting down.
    GoingAway,
    /// 1008: the client did not read fast enough.
    SlowConsumer,
    /// 1009: a frame was over the size limit.
    TooLarge,
    /// 1008: the client kept sending past its rate limit.
    Flooding,
    /// 1001: the client sent nothing, not even a pong, for too long.
    Idle,
    /// 1011: the server failed while handling this connection.
    Internal,
    /// 1013: the connection's inbox backlog could not be read; reconnect
    /// (with `since`) and it is read again.
    TryAgainLater,
    /// 4001: the connection token expired and no `refresh` replaced it.
    TokenExpired,
    /// 4002: a backend asked for it (`POST /api/v1/disconnect`); the text
    /// is the one given there ([`ConnHandle::disconnect`]).
    Disconnected,
    /// 4003: a `refresh` presented a token for another user.
    OtherUser,
}

impl CloseReason {
    /// The close code and reason text sent to the client.
    pub fn code_and_reason(self) -> (u16, &'static str) {
        match self {
            CloseReason::GoingAway => (1001, "server shutting down"),
            CloseReason::SlowConsumer => (1008, "slow consumer"),
            CloseReason::TooLarge => (1009, "frame too large"),
            CloseReason::Flooding => (1008, "rate limit exceeded"),
            CloseReason::Idle => (1001, "idle timeout"),
            CloseReason::Internal => (1011, "internal error"),
            CloseReason::TryAgainLater => (1013, "inbox unavailable; reconnect"),
            CloseReason::TokenExpired => (4001, "token expired"),
            CloseReason::Disconnected => (4002, DISCONNECTED),
            CloseReason::OtherUser => (4003, "token for another user"),
        }
    }
}

/// The close reason text of [`CloseReason::Disconnected`] when the request
/// gave none.
pub const DISCONNECTED: &str = "disconnected by the server";

/// Longest close reason text a disconnect request may give, in bytes (a
/// Close frame's reason has 123 bytes at most).
pub const MAX_DISCONNECT_REASON: usize = 100;

/// One local connection, shared by the registry and the connection's task.
#[derive(Debug)]
pub struct ConnHandle {
    /// Unique across instances (prefixed by the instance id), so a room
    /// message can name the connection that must not get its own echo.
    pub id: Arc<str>,
    /// The authenticated user.
    pub user: Arc<str>,
    /// Bounded queue drained by the connection's writer.
    outbound: BoundedSender<Outbound>,
    /// Cancelled when the connection must be closed by the server.
    closer: CancellationToken,
    /// Why the server closed it; the first reason wins.
    close_reason: OnceLock<CloseReason>,
    /// The reason text of a [`CloseReason::Disconnected`], when one was given.
    close_text: OnceLock<Box<str>>,
    /// Rooms this connection has joined (membership checks and cleanup).
    rooms: Mutex<HashSet<Arc<str>>>,
    /// Rooms joined with `"events": false`: no member events (usually none).
    quiet_rooms: Mutex<Vec<Arc<str>>>,
    /// Users this connection watches (the limit, and cleanup).
    watching: Mutex<HashSet<Arc<str>>>,
    /// The inbox seam: stored DMs live-delivered while the backlog is being
    /// replayed are held here, and every stored DM is queued at most once
    /// and in seq order.
    gate: Mutex<Gate>,
    /// The same per room, for rooms joined with `since` (none for most
    /// connections: nothing allocated).
    room_gates: Mutex<Option<Box<RoomGates>>>,
    /// Woken when the gate found a hole and wants the inbox read again
    /// (see [`ConnHandle::repair_wanted`]): the connection's task learns of
    /// it without polling.
    repair: Notify,
}

/// Stored DMs held while a connection's backlog is replayed, at most (and
/// [`HELD_BYTES`], and half the connection's own queue budgets). Beyond
/// that live frames are not held but read again from the inbox.
const HELD_ITEMS: usize = 128;
/// Bytes of stored DMs held during a replay, at most.
const HELD_BYTES: usize = 256 << 10;

/// Per-room gates of one connection (rooms joined with `since`).
type RoomGates = HashMap<Arc<str>, Gate>;

/// Where a connection is in the seam between its backlog and live delivery.
///
/// Live stored DMs carry their predecessor in the inbox (`prev`), so the gate
/// tells three cases apart: `seq <= last` is a duplicate (dropped);
/// `prev <= last < seq` is the next one (queued); `prev > last` is a hole —
/// an earlier DM has not arrived (it is late on the bus, or lost). A hole is
/// neither skipped nor taken out of order: the gate goes back to replaying,
/// holds the DM, and asks the connection to read the inbox after `last`.
#[derive(Debug)]
enum Gate {
    /// Live: stored DMs are queued if newer than `last`, the newest queued.
    Live { last: Seq },
    /// The backlog is being replayed (at connect, or to repair a hole).
    Replaying(Box<Replay>),
}

/// A live stored DM held during a replay: its seq, its predecessor (when
/// known) and its frame.
type Held = (Seq, Option<Seq>, TextFrame);

#[derive(Debug)]
struct Replay {
    /// The newest entry replayed (or the position the replay started after).
    last: Seq,
    /// Live stored DMs that arrived meanwhile, in arrival order.
    held: Vec<Held>,
    held_bytes: usize,
    /// A live DM was not held (the budget was full): read the inbox again.
    overflow: bool,
    /// A live DM found a hole while the connection was live: its task must
    /// read the inbox after `last` (set here, taken by [`Gate::take_repair`],
    /// so at most one repair runs at a time).
    repair: bool,
    /// The inbox is being read again after this position because a held
    /// DM's predecessor was missing at the end of the last read. If that
    /// read brings nothing newer, the predecessor is not in the store (it
    /// was lost with it): the gap is announced rather than read forever.
    chasing: Option<Seq>,
}

/// What [`Gate::offer`] did with a live frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offered {
    /// Queued on the connection.
    Queued,
    /// Held, dropped as a duplicate, or refused by a full queue; or it
    /// closed a hole and was queued with the held ones behind it (counted
    /// as delivered already).
    NotQueued,
    /// Held because of a hole: the connection must repair it.
    Hole,
}

impl Replay {
    fn after(last: Seq) -> Replay {
        Replay {
            last,
            held: Vec::new(),
            held_bytes: 0,
            overflow: false,
            repair: false,
            chasing: None,
        }
    }

    /// Holds a live frame, or (over the budget) marks the replay to read
    /// the inbox again, where the frame is.
    fn hold(&mut self, held: Held, (max_items, max_bytes): (usize, usize)) {
        let len = held.2.len();
        if self.held.len() < max_items && self.held_bytes + len <= max_bytes {
            self.held_bytes += len;
            self.held.push(held);
        } else {
            // It is in the inbox (or history): the replay reads it again.
            self.overflow = true;
        }
    }
}

impl Replay {
    /// Sorts the held frames and says whether they follow `last` without a
    /// hole, each the successor of the one before.
    fn closes_the_hole(&mut self) -> bool {
        self.held.sort_by_key(|(seq, _, _)| *seq);
        let mut last = self.last;
        for (seq, prev, _) in &self.held {
            if *seq <= last || prev.is_some_and(|prev| prev > last) {
                return false;
            }
            last = *seq;
        }
        true
    }
}

impl Gate {
    fn replaying(after: Seq) -> Gate {
        Gate::Replaying(Box::new(Replay::after(after)))
    }

    fn start_at(&mut self, after: Seq) {
        if let Gate::Replaying(replay) = self {
            replay.last = replay.last.max(after);
        }
    }

    fn accepts(&mut self, seq: Seq) -> bool {
        let last = match self {
            Gate::Replaying(replay) => &mut replay.last,
            Gate::Live { last } => last,
        };
        if seq > *last {
            *last = seq;
            true
        } else {
            false
        }
    }

    /// A requested repair, taken: the position to read the inbox after.
    fn take_repair(&mut self) -> Option<Seq> {
        match self {
            Gate::Replaying(replay) if replay.repair => {
                replay.repair = false;
                Some(replay.last)
            }
            _ => None,
        }
    }

    /// Ends a replay whose last read is done. `newest` is the newest seq
    /// in the store at that read (when known): everything up to it has been
    /// read (or was reported trimmed), so it counts as had. The held frames
    /// are queued in seq order while each follows the one before; at a
    /// hole the inbox is read again after the last queued.
    fn finish(
        &mut self,
        newest: Option<Seq>,
        mut send: impl FnMut(TextFrame) -> bool,
        metrics: &Metrics,
    ) -> ReplayEnd {
        let Gate::Replaying(replay) = self else {
            return ReplayEnd::Live;
        };
        if let Some(newest) = newest {
            replay.last = replay.last.max(newest);
        }
        if replay.overflow {
            replay.overflow = false;
            replay.chasing = None;
            replay.held.clear();
            replay.held_bytes = 0;
            return ReplayEnd::ReadAgainAfter(replay.last);
        }
        // The read after `chasing` brought nothing newer: what is missing
        // before the held frames is not in the store.
        let settle = replay.chasing.take() == Some(replay.last);
        let mut held = std::mem::take(&mut replay.held);
        held.sort_by_key(|(seq, _, _)| *seq);
        let mut last = replay.last;
        let mut rest = held.into_iter();
        while let Some((seq, prev, frame)) = rest.next() {
            if seq <= last {
                metrics.dropped_duplicate.inc();
                continue;
            }
            if prev.is_some_and(|prev| prev > last) {
                if !settle {
                    // What is missing was appended before this frame, so
                    // before now: the next read has it. The frames from
                    // here on stay held (the read has them too, unless the
                    // store lost them).
                    replay.held = std::iter::once((seq, prev, frame)).chain(rest).collect();
                    replay.held_bytes = replay.held.iter().map(|(_, _, f)| f.len()).sum();
                    replay.last = last;
                    replay.chasing = Some(last);
                    return ReplayEnd::ReadAgainAfter(last);
                }
                metrics.inbox_gaps.inc();
                let gap = ServerFrame::Gap {
                    after: last,
                    first: Some(seq),
                };
                send(gap.to_frame());
            }
            last = seq;
            if send(frame) {
                metrics.delivered.inc();
            }
        }
        *self = Gate::Live { last };
        ReplayEnd::Live
    }

    fn offer(
        &mut self,
        seq: Seq,
        prev: Option<Seq>,
        frame: &TextFrame,
        budget: (usize, usize),
        mut send: impl FnMut(TextFrame) -> bool,
        metrics: &Metrics,
    ) -> Offered {
        match self {
            Gate::Live { last } => {
                if seq <= *last {
                    metrics.dropped_duplicate.inc();
                    return Offered::NotQueued;
                }
                if prev.is_some_and(|prev| prev > *last) {
                    let mut replay = Replay::after(*last);
                    replay.repair = true;
                    replay.hold((seq, prev, frame.clone()), budget);
                    *self = Gate::Replaying(Box::new(replay));
                    return Offered::Hole;
                }
                *last = seq;
                if send(frame.clone()) {
                    Offered::Queued
                } else {
                    Offered::NotQueued
                }
            }
            Gate::Replaying(replay) => {
                if seq <= replay.last {
                    metrics.dropped_duplicate.inc();
                    return Offered::NotQueued;
                }
                replay.hold((seq, prev, frame.clone()), budget);
                if replay.repair && !replay.overflow && replay.closes_the_hole() {
                    // The late DM came before the repair started: nothing
                    // is missing any more, no read needed.
                    let mut last = replay.last;
                    for (seq, _, frame) in std::mem::take(&mut replay.held) {
                        last = seq;
                        if send(frame) {
                            metrics.delivered.inc();
                        }
                    }
                    *self = Gate::Live { last };
                }
                Offered::NotQueued
            }
        }
    }
}

/// What [`ConnHandle::finish_replay`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayEnd {
    /// The connection is live; everything held was queued.
    Live,
    /// Live DMs were dropped while replaying, or one of them follows a hole:
    /// read the inbox again after this.
    ReadAgainAfter(Seq),
}

impl ConnHandle {
    /// A handle and the receiving end of its outbound queue.
    pub fn new(
        id: Arc<str>,
        user: Arc<str>,
        limits: QueueLimits,
    ) -> (Arc<Self>, BoundedReceiver<Outbound>) {
        let (outbound, rx) = bounded(limits.frames, limits.bytes);
        let handle = ConnHandle {
            id,
            user,
            outbound,
            closer: CancellationToken::new(),
            close_reason: OnceLock::new(),
            close_text: OnceLock::new(),
            rooms: Mutex::new(HashSet::new()),
            quiet_rooms: Mutex::new(Vec::new()),
            watching: Mutex::new(HashSet::new()),
            gate: Mutex::new(Gate::Live { last: Seq::ZERO }),
            room_gates: Mutex::new(None),
            repair: Notify::new(),
        };
        (Arc::new(handle), rx)
    }

    /// Queues a frame without waiting. A full queue closes the connection as
    /// a slow consumer; returns whether the frame was queued.
    pub fn send(&self, frame: Outbound, metrics: &Metrics) -> bool {
        match self.outbound.try_send(frame) {
            Ok(()) => true,
            Err(Refused::Full(_)) => {
                metrics.dropped_slow_consumer.inc();
                self.close(CloseReason::SlowConsumer);
                false
            }
            // The writer is gone: the connection is already closing.
            Err(Refused::Closed(_)) => false,
        }
    }

    /// Queues a text frame; see [`ConnHandle::send`].
    pub fn send_text(&self, frame: TextFrame, metrics: &Metrics) -> bool {
        self.send(Outbound::Text(frame), metrics)
    }

    /// Queues a frame, waiting while the outbound queue is more than half
    /// full (an inbox replay paces itself with this). `false` if the
    /// connection is closing.
    pub async fn send_paced(&self, frame: TextFrame, metrics: &Metrics) -> bool {
        let (items, bytes) = self.outbound.budgets();
        let wait = self
            .outbound
            .wait_below(items / 2, bytes.saturating_sub(frame.len()) / 2);
        tokio::select! {
            biased;
            _ = self.closer.cancelled() => return false,
            _ = wait => {}
        }
        self.send_text(frame, metrics)
    }

    /// Waits until the outbound queue is at most half full; `false` if the
    /// connection is closing.
    pub async fn wait_for_room(&self) -> bool {
        let (items, bytes) = self.outbound.budgets();
        tokio::select! {
            biased;
            _ = self.closer.cancelled() => false,
            _ = self.outbound.wait_below(items / 2, bytes / 2) => true,
        }
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hold budget of a replay on this connection.
    fn hold_budget(&self) -> (usize, usize) {
        let (items, bytes) = self.outbound.budgets();
        (HELD_ITEMS.min(items / 2).max(1), HELD_BYTES.min(bytes / 2))
    }

    /// Enters the replay state: from now live stored DMs are held until
    /// [`ConnHandle::finish_replay`]. Call before the connection is
    /// registered and announced in presence.
    pub fn begin_replay(&self, after: Seq) {
        *self.gate() = Gate::replaying(after);
    }

    /// Moves the replay's position (the start, once the cursor is known).
    pub fn replay_from(&self, after: Seq) {
        self.gate().start_at(after);
    }

    /// During a replay: whether the backlog entry `seq` is new to this
    /// connection (and records it as the newest replayed).
    pub fn replay_accepts(&self, seq: Seq) -> bool {
        self.gate().accepts(seq)
    }

    /// Ends the replay after its last read (`newest`: that read's
    /// [`crate::store::Backlog::newest`]): queues the held live DMs newer
    /// than the backlog and goes live, unless some live DM could not be held
    /// or one follows a hole.
    pub fn finish_replay(&self, newest: Option<Seq>, metrics: &Metrics) -> ReplayEnd {
        self.gate()
            .finish(newest, |frame| self.send_text(frame, metrics), metrics)
    }

    /// Offers a live stored DM (`prev`: its predecessor in the inbox, when
    /// known): queued if it is the next one, held if a replay is running,
    /// dropped (counted) if it is a duplicate. One that follows a hole is
    /// held and a repair is requested (see [`ConnHandle::repair_wanted`]).
    /// Returns whether it was queued now.
    pub fn offer_stored(
        &self,
        seq: Seq,
        prev: Option<Seq>,
        frame: &TextFrame,
        metrics: &Metrics,
    ) -> bool {
        let budget = self.hold_budget();
        let offered = self.gate().offer(
            seq,
            prev,
            frame,
            budget,
            |f| self.send_text(f, metrics),
            metrics,
        );
        if offered == Offered::Hole {
            self.repair.notify_one();
        }
        offered == Offered::Queued
    }

    /// Resolves when the gate has asked for a repair; then
    /// [`ConnHandle::take_repair`] says where to read from. Cancel-safe: a
    /// request made while nobody waits is kept for the next wait.
    pub async fn repair_wanted(&self) {
        self.repair.notified().await
    }

    /// Bus messages may have been lost (see
    /// [`ChannelKind::Resubscribed`](crate::bus::ChannelKind)): read the
    /// inbox after the last stored DM this connection has, as for a hole.
    /// A replay already running reads once more at its end.
    pub fn catch_up(&self) {
        let wake = {
            let mut gate = self.gate();
            match &mut *gate {
                Gate::Live { last } => {
                    let mut replay = Replay::after(*last);
                    replay.repair = true;
                    *gate = Gate::Replaying(Box::new(replay));
                    true
                }
                Gate::Replaying(replay) => {
                    replay.overflow = true;
                    false
                }
            }
        };
        if wake {
            self.repair.notify_one();
        }
    }

    /// After a repair read failed: asks for the repair again (it is still
    /// needed), to be taken when the connection retries.
    pub fn rearm_repair(&self) {
        if let Gate::Replaying(replay) = &mut *self.gate() {
            replay.repair = true;
        }
    }

    /// Takes a pending repair request: the inbox must be read after the
    /// returned seq, then the replay finished. `None` if none is pending
    /// (at most one runs at a time).
    pub fn take_repair(&self) -> Option<Seq> {
        self.gate().take_repair()
    }

    fn room_gates(&self) -> std::sync::MutexGuard<'_, Option<Box<RoomGates>>> {
        self.room_gates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A join with `since`: live room messages of `room` are held until
    /// [`ConnHandle::finish_room_replay`]. Call before joining.
    pub fn begin_room_replay(&self, room: &str, after: Seq) {
        self.room_gates()
            .get_or_insert_with(Default::default)
            .insert(Arc::from(room), Gate::replaying(after));
    }

    /// During a room replay: whether history entry `seq` is new here.
    pub fn room_replay_accepts(&self, room: &str, seq: Seq) -> bool {
        match self.room_gates().as_mut().and_then(|g| g.get_mut(room)) {
            Some(gate) => gate.accepts(seq),
            None => true,
        }
    }

    /// Ends a room replay (see [`ConnHandle::finish_replay`]).
    pub fn finish_room_replay(&self, room: &str, metrics: &Metrics) -> ReplayEnd {
        match self.room_gates().as_mut().and_then(|g| g.get_mut(room)) {
            Some(gate) => gate.finish(None, |frame| self.send_text(frame, metrics), metrics),
            None => ReplayEnd::Live,
        }
    }

    /// Forgets a room's gate (on leave, or a join that failed).
    pub fn forget_room_gate(&self, room: &str) {
        let mut gates = self.room_gates();
        if let Some(map) = gates.as_mut() {
            map.remove(room);
            if map.is_empty() {
                *gates = None;
            }
        }
    }

    /// Offers a recorded room message (see [`ConnHandle::offer_stored`]);
    /// a room joined without `since` has no gate: delivered as it comes.
    pub fn offer_room(&self, room: &str, seq: Seq, frame: &TextFrame, metrics: &Metrics) -> bool {
        let budget = self.hold_budget();
        let mut gates = self.room_gates();
        match gates.as_mut().and_then(|g| g.get_mut(room)) {
            // No predecessor: a room gate never asks for a repair.
            Some(gate) => {
                gate.offer(
                    seq,
                    None,
                    frame,
                    budget,
                    |f| self.send_text(f, metrics),
                    metrics,
                ) == Offered::Queued
            }
            None => {
                drop(gates);
                self.send_text(frame.clone(), metrics)
            }
        }
    }

    /// Asks the connection's task to close with this reason.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.close_reason.set(reason);
        self.closer.cancel();
    }

    /// Closes with [`CloseReason::Disconnected`] and `text` as the Close
    /// frame's reason (cut to [`MAX_DISCONNECT_REASON`] bytes at a
    /// character boundary; empty: [`DISCONNECTED`]).
    pub fn disconnect(&self, text: &str) {
        let mut end = text.len().min(MAX_DISCONNECT_REASON);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if end > 0 && self.close_reason.get().is_none() {
            let _ = self.close_text.set(Box::from(&text[..end]));
        }
        self.close(CloseReason::Disconnected);
    }

    /// The Close frame's code and reason text for the reason this
    /// connection was closed with.
    pub fn close_frame(&self) -> Option<(u16, &str)> {
        let reason = self.close_reason()?;
        let (code, text) = reason.code_and_reason();
        match (reason, self.close_text.get()) {
            (CloseReason::Disconnected, Some(given)) => Some((code, given)),
            _ => Some((code, text)),
        }
    }

    /// Resolves when the server decided to close this connection.
    pub fn closer(&self) -> &CancellationToken {
        &self.closer
    }

    /// The reason given to [`ConnHandle::close`], if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason.get().copied()
    }

    /// Whether this connection has joined `room`.
    pub fn is_member(&self, room: &str) -> bool {
        self.rooms.lock().map(|r| r.contains(room)).unwrap_or(false)
    }

    /// Whether this connection gets `room`'s member events.
    pub fn room_events(&self, room: &str) -> bool {
        self.quiet_rooms
            .lock()
            .map(|q| !q.iter().any(|r| &**r == room))
            .unwrap_or(true)
    }

    /// Turns `room`'s member events on or off for this connection.
    pub fn set_room_events(&self, room: &str, on: bool) {
        if let Ok(mut quiet) = self.quiet_rooms.lock() {
            quiet.retain(|r| &**r != room);
            if !on {
                quiet.push(Arc::from(room));
            }
        }
    }

    /// Adds `users` to the watched set unless that would exceed `max`;
    /// returns the users that were not watched yet, or `None` when over.
    pub fn add_watches(&self, users: &[String], max: usize) -> Option<Vec<Arc<str>>> {
        let mut watching = self.watching.lock().ok()?;
        let mut fresh: Vec<Arc<str>> = users
            .iter()
            .filter(|u| !watching.contains(u.as_str()))
            .map(|u| Arc::from(u.as_str()))
            .collect();
        fresh.sort_unstable();
        fresh.dedup();
        if watching.len() + fresh.len() > max {
            return None;
        }
        watching.extend(fresh.iter().cloned());
        Some(fresh)
    }

    /// Removes `users` from the watched set; returns those it held.
    pub fn remove_watches(&self, users: &[String]) -> Vec<Arc<str>> {
        let Ok(mut watching) = self.watching.lock() else {
            return Vec::new();
        };
        let mut gone: Vec<Arc<str>> = users
            .iter()
            .filter_map(|u| watching.take(u.as_str()))
            .collect();
        gone.sort_unstable();
        gone.dedup();
        gone
    }

    /// Every watched user, emptying the set (the connection closes).
    pub fn take_watches(&self) -> Vec<Arc<str>> {
        self.watching
            .lock()
            .map(|mut w| w.drain().collect())
            .unwrap_or_default()
    }

    /// Whether this connection watches `user`.
    pub fn watches(&self, user: &str) -> bool {
        self.watching
            .lock()
            .map(|w| w.contains(user))
            .unwrap_or(false)
    }

    fn add_room(&self, room: &Arc<str>) -> bool {
        self.rooms
            .lock()
            .map(|mut r| r.insert(room.clone()))
            .unwrap_or(false)
    }

    fn remove_room(&self, room: &str) -> bool {
        self.rooms
            .lock()
            .map(|mut r| r.remove(room))
            .unwrap_or(false)
    }

    /// How many rooms this connection has joined.
    pub fn room_count(&self) -> usize {
        self.rooms.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// The rooms joined, for cleanup on disconnect.
    pub fn rooms(&self) -> Vec<Arc<str>> {
        self.rooms
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// The connections of this instance, indexed by user and by room.
#[derive(Debug, Default)]
pub struct Registry {
    users: DashMap<Arc<str>, Vec<Arc<ConnHandle>>>,
    rooms: DashMap<Arc<str>, Vec<Arc<ConnHandle>>>,
    next_conn: AtomicU64,
}

/// Hands a frame to every connection listed under `key` but `except`, with
/// `offer` (which queues it, or holds or drops it), counting what was
/// queued. The handles are cloned out first, so no map lock is held while
/// queueing. Returns (queued, connections listed).
fn fan_out(
    map: &DashMap<Arc<str>, Vec<Arc<ConnHandle>>>,
    key: &str,
    except: Option<&str>,
    metrics: &Metrics,
    offer: impl Fn(&ConnHandle) -> bool,
) -> (usize, usize) {
    let conns: Vec<Arc<ConnHandle>> = match map.get(key) {
        Some(conns) => conns.clone(),
        None => return (0, 0),
    };
    let queued = conns
        .iter()
        .filter(|c| Some(&*c.id) != except)
        .filter(|c| offer(c))
        .count();
    metrics.delivered.inc_by(queued as u64);
    (queued, conns.len())
}

/// Maps smaller than this are never shrunk (not worth the rehash).
const SHRINK_ABOVE: usize = 1024;

/// Gives back a map's table once at most a quarter of it is used: after a
/// spike of connections closes, the per-user and per-room tables would
/// otherwise keep their peak size for the life of the process. Each shrink
/// halves the table at least, so the rehash costs stay amortized O(1) per
/// removal.
pub fn shrink_if_sparse<K, V, S>(map: &DashMap<K, V, S>)
where
    K: Eq + std::hash::Hash,
    S: std::hash::BuildHasher + Clone,
{
    let capacity = map.capacity();
    if capacity > SHRINK_ABOVE && map.len() * 4 < capacity {
        map.shrink_to_fit();
    }
}

/// What a membership change did to the instance's set of local rooms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomChange {
    /// The first local member joined: subscribe to the room channel.
    FirstJoined,
    /// The last local member left: unsubscribe.
    LastLeft,
    /// Membership changed, the set of local rooms did not.
    Unchanged,
    /// Nothing changed (already a member, or not one).
    Noop,
}

impl Registry {
    /// A fresh connection id for this instance.
    pub fn next_conn_id(&self, instance: &str) -> Arc<str> {
        let n = self.next_conn.fetch_add(1, Ordering::Relaxed);
        Arc::from(format!("{instance}/{n}"))
    }

    /// Adds a connection; returns how many connections its user now has here.
    pub fn insert(&self, conn: &Arc<ConnHandle>) -> usize {
        let mut entry = self.users.entry(conn.user.clone()).or_default();
        entry.push(conn.clone());
        entry.len()
    }

    /// Removes a connection; returns how many connections its user still has here.
    pub fn remove(&self, conn: &ConnHandle) -> usize {
        let left = match self.users.get_mut(&conn.user) {
            Some(mut conns) => {
                conns.retain(|c| c.id != conn.id);
                conns.len()
            }
            None => 0,
        };
        if left == 0 {
            self.users
                .remove_if(&conn.user, |_, conns| conns.is_empty());
            shrink_if_sparse(&self.users);
        }
        left
    }

    /// Every local connection of `user` (a copy: no map lock is held).
    pub fn connections_of(&self, user: &str) -> Vec<Arc<ConnHandle>> {
        self.users
            .get(user)
            .map(|conns| conns.clone())
            .unwrap_or_default()
    }

    /// Queues `frame` on every local connection of `user`; returns how many.
    pub fn deliver_to_user(&self, user: &str, frame: &TextFrame, metrics: &Metrics) -> usize {
        fan_out(&self.users, user, None, metrics, |c| {
            c.send_text(frame.clone(), metrics)
        })
        .0
    }

    /// Offers a stored DM to every local connection of `user` (see
    /// [`ConnHandle::offer_stored`]); returns how many connections hold the
    /// user here.
    pub fn deliver_stored(
        &self,
        user: &str,
        seq: Seq,
        prev: Option<Seq>,
        frame: &TextFrame,
        metrics: &Metrics,
    ) -> usize {
        fan_out(&self.users, user, None, metrics, |c| {
            c.offer_stored(seq, prev, frame, metrics)
        })
        .1
    }

    /// How many connections `user` has here.
    pub fn user_connection_count(&self, user: &str) -> usize {
        self.users.get(user).map(|conns| conns.len()).unwrap_or(0)
    }

    /// Asks every connection to catch up from its inbox (see
    /// [`ConnHandle::catch_up`]); returns how many were asked.
    pub fn catch_up_all(&self) -> usize {
        let conns: Vec<Arc<ConnHandle>> = self
            .users
            .iter()
            .flat_map(|entry| entry.value().clone())
            .collect();
        for conn in &conns {
            conn.catch_up();
        }
        conns.len()
    }

    /// Whether `user` has a connection here.
    pub fn holds(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Adds `conn` to `room`.
    pub fn join(&self, room: &str, conn: &Arc<ConnHandle>) -> RoomChange {
        let room: Arc<str> = Arc::from(room);
        if !conn.add_room(&room) {
            return RoomChange::Noop;
        }
        let mut members = self.rooms.entry(room).or_default();
        members.push(conn.clone());
        if members.len() == 1 {
            RoomChange::FirstJoined
        } else {
            RoomChange::Unchanged
        }
    }

    /// Removes `conn` from `room`.
    pub fn leave(&self, room: &str, conn: &ConnHandle) -> RoomChange {
        conn.forget_room_gate(room);
        if !conn.remove_room(room) {
            return RoomChange::Noop;
        }
        conn.set_room_events(room, true);
        let left = match self.rooms.get_mut(room) {
            Some(mut members) => {
                members.retain(|c| c.id != conn.id);
                members.len()
            }
            None => 0,
        };
        if left == 0 {
            self.rooms.remove_if(room, |_, members| members.is_empty());
            shrink_if_sparse(&self.rooms);
            RoomChange::LastLeft
        } else {
            RoomChange::Unchanged
        }
    }

    /// How many local connections of `user` are in `room`.
    pub fn user_members(&self, room: &str, user: &str) -> usize {
        self.rooms
            .get(room)
            .map(|members| members.iter().filter(|c| &*c.user == user).count())
            .unwrap_or(0)
    }

    /// Queues a member event on every local member of `room` that wants
    /// them; returns how many.
    pub fn deliver_member_event(&self, room: &str, frame: &TextFrame, metrics: &Metrics) -> usize {
        fan_out(&self.rooms, room, None, metrics, |c| {
            c.room_events(room) && c.send_text(frame.clone(), metrics)
        })
        .0
    }

    /// Whether any local connection is in `room`.
    pub fn has_room(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    /// Queues `frame` on every local member of `room` except `except`.
    pub fn deliver_to_room(
        &self,
        room: &str,
        except: Option<&str>,
        frame: &TextFrame,
        metrics: &Metrics,
    ) -> usize {
        fan_out(&self.rooms, room, except, metrics, |c| {
            c.send_text(frame.clone(), metrics)
        })
        .0
    }

    /// Offers a recorded room message to every local member of `room`
    /// except `except` (see [`ConnHandle::offer_room`]).
    pub fn deliver_room_stored(
        &self,
        room: &str,
        except: Option<&str>,
        seq: Seq,
        frame: &TextFrame,
        metrics: &Metrics,
    ) -> usize {
        fan_out(&self.rooms, room, except, metrics, |c| {
            c.offer_room(room, seq, frame, metrics)
        })
        .0
    }

    /// Number of open local connections.
    pub fn connection_count(&self) -> usize {
        self.users.iter().map(|e| e.value().len()).sum()
    }

    /// Number of distinct local users.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Number of rooms with a local member.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(
        reg: &Registry,
        user: &str,
        cap: usize,
    ) -> (Arc<ConnHandle>, BoundedReceiver<Outbound>) {
        let limits = QueueLimits {
            frames: cap,
            bytes: 1 << 20,
        };
        ConnHandle::new(reg.next_conn_id("i1"), Arc::from(user), limits)
    }

    fn text(s: &'static str) -> TextFrame {
        TextFrame::from(s)
    }

    #[test]
    fn users_and_rooms() {
        let reg = Registry::default();
        let m = Metrics::new();
        let (a1, mut rx1) = conn(&reg, "alice", 4);
        let (a2, mut rx2) = conn(&reg, "alice", 4);
        assert_eq!(reg.insert(&a1), 1);
        assert_eq!(reg.insert(&a2), 2);
        assert_eq!(reg.deliver_to_user("alice", &text("x"), &m), 2);
        assert!(rx1.try_recv().is_some() && rx2.try_recv().is_some());
        // Replies queued with `send` are not message deliveries.
        assert!(a1.send(Outbound::Text(text("ack")), &m));
        assert_eq!(m.delivered.get(), 2);
        assert!(rx1.try_recv().is_some());

        assert_eq!(reg.join("lobby", &a1), RoomChange::FirstJoined);
        assert_eq!(reg.join("lobby", &a1), RoomChange::Noop);
        assert_eq!(reg.join("lobby", &a2), RoomChange::Unchanged);
        assert_eq!(
            reg.deliver_to_room("lobby", Some(&a1.id), &text("y"), &m),
            1
        );
        assert!(rx1.try_recv().is_none());
        assert!(rx2.try_recv().is_some());
        assert_eq!(m.delivered.get(), 3);
        assert_eq!(reg.leave("lobby", &a1), RoomChange::Unchanged);
        assert_eq!(reg.leave("lobby", &a2), RoomChange::LastLeft);
        assert!(!reg.has_room("lobby"));

        assert_eq!(reg.remove(&a1), 1);
        assert_eq!(reg.remove(&a2), 0);
        assert!(!reg.holds("alice"));
    }

    fn seq(n: u64) -> Seq {
        Seq { ms: 1, n }
    }

    fn stored(n: u64) -> TextFrame {
        TextFrame::from(format!("{{\"type\":\"dm\",\"seq\":\"{}\"}}", seq(n)))
    }

    /// Offers stored DM `n` whose predecessor is `prev` (0: none before).
    fn offer(c: &ConnHandle, n: u64, prev: u64, m: &Metrics) -> bool {
        let prev = if prev == 0 { Seq::ZERO } else { seq(prev) };
        c.offer_stored(seq(n), Some(prev), &stored(n), m)
    }

    /// What a replay read of entries `ns` does on the connection.
    fn read_back(c: &ConnHandle, ns: &[u64], m: &Metrics) {
        for &n in ns {
            if c.replay_accepts(seq(n)) {
                assert!(c.send_text(stored(n), m));
            }
        }
    }

    fn queued(rx: &mut BoundedReceiver<Outbound>) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(Outbound::Text(f)) = rx.try_recv() {
            out.push(f.as_str().to_owned());
        }
        out
    }

    fn frames_of(ns: &[u64]) -> Vec<String> {
        ns.iter().map(|&n| stored(n).as_str().to_owned()).collect()
    }

    #[test]
    fn a_stored_dm_after_a_hole_is_held_and_the_inbox_read_after_the_last_had() {
        let reg = Registry::default();
        let m = Metrics::new();
        let (c, mut rx) = conn(&reg, "bob", 16);
        assert!(offer(&c, 1, 0, &m), "in order");
        assert!(!offer(&c, 1, 0, &m), "a duplicate");
        assert!(!offer(&c, 3, 2, &m), "2 is missing: held");
        assert!(!offer(&c, 4, 3, &m), "held behind it");
        assert_eq!(queued(&mut rx), frames_of(&[1]));
        assert_eq!(c.take_repair(), Some(seq(1)), "read after 1");
        assert_eq!(c.take_repair(), None, "one repair at a time");
        // The repair's read: 2, 3 (4 was appended after it).
        read_back(&c, &[2, 3], &m);
        assert_eq!(c.finish_replay(Some(seq(3)), &m), ReplayEnd::Live);
        assert_eq!(queued(&mut rx), frames_of(&[2, 3, 4]));
        assert!(offer(&c, 5, 4, &m), "live again");
        assert_eq!(m.dropped_duplicate.get(), 2);
    }

    #[test]
    fn a_late_dm_that_closes_the_hole_before_the_repair_needs_no_read() {
        let reg = Registry::default();
        let m = Metrics::new();
        let (c, mut rx) = conn(&reg, "bob", 16);
        assert!(!offer(&c, 2, 1, &m));
        assert!(!offer(&c, 3, 2, &m));
        assert!(queued(&mut rx).is_empty());
        assert!(!offer(&c, 1, 0, &m), "queued with the held ones behind it");
        assert_eq!(queued(&mut rx), frames_of(&[1, 2, 3]));
        assert_eq!(m.delivered.get(), 3);
        assert_eq!(c.take_repair(), None, "nothing to repair");
        assert!(offer(&c, 4, 3, &m));
    }

    #[test]
    fn held_dms_are_queued_in_seq_order_and_a_hole_at_the_end_reads_again() {
        let reg = Registry::default();
        let m = Metrics::new();
        let (c, mut rx) = conn(&reg, "bob", 16);
        c.begin_replay(Seq::ZERO);
        // Arrived during the replay, out of order; 3 never arrives.
        assert!(!offer(&c, 2, 1, &m));
        assert!(!offer(&c, 4, 3, &m));
        assert!(!offer(&c, 1, 0, &m));
        assert_eq!(c.take_repair(), None, "the replay is running anyway");
        // The backlog read happened before any of them was appended.
        assert_eq!(
            c.finish_replay(Some(Seq::ZERO), &m),
            ReplayEnd::ReadAgainAfter(seq(2))
        );
        assert_eq!(queued(&mut rx), frames_of(&[1, 2]));
        read_back(&c, &[3, 4], &m);
        assert_eq!(c.finish_replay(Some(seq(4)), &m), ReplayEnd::Live);
        assert_eq!(queued(&mut rx), frames_of(&[3, 4]));
    }

    #[test]
    fn a_hole_the_store_cannot_fill_is_announced_not_read_forever() {
        let reg = Registry::default();
        let m = Metrics::new();
        let (c, mut rx) = conn(&reg, "bob", 16);
        assert!(offer(&c, 1, 0, &m));
        assert!(!offer(&c, 3, 2, &m));
        assert_eq!(c.take_repair(), Some(seq(1)));
        // The store has nothing after 1 (it lost 2 and 3, and knows no newest).
        assert_eq!(c.finish_replay(None, &m), ReplayEnd::ReadAgainAfter(seq(1)));
        assert_eq!(c.finish_replay(None, &m), ReplayEnd::Live);
        let mut want = frames_of(&[1]);
        want.push(r#"{"type":"gap","after":"1-1","first":"1-3"}"#.to_owned());
        want.extend(frames_of(&[3]));
        assert_eq!(queued(&mut rx), want);
        assert_eq!(m.inbox_gaps.get(), 1);
    }

    #[test]
    fn the_newest_seq_of_the_last_read_counts_as_had() {
        let reg = Registry::default();
        let m = Metrics::new();
        let (c, mut rx) = conn(&reg, "bob", 16);
        c.begin_replay(Seq::ZERO);
        // 1..=5 were trimmed (the read reported a gap); 5 is the newest.
        assert_eq!(c.finish_replay(Some(seq(5)), &m), ReplayEnd::Live);
        assert!(offer(&c, 6, 5, &m), "follows the newest: no hole");
        assert_eq!(c.take_repair(), None);
        assert_eq!(queued(&mut rx), frames_of(&[6]));
    }

    #[test]
    fn without_a_predecessor_stored_dms_are_taken_in_seq_order() {
        let reg = Registry::default();
        let m = Metrics::new();
        let (c, mut rx) = conn(&reg, "bob", 16);
        assert!(c.offer_stored(seq(2), None, &stored(2), &m));
        assert!(!c.offer_stored(seq(1), None, &stored(1), &m), "as before");
        assert_eq!(c.take_repair(), None);
        assert_eq!(queued(&mut rx), frames_of(&[2]));
    }

    #[test]
    fn a_spike_of_connections_leaves_no_big_table_behind() {
        let reg = Registry::default();
        let conns: Vec<_> = (0..5000)
            .map(|n| {
                let (c, rx) = conn(&reg, &format!("u{n}"), 4);
                reg.insert(&c);
                (c, rx)
            })
            .collect();
        let peak = reg.users.capacity();
        for (c, _) in &conns {
            reg.remove(c);
        }
        assert!(
            reg.users.capacity() < peak / 4,
            "{} of {peak}",
            reg.users.capacity()
        );
    }

    #[test]
    fn full_queue_closes_as_slow_consumer() {
        let reg = Registry::default();
        let m = Metrics::new();
        let (a, _rx) = conn(&reg, "alice", 1);
        reg.insert(&a);
        assert_eq!(reg.deliver_to_user("alice", &text("1"), &m), 1);
        assert_eq!(reg.deliver_to_user("alice", &text("2"), &m), 0);
        assert!(a.closer().is_cancelled());
        assert_eq!(a.close_reason(), Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn the_byte_budget_closes_a_slow_consumer_too() {
        let reg = Registry::default();
        let m = Metrics::new();
        let limits = QueueLimits {
            frames: 100,
            bytes: 10,
        };
        let (a, _rx) = ConnHandle::new(reg.next_conn_id("i1"), Arc::from("alice"), limits);
        reg.insert(&a);
        assert_eq!(reg.deliver_to_user("alice", &text("123456"), &m), 1);
        assert_eq!(reg.deliver_to_user("alice", &text("123456"), &m), 0);
        assert_eq!(a.close_reason(), Some(CloseReason::SlowConsumer));
    }
}
