//! [`Store`] over Redis: each user's inbox is a stream, `sb:inbox:{USER}`,
//! beside their mailbox hash (cursor, trim mark) and presence, all under the
//! user's hash tag, so every script here touches one slot.
//!
//! Appending is one script: the idempotency check, `XADD` (and the trim),
//! the presence read and the `PUBLISH`es, in one round trip and atomically,
//! so the order of a user's inbox is the order in which every instance
//! receives their stored DMs. On a Redis Cluster the holders' personal
//! channels live in other slots, so the script cannot publish them: it
//! returns the holders and the payload, and the instance SPUBLISHes it to
//! each (two senders' DMs to one user may then arrive out of order; every
//! payload names its predecessor, and a receiver that sees a hole reads the
//! inbox — see the registry's gate). A user channel shares the user's slot
//! and a room channel its history's, so those are published by their
//! scripts in both deployments. Reading and acknowledging are a script each.
//! This module owns those scripts and their replies; connections and
//! timeouts are `lib.rs`'s.

use async_trait::async_trait;
use redis::Value;
use switchboard_core::protocol::TextFrame;

use switchboard_core::bus::Reached;
use switchboard_core::error::BackendError;
use switchboard_core::store::{
    dm_frame, room_frame, Append, Appended, Backlog, Fanout, Receipt, RoomAppend, RoomBacklog, Seq,
    Store, StoreLimits,
};

use crate::scripts::Lua;
use crate::RedisBackend;

/// Appends `id, value of field` of each stream entry that has `field` to
/// `out`: the reply layout of the read and ack scripts.
const COLLECT: &str = r"
local function collect(out, entries, field)
  for _, e in ipairs(entries) do
    local fields = e[2]
    for i = 1, #fields, 2 do
      if fields[i] == field then
        out[#out + 1] = e[1]
        out[#out + 1] = fields[i + 1]
      end
    end
  end
  return out
end
";

/// Stream ids compared as (ms, n), shared by the scripts.
const SEQ_LT: &str = r"
local function parse(id)
  local a, b = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(a), tonumber(b)
end
local function gt(x, y)
  local xa, xb = parse(x)
  local ya, yb = parse(y)
  return xa > ya or (xa == ya and xb > yb)
end
";

/// KEYS: inbox, presence, mailbox[, idempotency].
/// ARGV: msg_id, tail, receipt (`SENDER MSG_ID` or ''), max_len, ttl_ms,
/// window_ms, to, origin, mode (`h`: publish on the holders' personal
/// channels; `s`: return the holders and the payload, for the caller to
/// SPUBLISH (cluster); `c`: one channel), channel prefix (h, s) or channel
/// (c), the publish command for `c` (`PUBLISH` or `SPUBLISH`), `cluster`
/// or `single`.
/// Returns `{'dup', 'MSG_ID SEQ STATUS'}` or `{'ok', seq or '', any,
/// {instance, receivers, ...}}` (h, c) or `{'ok', seq or '', any,
/// {instance, ...}, payload}` (s; `any` is 1 when a holder is listed); in
/// mode c with `SPUBLISH`, the payload follows when it reached nobody while
/// the user is online (see [`RedisBackend::publish_again`]).
/// The payload's header ends with the seq and its predecessor.
///
/// Few calls on purpose (each `redis.call` costs Redis more than most
/// commands it runs): the inbox stream exists only for a user seen within
/// the TTL (the connect creates it), so `XADD NOMKSTREAM` is the seen-check,
/// the append and the exact trim at once. Each entry records its
/// predecessor (`p`, kept in the mailbox as `l`): the first entry kept then
/// tells whether anything after a given seq was trimmed, with no trim
/// bookkeeping on the append.
const APPEND: &str = r#"
local inbox, presence, mbox, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if idem then
  local prior = redis.call('GET', idem)
  if prior then return {'dup', prior} end
end
-- The predecessor from the mailbox (`l`, the newest seq appended): a hash
-- read is far cheaper than XREVRANGE on the stream.
local prev = redis.call('HGET', mbox, 'l') or '0-0'
-- Spelled out, not built as a table: this is the hot path.
local seq
if ARGV[3] == '' then
  seq = redis.call('XADD', inbox, 'NOMKSTREAM', 'MAXLEN', '=', ARGV[4], '*', 'f', ARGV[2], 'p', prev)
else
  seq = redis.call('XADD', inbox, 'NOMKSTREAM', 'MAXLEN', '=', ARGV[4], '*', 'f', ARGV[2], 'p', prev, 'r', ARGV[3])
end
if not seq and redis.call('EXISTS', presence) == 1 then
  -- Online, though not connected within the TTL (a long-lived connection):
  -- seen now.
  if ARGV[3] == '' then
    seq = redis.call('XADD', inbox, 'MAXLEN', '=', ARGV[4], '*', 'f', ARGV[2], 'p', prev)
  else
    seq = redis.call('XADD', inbox, 'MAXLEN', '=', ARGV[4], '*', 'f', ARGV[2], 'p', prev, 'r', ARGV[3])
  end
  redis.call('PEXPIRE', inbox, ARGV[5])
  redis.call('HSETNX', mbox, 'c', '0-0')
  redis.call('PEXPIRE', mbox, ARGV[5])
end
if seq then
  redis.call('HSET', mbox, 'l', seq)
else
  seq = ''
end
local payload
if seq ~= '' then
  payload = 'D ' .. ARGV[7] .. ' 0 ' .. ARGV[8] .. ' - ' .. seq .. ' ' .. prev .. '\n{"type":"dm","seq":"' .. seq .. '"' .. ARGV[2]
else
  payload = 'D ' .. ARGV[7] .. ' 0 ' .. ARGV[8] .. ' -\n{"type":"dm"' .. ARGV[2]
end
local reached = {}
local any = 0
local unheard
if ARGV[9] == 'h' then
  local fields = redis.call('HGETALL', presence)
  for i = 1, #fields, 2 do
    if tonumber(fields[i + 1]) > 0 then
      local channel = ARGV[10] .. '{' .. fields[i] .. '}'
      -- NUMSUB, not PUBLISH's count: a pattern subscriber (a monitor)
      -- would make a crashed instance look alive.
      local n = redis.call('PUBSUB', 'NUMSUB', channel)[2]
      redis.call('PUBLISH', channel, payload)
      reached[#reached + 1] = fields[i]
      reached[#reached + 1] = n
      if n > 0 then any = 1 end
    end
  end
elseif ARGV[9] == 's' then
  local fields = redis.call('HGETALL', presence)
  for i = 1, #fields, 2 do
    if tonumber(fields[i + 1]) > 0 then
      reached[#reached + 1] = fields[i]
      any = 1
    end
  end
else
  local n = redis.call(ARGV[11], ARGV[10], payload)
  -- A classic PUBLISH on a cluster counts this node's subscribers only
  -- (the others get it over the cluster bus): there, online is the answer.
  if ARGV[12] == 'cluster' and ARGV[11] == 'PUBLISH' then n = 1 end
  if n > 0 and redis.call('EXISTS', presence) == 1 then
    any = 1
  elseif n == 0 and ARGV[11] == 'SPUBLISH' and redis.call('EXISTS', presence) == 1 then
    -- Online, but nobody heard it here: this node may be importing the
    -- slot (see publish_again).
    unheard = payload
  end
end
if idem then
  local status = 'offline'
  if any == 1 then status = 'routed' end
  redis.call('SET', idem, ARGV[1] .. ' ' .. seq .. ' ' .. status, 'PX', ARGV[6])
end
if ARGV[9] == 's' then return {'ok', seq, any, reached, payload} end
if unheard then return {'ok', seq, any, reached, unheard} end
return {'ok', seq, any, reached}
"#;

/// KEYS: inbox, mailbox. ARGV: after (or '' for the cursor), limit, open
/// (`1`/`0`), ttl_ms. Opening marks the user seen (creating an empty inbox
/// stream and the mailbox, refreshing both TTLs) and drops entries older
/// than the TTL first (recording the newest dropped as the mark `t`); the
/// oldest entry, read once, tells whether any is that old.
/// Returns `{after, gap (0/1), newest appended seq or '', id, f, id, f, ...}`.
const READ: &str = r"
local inbox, mbox = KEYS[1], KEYS[2]
local after, limit, open, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local fresh = 0
if open == '1' then
  if redis.call('EXISTS', inbox) == 0 then
    -- An empty stream: the user is seen; XADD NOMKSTREAM appends to it.
    redis.call('XADD', inbox, '*', 'f', '', 'p', '0-0')
    redis.call('XTRIM', inbox, 'MAXLEN', 0)
    fresh = 1
  end
  redis.call('HSETNX', mbox, 'c', '0-0')
  redis.call('PEXPIRE', mbox, ttl)
  redis.call('PEXPIRE', inbox, ttl)
end
-- The oldest entry: read once, for the age limit and for the gap check.
local first = redis.call('XRANGE', inbox, '-', '+', 'COUNT', 1)[1]
if open == '1' and first then
  local t = redis.call('TIME')
  local min_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - ttl
  if parse(first[1]) < min_ms then
    -- Only when something is too old (rare): the newest of those is the mark.
    local old = redis.call('XREVRANGE', inbox, '(' .. string.format('%d', min_ms) .. '-0', '-', 'COUNT', 1)
    local mark = redis.call('HGET', mbox, 't')
    if not mark or gt(old[1][1], mark) then redis.call('HSET', mbox, 't', old[1][1]) end
    redis.call('XTRIM', inbox, 'MINID', string.format('%d', min_ms))
    first = redis.call('XRANGE', inbox, '-', '+', 'COUNT', 1)[1]
  end
end
local m = redis.call('HMGET', mbox, 'c', 't', 'l')
if after == '' then after = m[1] or '0-0' end
local gap = 0
if (m[2] and gt(m[2], after)) or (fresh == 1 and after ~= '0-0') then gap = 1 end
if first then
  local fields = first[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'p' and gt(fields[i + 1], after) then gap = 1 end
  end
end
return collect({after, gap, m[3] or ''}, redis.call('XRANGE', inbox, '(' .. after, '+', 'COUNT', limit), 'f')
";

/// KEYS: inbox, mailbox. ARGV: seq. Moves the cursor forward (never past
/// the newest entry) and returns `{id, 'SENDER MSG_ID', ...}` for the
/// newly acknowledged entries that asked for a receipt.
const ACK: &str = r"
local inbox, mbox = KEYS[1], KEYS[2]
local seq = ARGV[1]
local cursor = redis.call('HGET', mbox, 'c')
if not cursor or not gt(seq, cursor) then return {} end
local newest = redis.call('XREVRANGE', inbox, '+', '-', 'COUNT', 1)
if #newest == 0 then return {} end
if gt(seq, newest[1][1]) then seq = newest[1][1] end
if not gt(seq, cursor) then return {} end
local entries = redis.call('XRANGE', inbox, '(' .. cursor, seq)
redis.call('HSET', mbox, 'c', seq)
return collect({}, entries, 'r')
";

/// KEYS: history. ARGV: tail, max, ttl_ms, room, origin, conn, channel,
/// publish command (`PUBLISH`, or `SPUBLISH` on a cluster: the channel
/// shares the history's slot). Records a room message (with its
/// predecessor, `p`, as in the inbox) and publishes it; returns `{seq}`,
/// or `{seq, payload}` when a `SPUBLISH` reached nobody (see
/// [`RedisBackend::publish_again`]).
const ROOM_APPEND: &str = r#"
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = '0-0'
if newest[1] then prev = newest[1][1] end
local seq = redis.call('XADD', KEYS[1], 'MAXLEN', '=', ARGV[2], '*', 'f', ARGV[1], 'p', prev)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local payload = 'R ' .. ARGV[4] .. ' ' .. ARGV[5] .. ' ' .. ARGV[6] .. ' ' .. seq
  .. '\n{"type":"room","seq":"' .. seq .. '"' .. ARGV[1]
if redis.call(ARGV[8], ARGV[7], payload) == 0 and ARGV[8] == 'SPUBLISH' then
  -- Nobody heard it here: on a cluster this node may be importing the
  -- slot, its subscribers still on the node that serves it.
  return {seq, payload}
end
return {seq}
"#;

/// KEYS: history. ARGV: after, limit. Returns `{recovered (0/1), id, f,
/// ...}`; not recovered when a message after `after` was trimmed (the
/// first one kept has a predecessor after it), or the history expired.
const ROOM_READ: &str = r"
local recovered = 1
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if first[1] then
  local fields = first[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'p' and gt(fields[i + 1], ARGV[1]) then recovered = 0 end
  end
elseif ARGV[1] ~= '0-0' then
  recovered = 0
end
return collect({recovered}, redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2]), 'f')
";

/// Waits between the tries of [`RedisBackend::publish_again`].
const REPUBLISH_DELAYS: [std::time::Duration; 6] = [
    std::time::Duration::from_millis(2),
    std::time::Duration::from_millis(5),
    std::time::Duration::from_millis(10),
    std::time::Duration::from_millis(20),
    std::time::Duration::from_millis(40),
    std::time::Duration::from_millis(80),
];

/// The scripts, compiled once.
#[derive(Debug)]
pub(crate) struct StoreScripts {
    append: Lua,
    read: Lua,
    ack: Lua,
    room_append: Lua,
    room_read: Lua,
}

impl Default for StoreScripts {
    fn default() -> Self {
        StoreScripts {
            append: Lua::new(APPEND),
            read: Lua::new(&format!("{SEQ_LT}{COLLECT}{READ}")),
            ack: Lua::new(&format!("{SEQ_LT}{COLLECT}{ACK}")),
            room_append: Lua::new(ROOM_APPEND),
            room_read: Lua::new(&format!("{SEQ_LT}{COLLECT}{ROOM_READ}")),
        }
    }
}

fn malformed(what: &str) -> BackendError {
    BackendError::unavailable(format!("unexpected reply from an inbox script: {what}"))
}

pub(crate) fn text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

pub(crate) fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        _ => text(value)?.parse().ok(),
    }
}

pub(crate) fn array(value: Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        Value::Nil => Some(Vec::new()),
        _ => None,
    }
}

/// The elements of an array in a reply, borrowed (none for anything else,
/// or nothing).
fn items(value: Option<&Value>) -> &[Value] {
    match value {
        Some(Value::Array(items) | Value::Set(items)) => items,
        _ => &[],
    }
}

/// The `id, f, id, f, …` part of a read script's reply, as frames.
fn frames(
    values: &[Value],
    frame: fn(Seq, &str) -> TextFrame,
) -> Result<Vec<(Seq, TextFrame)>, BackendError> {
    let mut out = Vec::with_capacity(values.len() / 2);
    for pair in values.chunks(2) {
        if let [id, tail] = pair {
            let seq = text(id)
                .and_then(Seq::parse)
                .ok_or_else(|| malformed("id"))?;
            let tail = text(tail).ok_or_else(|| malformed("entry"))?;
            out.push((seq, frame(seq, tail)));
        }
    }
    Ok(out)
}

/// `Some(seq)` for a seq, `None` for `''`; an error for anything else.
fn optional_seq(value: &Value) -> Result<Option<Seq>, BackendError> {
    match text(value) {
        Some("") => Ok(None),
        Some(id) => Seq::parse(id).map(Some).ok_or_else(|| malformed("a seq")),
        None => Err(malformed("a seq")),
    }
}

impl RedisBackend {
    /// Cluster: SPUBLISHes an appended DM's payload to each holder (see
    /// [`RedisBackend::spublish_each`]). The DM is stored already: a
    /// failure here is reported as that holder not reached (its instance
    /// reads the inbox on a hole, a catch-up or the next connect), not as a
    /// failed send.
    async fn publish_to_holders(
        &self,
        holders: Vec<String>,
        payload: &Value,
    ) -> Result<Vec<Reached>, BackendError> {
        let payload = match payload {
            Value::BulkString(bytes) => bytes.as_slice(),
            _ => return Err(malformed("payload")),
        };
        let instances: Vec<&str> = holders.iter().map(String::as_str).collect();
        let receivers = self.spublish_each(&instances, payload).await?;
        Ok(holders
            .into_iter()
            .zip(receivers)
            .map(|(instance, receivers)| Reached {
                instance,
                receivers: receivers.unwrap_or(0),
            })
            .collect())
    }

    /// A script on a cluster published on a sharded channel of its own slot
    /// and reached nobody: while a slot migrates, a script on a moved key
    /// runs on the importing node (an `ASK` redirection), but the channel's
    /// subscribers are still on the node serving the slot, which a plain
    /// `SPUBLISH`, routed by the slot map, reaches. Right after the move
    /// completes the subscribers are being moved to the new node (Redis
    /// told them with `sunsubscribe`; they subscribe again within a
    /// millisecond or so, tens of milliseconds on a loaded machine), so a
    /// publish that reached nobody is tried a few more times,
    /// [`REPUBLISH_DELAYS`] apart (about 160 ms in all). A publish that
    /// reached nobody was received by nobody, so trying again never
    /// duplicates. When nobody listens anywhere this costs those tries
    /// (only on a cluster, only for a room or user channel nobody
    /// subscribes). Returns how many it reached; a failure
    /// reached nobody.
    async fn publish_again(&self, channel: &str, payload: &Value) -> usize {
        let Value::BulkString(payload) = payload else {
            return 0;
        };
        for delay in std::iter::once(None).chain(REPUBLISH_DELAYS.iter().map(Some)) {
            if let Some(delay) = delay {
                tokio::time::sleep(*delay).await;
            }
            let Ok(mut conn) = self.message_path() else {
                return 0;
            };
            let mut publish = redis::cmd("SPUBLISH");
            publish.arg(channel).arg(payload.as_slice());
            let reached = self
                .timed(publish.query_async::<usize>(&mut conn))
                .await
                .unwrap_or(0);
            if reached > 0 {
                return reached;
            }
        }
        0
    }

    /// The append script's reply, as an [`Appended`] (on a cluster, after
    /// publishing it to the holders).
    async fn appended(
        &self,
        dm: &Append<'_>,
        mode: &str,
        channel: &str,
        reply: Value,
    ) -> Result<Appended, BackendError> {
        let reply = array(reply).ok_or_else(|| malformed("not an array"))?;
        match reply.first().and_then(text) {
            Some("dup") => {
                let prior = reply
                    .get(1)
                    .and_then(text)
                    .ok_or_else(|| malformed("dup"))?;
                let mut parts = prior.split(' ');
                let msg_id = parts.next().unwrap_or_default().to_owned();
                let seq = match parts.next() {
                    Some("") | None => None,
                    Some(id) => Seq::parse(id),
                };
                let reached_any = parts.next() == Some("routed");
                Ok(Appended {
                    seq,
                    msg_id,
                    reached_any,
                    duplicate: true,
                    reached: Vec::new(),
                })
            }
            Some("ok") if mode == "s" => {
                let seq = optional_seq(reply.get(1).ok_or_else(|| malformed("seq"))?)?;
                let holders: Vec<String> = items(reply.get(3))
                    .iter()
                    .filter_map(|v| text(v).map(str::to_owned))
                    .collect();
                let payload = reply.get(4).ok_or_else(|| malformed("payload"))?;
                let reached = self.publish_to_holders(holders, payload).await?;
                Ok(Appended {
                    seq,
                    msg_id: dm.msg_id.to_owned(),
                    reached_any: reached.iter().any(|r| r.receivers > 0),
                    duplicate: false,
                    reached,
                })
            }
            Some("ok") => {
                let seq = optional_seq(reply.get(1).ok_or_else(|| malformed("seq"))?)?;
                let mut reached_any = reply.get(2).and_then(int) == Some(1);
                if let Some(unheard) = reply.get(4) {
                    reached_any = self.publish_again(channel, unheard).await > 0;
                }
                let mut reached = Vec::new();
                for pair in items(reply.get(3)).chunks(2) {
                    if let [instance, n] = pair {
                        reached.push(Reached {
                            instance: text(instance).unwrap_or_default().to_owned(),
                            receivers: int(n).unwrap_or(0).max(0) as usize,
                        });
                    }
                }
                Ok(Appended {
                    seq,
                    msg_id: dm.msg_id.to_owned(),
                    reached_any,
                    duplicate: false,
                    reached,
                })
            }
            _ => Err(malformed("status")),
        }
    }
}

#[async_trait]
impl Store for RedisBackend {
    async fn append(&self, dm: &Append<'_>) -> Result<Appended, BackendError> {
        let limits = self.store_limits;
        let mut invocation = self.store_scripts.append.prepare_invoke();
        invocation
            .key(self.keys.inbox(dm.to))
            .key(self.keys.presence(dm.to))
            .key(self.keys.mailbox(dm.to));
        if let Some(key) = dm.key {
            invocation.key(self.keys.idempotency(dm.to, dm.from, key));
        }
        let receipt = if dm.receipt {
            format!("{} {}", dm.from, dm.msg_id)
        } else {
            String::new()
        };
        let (mode, channel) = match dm.fanout {
            Fanout::Holders if self.cluster => ("s", String::new()),
            Fanout::Holders => ("h", self.keys.personal_channel_prefix()),
            Fanout::Channel(channel) => ("c", self.channel_name(channel)),
        };
        let publish = self.publish_command(&channel);
        invocation
            .arg(dm.msg_id)
            .arg(dm.tail)
            .arg(receipt)
            .arg(limits.inbox_max_len)
            .arg(limits.inbox_ttl_ms)
            .arg(limits.idempotency_window_ms)
            .arg(dm.to)
            .arg(dm.origin)
            .arg(mode)
            .arg(&channel)
            .arg(publish)
            .arg(if self.cluster { "cluster" } else { "single" });
        let mut conn = self.message_path()?;
        let reply: Value = self.timed(invocation.invoke_async(&mut conn)).await?;
        let appended = self.appended(dm, mode, &channel, reply).await?;
        if let (Some(wait), Some(_)) = (self.wait, appended.seq) {
            // Replication is asynchronous: "stored" waits for the replicas.
            let inbox = self.keys.inbox(dm.to);
            let confirmed = self
                .timed(conn.wait_replicas(&inbox, wait.replicas, wait.timeout))
                .await?;
            if confirmed < wait.replicas {
                self.metrics.inbox_unconfirmed.inc();
                return Err(BackendError::Timeout(
                    format!(
                        "stored on the master, but {confirmed} of {} replicas confirmed it \
                         within {:?}",
                        wait.replicas, wait.timeout
                    )
                    .into(),
                ));
            }
        }
        Ok(appended)
    }

    fn limits(&self) -> StoreLimits {
        self.store_limits
    }

    async fn read(
        &self,
        user: &str,
        after: Option<Seq>,
        limit: usize,
        open: bool,
    ) -> Result<Backlog, BackendError> {
        let mut invocation = self.store_scripts.read.prepare_invoke();
        invocation
            .key(self.keys.inbox(user))
            .key(self.keys.mailbox(user))
            .arg(after.map(|s| s.to_string()).unwrap_or_default())
            .arg(limit.max(1))
            .arg(if open { "1" } else { "0" })
            .arg(self.store_limits.inbox_ttl_ms);
        let mut conn = self.message_path()?;
        let reply: Value = self.timed(invocation.invoke_async(&mut conn)).await?;
        let reply = array(reply).ok_or_else(|| malformed("not an array"))?;
        let after = reply
            .first()
            .and_then(text)
            .and_then(Seq::parse)
            .ok_or_else(|| malformed("after"))?;
        let gap = reply.get(1).and_then(int) == Some(1);
        let newest = optional_seq(reply.get(2).ok_or_else(|| malformed("newest"))?)?;
        let entries = frames(reply.get(3..).unwrap_or_default(), dm_frame)?;
        Ok(Backlog {
            after,
            entries,
            gap,
            newest,
        })
    }

    async fn append_room(&self, message: &RoomAppend<'_>) -> Result<Seq, BackendError> {
        let limits = self.store_limits;
        let channel = self.keys.room_channel(message.room);
        let mut invocation = self.store_scripts.room_append.prepare_invoke();
        invocation
            .key(self.keys.room_history(message.room))
            .arg(message.tail)
            .arg(limits.room_history)
            .arg(limits.room_history_ttl_ms)
            .arg(message.room)
            .arg(message.origin)
            .arg(message.conn)
            .arg(&channel)
            .arg(self.publish_command(&channel));
        let mut conn = self.message_path()?;
        let reply: Value = self.timed(invocation.invoke_async(&mut conn)).await?;
        let reply = array(reply).ok_or_else(|| malformed("not an array"))?;
        let seq = reply
            .first()
            .and_then(text)
            .and_then(Seq::parse)
            .ok_or_else(|| malformed("a room seq"))?;
        if let Some(payload) = reply.get(1) {
            self.publish_again(&channel, payload).await;
        }
        Ok(seq)
    }

    async fn read_room(
        &self,
        room: &str,
        after: Seq,
        limit: usize,
    ) -> Result<RoomBacklog, BackendError> {
        let mut invocation = self.store_scripts.room_read.prepare_invoke();
        invocation
            .key(self.keys.room_history(room))
            .arg(after.to_string())
            .arg(limit.max(1));
        let mut conn = self.message_path()?;
        let reply: Value = self.timed(invocation.invoke_async(&mut conn)).await?;
        let reply = array(reply).ok_or_else(|| malformed("not an array"))?;
        let recovered = reply.first().and_then(int) == Some(1);
        let entries = frames(reply.get(1..).unwrap_or_default(), room_frame)?;
        Ok(RoomBacklog { entries, recovered })
    }

    async fn ack(&self, user: &str, seq: Seq) -> Result<Vec<Receipt>, BackendError> {
        let mut invocation = self.store_scripts.ack.prepare_invoke();
        invocation
            .key(self.keys.inbox(user))
            .key(self.keys.mailbox(user))
            .arg(seq.to_string());
        let mut conn = self.message_path()?;
        let reply: Value = self.timed(invocation.invoke_async(&mut conn)).await?;
        let reply = array(reply).ok_or_else(|| malformed("not an array"))?;
        let mut receipts = Vec::new();
        for pair in reply.chunks(2) {
            if let [id, who] = pair {
                let (Some(seq), Some((sender, msg_id))) = (
                    text(id).and_then(Seq::parse),
                    text(who).and_then(|w| w.split_once(' ')),
                ) else {
                    continue;
                };
                receipts.push(Receipt {
                    sender: sender.to_owned(),
                    msg_id: msg_id.to_owned(),
                    seq,
                });
            }
        }
        Ok(receipts)
    }
}
