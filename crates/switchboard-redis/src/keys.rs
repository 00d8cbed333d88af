//! Every Redis key and channel name Switchboard uses, in one place. This is a
//! public contract (docs/PROTOCOL.md): change it only with a version bump.

/// Builds key and channel names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// `PREFIX:room:`, precomputed: room channels are named per message.
    room_channel_prefix: String,
    /// `PREFIX:all`, precomputed: every publish on a cluster asks whether
    /// its channel is this one.
    all_channel: String,
}

impl Keys {
    /// Names under `prefix` (`sb` by default).
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            room_channel_prefix: format!("{prefix}:room:"),
            all_channel: format!("{prefix}:all"),
        }
    }

    /// `sb:presence:{USER}` — HASH instance id -> connection count. The braces
    /// are literal: a Redis Cluster hash tag.
    pub fn presence(&self, user: &str) -> String {
        format!("{}:presence:{{{user}}}", self.prefix)
    }

    /// `sb:inbox:{USER}` — STREAM: the user's inbox, one entry per stored DM
    /// (`f` = the frame after its seq, `p` = the previous entry's seq, `r` =
    /// `SENDER MSG_ID` when a receipt was asked for). It exists while the
    /// user was seen (connected) within the inbox TTL. Same hash tag as the
    /// presence key.
    pub fn inbox(&self, user: &str) -> String {
        format!("{}:inbox:{{{user}}}", self.prefix)
    }

    /// `sb:mbox:{USER}` — HASH: `c` the user's cursor, `l` the newest seq
    /// appended, `t` the newest entry dropped for its age.
    pub fn mailbox(&self, user: &str) -> String {
        format!("{}:mbox:{{{user}}}", self.prefix)
    }

    /// `sb:idem:{USER}:SENDER:KEY` — STRING `MSG_ID SEQ STATUS`, with the
    /// idempotency window as its TTL: the first answer to a keyed send.
    pub fn idempotency(&self, to: &str, from: &str, key: &str) -> String {
        format!("{}:idem:{{{to}}}:{from}:{key}", self.prefix)
    }

    /// `sb:hist:{ROOM}` — STREAM: the room's last `--room-history`
    /// messages (`f` = the frame after its seq, `p` = the previous one's).
    pub fn room_history(&self, room: &str) -> String {
        format!("{}:hist:{{{room}}}", self.prefix)
    }

    /// `sb:instance:{ID}` — the instance's lease (a key with a TTL).
    pub fn lease(&self, instance: &str) -> String {
        format!("{}:instance:{{{instance}}}", self.prefix)
    }

    /// `sb:instance:{ID}:users` — SET of users with connections on the
    /// instance, and of its lingering users (last connection closed, not yet
    /// settled): a reaper settles every one of them if the instance dies.
    pub fn instance_users(&self, instance: &str) -> String {
        format!("{}:instance:{{{instance}}}:users", self.prefix)
    }

    /// `sb:online:{USER}` — STRING `VERSION TS_MS`: it exists exactly while
    /// the user is announced online (what watchers were told last), written
    /// only by the presence scripts in the same slot as the presence hash,
    /// so the count and the announcement change in one atomic step.
    pub fn online(&self, user: &str) -> String {
        format!("{}:online:{{{user}}}", self.prefix)
    }

    /// `sb:watchers:{USER}` — HASH instance id -> 1: the instances with a
    /// local watcher of the user, the ones its transitions are published to.
    /// Same slot as the presence hash, so a transition reads it atomically.
    pub fn watchers(&self, user: &str) -> String {
        format!("{}:watchers:{{{user}}}", self.prefix)
    }

    /// `sb:instance:{ID}:watching` — SET of the users instance ID watches:
    /// where the reaper and the resync find its watcher fields.
    pub fn instance_watching(&self, instance: &str) -> String {
        format!("{}:instance:{{{instance}}}:watching", self.prefix)
    }

    /// `sb:instance:{ID}:rooms` — SET of `ROOM USER`: the room memberships
    /// instance ID holds, lingering ones (left, not yet settled) included,
    /// so a reaper settles them if the instance dies.
    pub fn instance_rooms(&self, instance: &str) -> String {
        format!("{}:instance:{{{instance}}}:rooms", self.prefix)
    }

    /// `sb:rmembers:{ROOM}` — HASH `INSTANCE USER` -> 1: which instance
    /// holds which user's membership of the room (the per-instance truth,
    /// as the presence hash is for connections).
    pub fn room_memberships(&self, room: &str) -> String {
        format!("{}:rmembers:{{{room}}}", self.prefix)
    }

    /// `sb:rcount:{ROOM}` — HASH USER -> how many instances hold a
    /// membership of USER in the room (field deleted at zero): the
    /// "nobody holds it" test of a settle without scanning `rmembers`.
    pub fn room_counts(&self, room: &str) -> String {
        format!("{}:rcount:{{{room}}}", self.prefix)
    }

    /// `sb:members:{ROOM}` — HASH USER -> `VERSION TS_MS`: the announced
    /// members of the room (what member_joined/member_left told), listed by
    /// the members query. The room's keys and channel share one slot, so
    /// the member scripts publish the events themselves.
    pub fn room_members(&self, room: &str) -> String {
        format!("{}:members:{{{room}}}", self.prefix)
    }

    /// `sb:instances` — ZSET instance id -> lease expiry (Redis clock, ms):
    /// the index of instances every node reads to know who is alive.
    pub fn instances(&self) -> String {
        format!("{}:instances", self.prefix)
    }

    /// `sb:inst:{ID}` — an instance's personal channel (sharded on a
    /// cluster, in the slot of the instance's lease).
    pub fn personal_channel(&self, instance: &str) -> String {
        format!("{}:inst:{{{instance}}}", self.prefix)
    }

    /// `sb:inst:` — what every personal channel starts with (the append
    /// script adds `{ID}`).
    pub fn personal_channel_prefix(&self) -> String {
        format!("{}:inst:", self.prefix)
    }

    /// `sb:room:{ROOM}` — a room's channel (sharded on a cluster, in the
    /// slot of the room's history, so the history script publishes it).
    pub fn room_channel(&self, room: &str) -> String {
        let mut name = String::with_capacity(self.room_channel_prefix.len() + room.len() + 2);
        name.push_str(&self.room_channel_prefix);
        name.push('{');
        name.push_str(room);
        name.push('}');
        name
    }

    /// The prefix shared by every room channel.
    pub fn room_channel_prefix(&self) -> &str {
        &self.room_channel_prefix
    }

    /// `sb:user:{USER}` — a user's channel (`--routing user-channel`;
    /// sharded on a cluster, in the slot of the user's presence and inbox,
    /// so the append script publishes it).
    pub fn user_channel(&self, user: &str) -> String {
        format!("{}:user:{{{user}}}", self.prefix)
    }

    /// The prefix shared by every user channel.
    pub fn user_channel_prefix(&self) -> String {
        format!("{}:user:", self.prefix)
    }

    /// `sb:all` — the broadcast channel of `--routing broadcast`: a classic
    /// channel on a cluster too (every node sees it; that is the baseline).
    pub fn all_channel(&self) -> String {
        self.all_channel.clone()
    }

    /// Whether `channel` is [`Keys::all_channel`], without building it.
    pub fn is_all_channel(&self, channel: &str) -> bool {
        channel == self.all_channel
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_literal_with_hash_tags() {
        let k = Keys::new("sb");
        assert_eq!(k.presence("bob"), "sb:presence:{bob}");
        assert_eq!(k.lease("i1"), "sb:instance:{i1}");
        assert_eq!(k.instance_users("i1"), "sb:instance:{i1}:users");
        assert_eq!(k.personal_channel("i1"), "sb:inst:{i1}");
        assert_eq!(k.room_channel("lobby"), "sb:room:{lobby}");
        assert_eq!(k.user_channel("bob"), "sb:user:{bob}");
        assert_eq!(k.all_channel(), "sb:all");
        assert_eq!(k.instances(), "sb:instances");
        assert_eq!(k.online("bob"), "sb:online:{bob}");
        assert_eq!(k.watchers("bob"), "sb:watchers:{bob}");
        assert_eq!(k.instance_watching("i1"), "sb:instance:{i1}:watching");
        assert_eq!(k.instance_rooms("i1"), "sb:instance:{i1}:rooms");
        assert_eq!(k.room_memberships("lobby"), "sb:rmembers:{lobby}");
        assert_eq!(k.room_counts("lobby"), "sb:rcount:{lobby}");
        assert_eq!(k.room_members("lobby"), "sb:members:{lobby}");
    }

    /// The hash tag of a key or channel: the part Redis Cluster hashes.
    fn tag(name: &str) -> &str {
        let open = name.find('{').expect("a hash tag");
        let close = name[open..].find('}').expect("a closed hash tag");
        &name[open + 1..open + close]
    }

    #[test]
    fn each_script_touches_one_slot() {
        let k = Keys::new("sb");
        // The presence scripts: the user's presence, online and watchers.
        for key in [k.online("bob"), k.watchers("bob"), k.inbox("bob")] {
            assert_eq!(tag(&key), tag(&k.presence("bob")), "{key}");
        }
        // The member scripts publish the room channel.
        for key in [
            k.room_memberships("lobby"),
            k.room_counts("lobby"),
            k.room_channel("lobby"),
        ] {
            assert_eq!(tag(&key), tag(&k.room_members("lobby")), "{key}");
        }
        // The reaper deletes an instance's three sets with one DEL.
        for key in [k.instance_watching("i1"), k.instance_rooms("i1")] {
            assert_eq!(tag(&key), tag(&k.instance_users("i1")), "{key}");
        }
    }
}
