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

    /// `sb:instance:{ID}:users` — SET of users with connections on the instance.
    pub fn instance_users(&self, instance: &str) -> String {
        format!("{}:instance:{{{instance}}}:users", self.prefix)
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
    }
}
