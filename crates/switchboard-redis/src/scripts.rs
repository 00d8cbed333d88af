//! The Lua scripts Switchboard runs inside Redis. Each touches the keys named
//! in its `KEYS` only, and no two of those keys live in different hash slots,
//! so every script is also valid on Redis Cluster.

/// Add `delta` to this instance's field of a presence hash, deleting the
/// field when it reaches zero. Atomic, so a late disconnect on one instance
/// never touches another instance's field.
/// KEYS[1] = presence key; ARGV = instance id, delta.
pub const ADJUST_PRESENCE: &str = r"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
return n
";

/// Claim an instance id at start-up: take the lease if nobody holds it.
/// Returns `{1}` when claimed, else `{0, remaining TTL in ms}`.
/// KEYS[1] = lease key; ARGV = this process's token, lease ms.
pub const CLAIM_LEASE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then
  return {1}
end
return {0, redis.call('PTTL', KEYS[1])}
";

/// Refresh this process's lease. Returns `ok` (refreshed), `absent` (it had
/// expired or Redis lost it: taken back, presence must be re-asserted) or
/// `taken` (another process holds this instance id now).
/// KEYS[1] = lease key; ARGV = token, lease ms.
pub const REFRESH_LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 'ok'
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'absent'
end
return 'taken'
";

/// Give the lease back at shutdown, only if this process still holds it.
/// Returns 1 when this process held it (or nobody did), 0 when another
/// process holds the id (then nothing of this id may be deleted).
/// KEYS[1] = lease key; ARGV = token.
pub const RELEASE_LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
if not holder then
  return 1
end
return 0
";

/// Record this instance's lease expiry in the instance index using Redis's
/// own clock, and return that clock and the whole index.
/// KEYS[1] = index; ARGV = instance id, lease ms.
pub const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {now, redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}
";

/// Claim a dead instance for reaping. Only the caller that removes it from
/// the index gets 1, so each dead instance is reaped exactly once.
/// KEYS[1] = index; ARGV = instance id.
pub const CLAIM_DEAD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expiry and tonumber(expiry) < now then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
";

/// Forget a reaped instance: delete its users, watching and rooms sets —
/// unless its lease is held again (a new process with that id started, or
/// the instance was only paused and took its lease back: the sets are its
/// own again, and it settles what it no longer holds itself). The lease and
/// the sets share the instance's slot.
/// KEYS = lease, users set, watching set, rooms set. Returns 1 when deleted.
pub const FORGET_DEAD: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return 1
";

/// Shared by the transition scripts: the version of a new transition,
/// `max(previous + 1, now in µs)` on Redis's clock (`prev` is the stored
/// state `VERSION TS_MS`, or false when there is none), and its time in
/// unix ms. Strictly increasing per user (per room member) while the state
/// is stored, and past any version handed out before a Redis that lost
/// everything came back (the clock moved on), so receivers can drop an
/// event older than the one they hold. Formatted with `%d`: Lua's own
/// number formatting would print 1.7e+15.
const TRANSITION: &str = r"
local function next_version(prev)
  local t = redis.call('TIME')
  local v = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if prev then
    local p = tonumber(string.match(prev, '^(%d+)'))
    if p and p + 1 > v then v = p + 1 end
  end
  return string.format('%d', v), string.format('%d', math.floor(v / 1000))
end
-- Announces the user online (KEYS[2] absent): `{n, v, ts, watcher...}`,
-- else `{n}`.
local function announce_online(n)
  if redis.call('EXISTS', KEYS[2]) == 1 then return {n} end
  local v, ts = next_version(false)
  redis.call('SET', KEYS[2], v .. ' ' .. ts)
  local out = {n, v, ts}
  for _, w in ipairs(redis.call('HKEYS', KEYS[3])) do out[#out + 1] = w end
  return out
end
-- Removes instance `inst`'s membership of `user` (and its count).
local function drop_membership(inst, user)
  if redis.call('HDEL', KEYS[1], inst .. ' ' .. user) == 1 then
    if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
      redis.call('HDEL', KEYS[2], user)
    end
  end
end
";

/// A connection of a user on this instance (`connect`): one more in this
/// instance's field, and the user announced online if it was not. The
/// count and the announcement are one atomic step, so of two instances
/// racing to connect a user exactly one announces it.
/// KEYS = presence, online, watchers (one user's slot); ARGV = instance id.
/// Returns `{count}` or `{count, version, ts_ms, watcher ids...}` when it
/// announced; the caller publishes `P USER 1 VERSION TS_MS` to the watchers
/// (on a cluster their personal channels are in other slots).
pub const PRESENCE_UP: &str = r"
return announce_online(redis.call('HINCRBY', KEYS[1], ARGV[1], 1))
";

/// Re-asserting a user after a resync: this instance's field set to its
/// local count, and the user announced online if the state was lost (a
/// Redis that restarted empty: the one re-announcement receivers dedupe by
/// state). KEYS and reply as [`PRESENCE_UP`]; ARGV = instance id, count.
pub const PRESENCE_ASSERT: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return announce_online(tonumber(ARGV[2]))
";

/// Settling a user (a grace after its last connection here closed, or its
/// instance reaped or withdrawn): first the field of `ARGV[1]` is deleted
/// (`''`: none), then, if no instance holds the user any more and it was
/// announced online, the state is deleted and the user announced offline.
/// Fields of dead instances not yet reaped count as holders: their reaping
/// settles the user again.
/// KEYS = presence, online, watchers; ARGV = instance id or `''`.
/// Returns `{holders}` or `{0, version, ts_ms, watcher ids...}` when it
/// announced offline.
pub const PRESENCE_SETTLE: &str = r"
if ARGV[1] ~= '' then redis.call('HDEL', KEYS[1], ARGV[1]) end
local holders = redis.call('HLEN', KEYS[1])
if holders > 0 then return {holders} end
local prev = redis.call('GET', KEYS[2])
if not prev then return {0} end
redis.call('DEL', KEYS[2])
local v, ts = next_version(prev)
local out = {0, v, ts}
for _, w in ipairs(redis.call('HKEYS', KEYS[3])) do out[#out + 1] = w end
return out
";

/// This instance starts watching a user: registered as a watcher and the
/// announced state read in one atomic step, so no transition can fall
/// between the read and the registration (it is either in the state read
/// or published to this instance).
/// KEYS = watchers, online; ARGV = instance id. Returns the state
/// `VERSION TS_MS`, or nil when the user is not announced online.
pub const WATCH_USER: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], 1)
return redis.call('GET', KEYS[2])
";

/// A membership of a user in a room held by this instance (the first local
/// connection of the user joined, or a resync re-asserts it; idempotent):
/// the `INSTANCE USER` field and, when new, the user's count; the user
/// announced a member if it was not, with `M ROOM USER 1 VERSION TS_MS` on
/// the room's channel, which shares the room's slot.
/// KEYS = rmembers, rcount, members (one room's slot); ARGV = instance id,
/// user, room, room channel, publish command (`PUBLISH`, `SPUBLISH` on a
/// cluster). Returns 1 when it announced, else 0.
pub const MEMBER_UP: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 1) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
end
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then return 0 end
local v, ts = next_version(false)
redis.call('HSET', KEYS[3], ARGV[2], v .. ' ' .. ts)
redis.call(ARGV[5], ARGV[4], 'M ' .. ARGV[3] .. ' ' .. ARGV[2] .. ' 1 ' .. v .. ' ' .. ts .. '\n')
return 1
";

/// The resync's re-assertion of a membership: [`MEMBER_UP`] is idempotent
/// (the field is set only if absent, the count moves only then), so it is
/// the same script.
pub const MEMBER_ASSERT: &str = MEMBER_UP;

/// The last local connection of a user left a room: this instance's
/// membership removed (and the user's count), never announced — the
/// membership lingers until settled.
/// KEYS = rmembers, rcount; ARGV = instance id, user. Returns 0.
pub const MEMBER_LEAVE: &str = r"
drop_membership(ARGV[1], ARGV[2])
return 0
";

/// [`PRESENCE_SETTLE`] for a membership: the membership of `ARGV[1]` (`''`:
/// none) removed first; then, if no instance holds one and the user was an
/// announced member, it is announced gone, `M ROOM USER 0 VERSION TS_MS` on
/// the room's channel.
/// KEYS = rmembers, rcount, members; ARGV = instance id or `''`, user, room,
/// room channel, publish command. Returns 1 when it announced, else 0.
pub const MEMBER_SETTLE: &str = r"
if ARGV[1] ~= '' then drop_membership(ARGV[1], ARGV[2]) end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 0 end
local prev = redis.call('HGET', KEYS[3], ARGV[2])
if not prev then return 0 end
redis.call('HDEL', KEYS[3], ARGV[2])
local v, ts = next_version(prev)
redis.call(ARGV[5], ARGV[4], 'M ' .. ARGV[3] .. ' ' .. ARGV[2] .. ' 0 ' .. v .. ' ' .. ts .. '\n')
return 1
";

/// The transition scripts, compiled once, each with the shared
/// [`TRANSITION`] functions in front.
#[derive(Debug)]
pub(crate) struct PresenceScripts {
    pub(crate) up: Lua,
    pub(crate) assert: Lua,
    pub(crate) settle: Lua,
    pub(crate) watch: Lua,
    pub(crate) member_up: Lua,
    pub(crate) member_leave: Lua,
    pub(crate) member_settle: Lua,
}

impl Default for PresenceScripts {
    fn default() -> Self {
        let with = |body: &str| Lua::new(&format!("{TRANSITION}{body}"));
        PresenceScripts {
            up: with(PRESENCE_UP),
            assert: with(PRESENCE_ASSERT),
            settle: with(PRESENCE_SETTLE),
            watch: Lua::new(WATCH_USER),
            member_up: with(MEMBER_ASSERT),
            member_leave: with(MEMBER_LEAVE),
            member_settle: with(MEMBER_SETTLE),
        }
    }
}

/// A Lua script and its source, run by `EVALSHA`. On `NOSCRIPT` (a Redis
/// that restarted, a replica promoted by a failover: script caches are not
/// replicated) the source is loaded on the node that will run it — on a
/// cluster, the master of the call's first key, which the redis crate's
/// own fallback (`SCRIPT LOAD` to the masters of a slot map that may be
/// stale right after a failover) does not guarantee — and the call retried
/// once.
#[derive(Debug)]
pub(crate) struct Lua {
    script: redis::Script,
    code: String,
}

impl Lua {
    pub(crate) fn new(code: &str) -> Lua {
        Lua {
            script: redis::Script::new(code),
            code: code.to_owned(),
        }
    }

    /// `EVALSHA` of this script with `keys`, as a plain command the caller
    /// adds its arguments to: for batches ([`crate::conn`]'s
    /// `query_scripts`), which load the script first instead of retrying
    /// each call on `NOSCRIPT`.
    pub(crate) fn evalsha(&self, keys: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(keys.len()).arg(keys);
        cmd
    }

    /// `SCRIPT LOAD` of this script.
    pub(crate) fn load_cmd(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(&self.code);
        cmd
    }

    /// A call with `key` as its first key.
    pub(crate) fn key(&self, key: impl AsRef<[u8]>) -> LuaCall<'_> {
        let mut call = self.prepare_invoke();
        call.key(key);
        call
    }

    /// A call without keys yet.
    pub(crate) fn prepare_invoke(&self) -> LuaCall<'_> {
        LuaCall {
            lua: self,
            invocation: self.script.prepare_invoke(),
            first_key: None,
        }
    }
}

/// One call of a [`Lua`] script being built.
pub(crate) struct LuaCall<'a> {
    lua: &'a Lua,
    invocation: redis::ScriptInvocation<'a>,
    first_key: Option<Vec<u8>>,
}

impl LuaCall<'_> {
    pub(crate) fn key(&mut self, key: impl AsRef<[u8]>) -> &mut Self {
        let key = key.as_ref();
        if self.first_key.is_none() {
            self.first_key = Some(key.to_vec());
        }
        self.invocation.key(key);
        self
    }

    pub(crate) fn arg(&mut self, arg: impl redis::ToRedisArgs) -> &mut Self {
        self.invocation.arg(arg);
        self
    }

    /// Runs the call (see [`Lua`] for `NOSCRIPT`).
    pub(crate) async fn invoke_async<T: redis::FromRedisValue>(
        &self,
        conn: &mut impl LoadScript,
    ) -> redis::RedisResult<T> {
        match self.invocation.invoke_async(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let key = self.first_key.as_deref().unwrap_or_default();
                conn.load_script(&self.lua.code, key).await?;
                self.invocation.invoke_async(conn).await
            }
            result => result,
        }
    }
}

/// A connection that can load a script on the node serving a key.
pub(crate) trait LoadScript: redis::aio::ConnectionLike + Send {
    /// `SCRIPT LOAD code` where `key` lives.
    fn load_script<'a>(&'a mut self, code: &'a str, key: &'a [u8]) -> redis::RedisFuture<'a, ()>;
}
