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
            format!(r#"{{"type":"{k}","to":{to},"room":{to},"body":{body},"id":{id},"users":{users},"extra":1}}"#)
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
            Ok(Request::Join { room, .. } | Request::Leave { room } | Request::Room { room, .. }) => {
                prop_assert!(protocol::validate_name(&room).is_ok());
            }
            Ok(Request::Presence { users }) => {
                prop_assert!(users.len() <= protocol::MAX_PRESENCE_USERS);
                for user in users {
                    prop_assert!(protocol::validate_name(&user).is_ok());
                }
            }
            Ok(Request::Recv { seq }) => {
                prop_assert_eq!(crate::store::Seq::parse(&seq.to_string()), Some(seq));
            }
            Ok(Request::Ping) => {}
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
    }

    /// The seam at one connection: live stored DMs arrive in seq order
    /// (some also duplicated), a replay of the inbox runs across any prefix
    /// of them and is read in pages; whatever the interleaving, the
    /// connection queues every seq once, in order.
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
            conn.offer_stored(seqs[live], &frame(seqs[live]), &metrics);
            if live % dup_every == 0 {
                conn.offer_stored(seqs[live], &frame(seqs[live]), &metrics);
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
            match conn.finish_replay(&metrics) {
                crate::registry::ReplayEnd::Live => break,
                crate::registry::ReplayEnd::ReadAgainAfter(s) => after = s,
            }
        }
        drain(&mut rx, &mut got);
        prop_assert!(replayed <= total);
        prop_assert!(!overflowed || replayed >= replay_at - live_from, "an overflowing hold is re-read, not lost");
        // Then the rest live, with duplicates.
        while live < total {
            conn.offer_stored(seqs[live], &frame(seqs[live]), &metrics);
            conn.offer_stored(seqs[live], &frame(seqs[live]), &metrics);
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
