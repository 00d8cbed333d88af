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
