//! Property tests: the frame parser, the bus envelope and the router must not
//! panic or misbehave on any input. Compiled only for `cargo test`.

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::value::RawValue;

use crate::bus::{Envelope, Inbound};
use crate::local::{LocalBackend, LocalHub};
use crate::metrics::Metrics;
use crate::protocol::{self, ErrorCode, Request};
use crate::queue::{bounded, BoundedReceiver};
use crate::registry::{ConnHandle, Outbound, QueueLimits};
use crate::router::{Router, RoutingMode};

/// JSON-ish text: valid frames, near-misses and garbage.
fn frame_text() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        Just("dm"),
        Just("join"),
        Just("leave"),
        Just("room"),
        Just("presence"),
        Just("ping"),
        Just("refresh"),
        Just("x")
    ];
    let value = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        Just("1e400".to_owned()),
        Just("-0.0".to_owned()),
        "[a-zA-Z0-9_.:@ {}\\[\\]\"\\\\-]{0,80}"
            .prop_map(|s| serde_json::Value::String(s).to_string()),
        "[\\[{]{0,200}".prop_map(|s| s),
        Just("[\"a\",\"b\"]".to_owned()),
    ];
    prop_oneof![
        (kind, value.clone(), value.clone(), value.clone(), value).prop_map(|(k, to, body, id, users)| {
            format!(r#"{{"type":"{k}","to":{to},"room":{to},"body":{body},"id":{id},"users":{users},"token":{body},"extra":1}}"#)
        }),
        any::<String>(),
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn parsing_any_text_never_panics_and_names_are_valid(text in frame_text()) {
        let incoming = protocol::parse(&text);
        match incoming.request {
            Ok(Request::Direct { to, body, .. }) => {
                prop_assert!(protocol::validate_name(&to).is_ok());
                // The body is valid JSON, kept verbatim from the input.
                prop_assert!(text.contains(body.get()));
                prop_assert!(serde_json::from_str::<serde_json::Value>(body.get()).is_ok());
            }
            Ok(Request::Join { room, .. } | Request::Leave { room } | Request::Room { room, .. } | Request::Members { room }) => {
                prop_assert!(protocol::validate_name(&room).is_ok());
            }
            Ok(Request::Presence { users }) => {
                prop_assert!(users.len() <= protocol::MAX_PRESENCE_USERS);
                for user in users {
                    prop_assert!(protocol::validate_name(&user).is_ok());
                }
            }
            Ok(Request::Watch { users } | Request::Unwatch { users }) => {
                prop_assert!(users.len() <= protocol::MAX_WATCH_USERS);
                for user in users {
                    prop_assert!(protocol::validate_name(&user).is_ok());
                }
            }
            Ok(Request::Recv { seq }) => {
                prop_assert_eq!(crate::store::Seq::parse(&seq.to_string()), Some(seq));
            }
            Ok(Request::Ping) => {}
            Ok(Request::Refresh { token }) => {
                prop_assert!(!token.is_empty() && token.len() <= protocol::MAX_TOKEN_LEN);
            }
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
    }

    /// The seam at one connection: live stored DMs arrive in seq order
    /// (some also duplicated) without their predecessor (a sender that does
    /// not write it), a replay of the inbox runs across any prefix of them
    /// and is read in pages; whatever the interleaving, the connection
    /// queues every seq once, in order.
    #[test]
    fn the_seq_gate_queues_each_stored_dm_once_in_order(
        total in 1usize..60,
        live_from in 0usize..60,
        replay_at in 0usize..60,
        page in 1usize..20,
        dup_every in 1usize..7,
    ) {
        use crate::store::Seq;
        let metrics = Metrics::new();
        // A small byte budget: the hold overflows (and the replay re-reads)
        // when more than a few live DMs arrive during the replay.
        let (conn, mut rx) = ConnHandle::new(Arc::from("c/1"), Arc::from("bob"), QueueLimits { frames: 64, bytes: 400 });
        let mut got = Vec::new();
        let drain = |rx: &mut BoundedReceiver<Outbound>, got: &mut Vec<String>| {
            while let Some(Outbound::Text(f)) = rx.try_recv() {
                got.push(f.as_str().to_owned());
            }
        };
        let seqs: Vec<Seq> = (1..=total as u64).map(|n| Seq { ms: 10, n }).collect();
        let frame = |s: Seq| crate::protocol::TextFrame::from(format!("{{\"seq\":\"{s}\"}}"));
        // Before the connection exists, DMs 0..live_from are only in the inbox.
        let live_from = live_from.min(total);
        let replay_at = replay_at.clamp(live_from, total);
        conn.begin_replay(Seq::ZERO);
        // Live DMs up to replay_at arrive while the backlog is being read.
        let mut live = live_from;
        let mut replayed = 0;
        // The inbox read sees everything appended before it: here, up to `live`.
        while live < replay_at {
            conn.offer_stored(seqs[live], None, &frame(seqs[live]), &metrics);
            if live % dup_every == 0 {
                conn.offer_stored(seqs[live], None, &frame(seqs[live]), &metrics);
            }
            live += 1;
        }
        let overflowed = replay_at - live_from > 9;
        let mut after = Seq::ZERO;
        loop {
            let visible = &seqs[..live];
            let batch: Vec<Seq> = visible.iter().copied().filter(|s| *s > after).take(page).collect();
            for s in &batch {
                if conn.replay_accepts(*s) {
                    prop_assert!(conn.send_text(frame(*s), &metrics));
                    replayed += 1;
                }
                drain(&mut rx, &mut got);
                after = *s;
            }
            if batch.len() == page {
                continue;
            }
            match conn.finish_replay(None, &metrics) {
                crate::registry::ReplayEnd::Live => break,
                crate::registry::ReplayEnd::ReadAgainAfter(s) => after = s,
            }
        }
        drain(&mut rx, &mut got);
        prop_assert!(replayed <= total);
        prop_assert!(!overflowed || replayed >= replay_at - live_from, "an overflowing hold is re-read, not lost");
        // Then the rest live, with duplicates.
        while live < total {
            conn.offer_stored(seqs[live], None, &frame(seqs[live]), &metrics);
            conn.offer_stored(seqs[live], None, &frame(seqs[live]), &metrics);
            drain(&mut rx, &mut got);
            live += 1;
        }
        prop_assert!(conn.close_reason().is_none(), "never a slow consumer here");
        let want: Vec<String> = seqs.iter().map(|s| frame(*s).as_str().to_owned()).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn huge_and_odd_names_are_refused_precisely(name in "\\PC{0,200}") {
        let frame = serde_json::json!({"type": "join", "room": name}).to_string();
        let valid = protocol::validate_name(&name).is_ok();
        match protocol::parse(&frame).request {
            Ok(_) => prop_assert!(valid),
            Err(e) => {
                prop_assert!(!valid);
                prop_assert_eq!(e.code, ErrorCode::InvalidName);
            }
        }
    }

    #[test]
    fn envelope_decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Some((_, at)) = Envelope::decode(&bytes) {
            prop_assert!(at <= bytes.len());
        }
    }
}

/// One step of a random workload against three in-process instances.
#[derive(Debug, Clone)]
enum Op {
    Connect { instance: usize, user: usize },
    Disconnect { pick: usize },
    Join { pick: usize, room: usize },
    Leave { pick: usize, room: usize },
    Dm { pick: usize, to: usize },
    Room { pick: usize, room: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, 0..6usize).prop_map(|(instance, user)| Op::Connect { instance, user }),
        2 => any::<usize>().prop_map(|pick| Op::Disconnect { pick }),
        2 => (any::<usize>(), 0..3usize).prop_map(|(pick, room)| Op::Join { pick, room }),
        1 => (any::<usize>(), 0..3usize).prop_map(|(pick, room)| Op::Leave { pick, room }),
        3 => (any::<usize>(), 0..7usize).prop_map(|(pick, to)| Op::Dm { pick, to }),
        2 => (any::<usize>(), 0..3usize).prop_map(|(pick, room)| Op::Room { pick, room }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    /// Whatever happens, presence equals the truth of the registries, every
    /// DM to a connected user is acked `routed` and to an absent one `offline`.
    #[test]
    fn router_keeps_presence_true(ops in proptest::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let Ok(runtime) = runtime else { return Err(TestCaseError::fail("runtime")) };
        runtime.block_on(async move {
            let hub = Arc::new(LocalHub::default());
            let mut routers = Vec::new();
            for i in 0..3 {
                let id = format!("i{i}");
                let metrics = Metrics::new();
                let (tx, mut rx) = bounded::<Inbound>(4096, 16 << 20);
                let backend = Arc::new(LocalBackend::new(hub.clone(), &id, tx, metrics.clone()));
                let router = Arc::new(Router::new(&id, RoutingMode::Routed, backend.clone(), backend, Arc::default(), metrics));
                router.start().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                let r = router.clone();
                tokio::spawn(async move {
                    while let Some(inbound) = rx.recv().await {
                        r.handle_inbound(inbound);
                    }
                });
                routers.push(router);
            }
            let body = RawValue::from_string("{}".to_owned()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            // (instance, handle, receiver): receivers are kept so queues stay open.
            let mut conns: Vec<(usize, Arc<ConnHandle>, BoundedReceiver<Outbound>)> = Vec::new();
            let limits = QueueLimits { frames: 4096, bytes: 16 << 20 };
            for op in ops {
                match op {
                    Op::Connect { instance, user } => {
                        let r = &routers[instance];
                        let (h, rx) = ConnHandle::new(r.registry().next_conn_id(r.instance()), Arc::from(format!("u{user}")), limits);
                        r.connect(&h).await;
                        conns.push((instance, h, rx));
                    }
                    Op::Disconnect { pick } if !conns.is_empty() => {
                        let (instance, h, _) = conns.remove(pick % conns.len());
                        routers[instance].disconnect(&h).await;
                    }
                    Op::Join { pick, room } if !conns.is_empty() => {
                        let (instance, h, _) = &conns[pick % conns.len()];
                        let room = format!("r{room}");
                        prop_assert!(routers[*instance].join(h, &room).await.is_ok());
                    }
                    Op::Leave { pick, room } if !conns.is_empty() => {
                        let (instance, h, _) = &conns[pick % conns.len()];
                        routers[*instance].leave(h, &format!("r{room}")).await;
                    }
                    Op::Dm { pick, to } if !conns.is_empty() => {
                        let (instance, h, _) = &conns[pick % conns.len()];
                        let to = format!("u{to}");
                        let online = conns.iter().any(|(_, c, _)| *c.user == *to);
                        let outcome = routers[*instance].send_direct(&h.user, &to, &body).await
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert_eq!(outcome.status == protocol::DirectStatus::Routed, online);
                    }
                    Op::Room { pick, room } if !conns.is_empty() => {
                        let (instance, h, _) = &conns[pick % conns.len()];
                        let room = format!("r{room}");
                        let result = routers[*instance].send_room_as_member(h, &room, &body).await;
                        prop_assert_eq!(result.is_ok(), h.is_member(&room));
                    }
                    _ => {}
                }
            }
            // Presence == truth, per user and instance.
            let mut truth: HashMap<(String, String), u32> = HashMap::new();
            for (instance, h, _) in &conns {
                *truth.entry((h.user.to_string(), format!("i{instance}"))).or_default() += 1;
            }
            let users: Vec<String> = (0..7).map(|u| format!("u{u}")).collect();
            let located = routers[0].presence().locate_many(&users).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
            for (user, holders) in users.iter().zip(located) {
                for holder in &holders {
                    let expected = truth.get(&(user.clone(), holder.instance.to_string())).copied().unwrap_or(0);
                    prop_assert_eq!(holder.connections, expected, "{} on {}", user, holder.instance);
                }
                let expected_total: u32 = truth.iter().filter(|((u, _), _)| u == user).map(|(_, n)| n).sum();
                prop_assert_eq!(holders.iter().map(|h| h.connections).sum::<u32>(), expected_total);
            }
            Ok(())
        })?;
    }
}

/// One step of the bus between the store and one connection of bob's.
#[derive(Debug, Clone)]
enum Live {
    /// A DM to bob is stored (and published: its bus message is in flight).
    Send,
    /// The in-flight message `pick` arrives (any order: cluster mode).
    Arrive { pick: usize },
    /// The in-flight message `pick` arrives and stays in flight (a copy).
    Copy { pick: usize },
    /// The in-flight message `pick` is lost (pub/sub is at-most-once).
    Lose { pick: usize },
    /// The connection's task gets round to the repair its gate asked for.
    Repair,
}

fn live() -> impl Strategy<Value = Live> {
    prop_oneof![
        4 => Just(Live::Send),
        4 => any::<usize>().prop_map(|pick| Live::Arrive { pick }),
        1 => any::<usize>().prop_map(|pick| Live::Copy { pick }),
        1 => any::<usize>().prop_map(|pick| Live::Lose { pick }),
        2 => Just(Live::Repair),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    /// The seq chain with the store as truth: stored DMs to bob reach his
    /// connection's instance in any order, some twice, some never; the
    /// backlog is replayed at any point; the connection repairs holes when
    /// its task gets to it. Once one more DM has arrived after everything
    /// (a loss is noticed by the next DM) and the repairs are done, the
    /// connection has every stored DM exactly once, in seq order.
    #[test]
    fn every_stored_dm_reaches_the_connection_once_in_order_whatever_the_bus_does(
        before in 0usize..8,
        ops in proptest::collection::vec(live(), 0..80),
        replay_at in 0usize..80,
    ) {
        use crate::protocol::DmOptions;
        use crate::router::ReplayStart;
        use crate::store::Seq;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let Ok(runtime) = runtime else { return Err(TestCaseError::fail("runtime")) };
        runtime.block_on(async move {
            let fail = |e: &dyn std::fmt::Display| TestCaseError::fail(e.to_string());
            let hub = Arc::new(LocalHub::default());
            let metrics = Metrics::new();
            let (tx, mut bus) = bounded::<Inbound>(4096, 16 << 20);
            let backend = Arc::new(LocalBackend::new(hub, "i1", tx, metrics.clone()));
            let router = Router::new("i1", RoutingMode::Routed, backend.clone(), backend.clone(), Arc::default(), metrics.clone())
                .with_store(backend);
            router.start().await.map_err(|e| fail(&e))?;
            let body = RawValue::from_string("{}".to_owned()).map_err(|e| fail(&e))?;
            let options = DmOptions::default();
            let mut stored: Vec<Seq> = Vec::new();
            // Bob was seen; DMs sent while he is away are only in the inbox.
            router.read_inbox("bob", None, 1, true).await.map_err(|e| fail(&e))?;
            for _ in 0..before {
                let out = router.send_dm("alice", "bob", &body, &options).await.map_err(|e| fail(&e))?;
                stored.extend(out.seq);
            }
            // A small queue: the hold overflows (and the inbox is read
            // again) when more than a few DMs arrive during a replay.
            let limits = QueueLimits { frames: 64, bytes: 4096 };
            let (conn, mut rx) = ConnHandle::new(Arc::from("i1/0"), Arc::from("bob"), limits);
            let got = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
            let sink = got.clone();
            // The writer: drains the queue as a socket would.
            tokio::spawn(async move {
                while let Some(Outbound::Text(frame)) = rx.recv().await {
                    sink.lock().map_err(|_| ()).map(|mut g| g.push(frame.as_str().to_owned())).ok();
                }
            });
            conn.begin_replay(Seq::ZERO);
            router.connect(&conn).await;
            let mut in_flight: Vec<Inbound> = Vec::new();
            let mut replayed = false;
            let settle = || tokio::task::yield_now();
            for (i, op) in ops.into_iter().enumerate() {
                if i == replay_at {
                    router.replay_inbox(&conn, ReplayStart::Connect(None)).await.map_err(|e| fail(&e))?;
                    replayed = true;
                }
                match op {
                    Live::Send => {
                        let out = router.send_dm("alice", "bob", &body, &options).await.map_err(|e| fail(&e))?;
                        stored.extend(out.seq);
                        while let Some(inbound) = bus.try_recv() {
                            in_flight.push(inbound);
                        }
                    }
                    Live::Arrive { pick } if !in_flight.is_empty() => {
                        router.handle_inbound(in_flight.remove(pick % in_flight.len()));
                    }
                    Live::Copy { pick } if !in_flight.is_empty() => {
                        router.handle_inbound(in_flight[pick % in_flight.len()].clone());
                    }
                    Live::Lose { pick } if !in_flight.is_empty() => {
                        in_flight.remove(pick % in_flight.len());
                    }
                    Live::Repair if replayed => {
                        router.repair_inbox(&conn).await.map_err(|e| fail(&e))?;
                    }
                    _ => {}
                }
                settle().await;
            }
            if !replayed {
                router.replay_inbox(&conn, ReplayStart::Connect(None)).await.map_err(|e| fail(&e))?;
            }
            for inbound in in_flight.drain(..) {
                router.handle_inbound(inbound);
                settle().await;
            }
            // One more DM, delivered: a loss before it shows as a hole.
            let out = router.send_dm("alice", "bob", &body, &options).await.map_err(|e| fail(&e))?;
            stored.extend(out.seq);
            while let Some(inbound) = bus.try_recv() {
                router.handle_inbound(inbound);
            }
            while router.repair_inbox(&conn).await.map_err(|e| fail(&e))? {
                settle().await;
            }
            prop_assert!(conn.wait_for_room().await);
            for _ in 0..4 {
                settle().await;
            }
            prop_assert!(conn.close_reason().is_none(), "never a slow consumer here");
            prop_assert!(conn.take_repair().is_none());
            let got: Vec<Seq> = got.lock().map_err(|_| TestCaseError::fail("lock"))?
                .iter()
                .map(|frame| {
                    let value: serde_json::Value = serde_json::from_str(frame).unwrap_or_default();
                    prop_assert_eq!(&value["type"], "dm", "only DMs, no gap: {}", frame);
                    Seq::parse(value["seq"].as_str().unwrap_or_default()).ok_or_else(|| TestCaseError::fail("a seq"))
                })
                .collect::<Result<_, _>>()?;
            prop_assert_eq!(got, stored);
            Ok(())
        })?;
    }
}
