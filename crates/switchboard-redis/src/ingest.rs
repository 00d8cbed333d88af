//! Redis Streams ingestion, the Redis side: a consumer in a consumer group
//! over one stream (`--ingest-stream`), on a connection of its own.
//!
//! This module owns the stream commands — `XGROUP CREATE … MKSTREAM`,
//! `XREADGROUP` (the consumer's own pending entries, and new ones with a
//! bounded `BLOCK`), `XACK`, `XAUTOCLAIM`, the dead-letter `XADD` and the
//! lag (`XINFO GROUPS`) — and the parsing of their replies, which never
//! panics on what Redis sends. It decides nothing about records: what an
//! entry means, when it is done and what is retried is the server's
//! ingest loop (`src/ingest`). It must not touch the message-path,
//! maintenance or subscriber connections: a blocking read on the
//! multiplexed message-path connection would hold up every DM queued
//! behind it, so the consumer opens its own connection (one Redis: a
//! `ConnectionManager`; a cluster: a cluster connection; Sentinel: the
//! master the sentinels name, asked again after any failure).
//!
//! Every command is bounded: `--redis-response-timeout-ms`, plus the
//! `BLOCK` time for the blocking read. A failure is a [`BackendError`];
//! after one the connection is dropped and opened again at the next call.
//! A group that disappeared (`NOGROUP`: the stream or the group was
//! deleted) is created again and the command retried once.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisError, Value};

use switchboard_core::error::BackendError;

use crate::conn::{self, MessageConn, RedisTarget};
use crate::{classify, RedisBackend};

/// Where a group created by this instance starts (`--ingest-start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStart {
    /// `0`: every entry already in the stream is delivered.
    Earliest,
    /// `$`: only entries added after the group was created.
    Latest,
}

/// What the consumer is: the stream, the group, this consumer's name and
/// the bounds of its reads.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// The stream key, used as given (no `--redis-prefix`): producers
    /// `XADD` to it directly.
    pub stream: String,
    /// The consumer group (`--ingest-group`).
    pub group: String,
    /// This consumer's name in the group: the instance id.
    pub consumer: String,
    /// Where a group that does not exist yet starts.
    pub start: StreamStart,
    /// Entries read (or claimed) at most per call (`--ingest-batch`).
    pub batch: usize,
    /// Longest `BLOCK` of a read of new entries; bounds how long a
    /// shutdown waits for the read in progress.
    pub block: Duration,
    /// Entries idle longer than this in any consumer's pending list are
    /// claimed (`--ingest-claim-ms`).
    pub claim_idle: Duration,
    /// Where malformed entries are copied (`--ingest-dead-letter-stream`).
    pub dead_letter: Option<String>,
}

/// One stream entry as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    /// The entry id (`MS-N`).
    pub id: String,
    /// What the entry holds.
    pub content: EntryContent,
}

/// The content of an entry: its `v` field, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryContent {
    /// The value of the `v` field, as bytes.
    Value(Vec<u8>),
    /// The entry has no `v` field (malformed).
    NoValue,
    /// The entry was deleted (`XDEL`, trimming) after it was delivered: it
    /// is still pending but there is nothing to process.
    Deleted,
}

/// What one `XAUTOCLAIM` call returned.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Where the next call continues; `0-0` once the pending list was
    /// scanned to its end.
    pub cursor: String,
    /// The entries now pending for this consumer, oldest first.
    pub entries: Vec<StreamEntry>,
}

/// Consumer-group lag (`XINFO GROUPS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLag {
    /// Entries not yet delivered to any consumer of the group; `None` when
    /// Redis cannot tell (entries deleted in the range; Redis < 7).
    pub undelivered: Option<u64>,
    /// Entries delivered and not yet acknowledged.
    pub pending: u64,
}

/// The field an entry's record is in.
pub const VALUE_FIELD: &str = "v";

/// Dead-letter streams are capped at about this many entries (`MAXLEN ~`).
pub const DEAD_LETTER_MAXLEN: u64 = 100_000;

/// A consumer of one stream in one group, with its own connection. Not
/// shared: one task drives it, one command at a time.
pub struct StreamConsumer {
    backend: Arc<RedisBackend>,
    settings: StreamSettings,
    conn: Option<MessageConn>,
}

impl std::fmt::Debug for StreamConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamConsumer")
            .field("settings", &self.settings)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl RedisBackend {
    /// A consumer of `settings.stream` in `settings.group`. Opens nothing
    /// yet: its connection is opened by the first command.
    pub fn stream_consumer(self: &Arc<Self>, settings: StreamSettings) -> StreamConsumer {
        StreamConsumer {
            backend: self.clone(),
            settings,
            conn: None,
        }
    }
}

/// The error a reply that does not have the expected shape becomes.
fn unexpected(what: &str) -> BackendError {
    BackendError::unavailable(format!("unexpected reply to {what}"))
}

/// A command of this module that did not complete within its bound.
fn elapsed(command: &'static str, bound: Duration) -> BackendError {
    BackendError::Timeout(Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{command}: no answer within {bound:?}"),
    )))
}

impl StreamConsumer {
    /// The settings it was made with.
    pub fn settings(&self) -> &StreamSettings {
        &self.settings
    }

    /// The connection, opened if there is none.
    async fn connection(&mut self) -> Result<MessageConn, BackendError> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let settings = &self.backend.wiring.settings;
        let bound = settings.connect_timeout.saturating_mul(2);
        // The blocking read's answer comes after `block`.
        let response = settings.response_timeout + self.settings.block;
        let opened = match &settings.target {
            RedisTarget::Single(url) => {
                let info = url
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| BackendError::Unavailable(Box::new(e)))?;
                self.open_single(info, bound).await?
            }
            RedisTarget::Sentinel { .. } => {
                let master = match &self.backend.sentinel {
                    Some(watch) => tokio::time::timeout(bound, watch.master())
                        .await
                        .map_err(|_| elapsed("asking the sentinels for the master", bound))?
                        .map_err(classify)?,
                    None => return Err(BackendError::unavailable("no sentinel watch")),
                };
                self.open_single(master, bound).await?
            }
            RedisTarget::Cluster(seeds) => {
                let client = conn::cluster_client(
                    seeds,
                    settings.connect_timeout,
                    response,
                    3,
                    None::<fn(redis::PushInfo) -> Result<(), std::convert::Infallible>>,
                )
                .map_err(|e| BackendError::Unavailable(Box::new(e)))?;
                let conn = conn::cluster_connect(&client, "stream consumer connection", bound)
                    .await
                    .map_err(|e| BackendError::Unavailable(Box::new(e)))?;
                MessageConn::Cluster(conn)
            }
        };
        self.conn = Some(opened.clone());
        Ok(opened)
    }

    async fn open_single(
        &self,
        info: redis::ConnectionInfo,
        bound: Duration,
    ) -> Result<MessageConn, BackendError> {
        let client =
            redis::Client::open(info).map_err(|e| BackendError::Unavailable(Box::new(e)))?;
        // No retries and no client-side response timeout: each command is
        // bounded here (the blocking read longer than the others).
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(self.backend.wiring.settings.connect_timeout))
            .set_response_timeout(None);
        match tokio::time::timeout(bound, ConnectionManager::new_with_config(client, config)).await
        {
            Ok(Ok(manager)) => Ok(MessageConn::Single(manager)),
            Ok(Err(e)) => Err(classify(e)),
            Err(_) => Err(elapsed("connecting the stream consumer", bound)),
        }
    }

    /// Runs `cmd` within `bound`; a failure drops the connection.
    async fn run(
        &mut self,
        what: &'static str,
        cmd: &redis::Cmd,
        bound: Duration,
    ) -> Result<Value, Failure> {
        let mut conn = self.connection().await.map_err(Failure::Backend)?;
        match tokio::time::timeout(bound, cmd.query_async::<Value>(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.code() == Some("NOGROUP") => Err(Failure::NoGroup(e)),
            Ok(Err(e)) => {
                self.conn = None;
                Err(Failure::Backend(classify(e)))
            }
            Err(_) => {
                self.conn = None;
                Err(Failure::Backend(elapsed(what, bound)))
            }
        }
    }

    /// Runs `cmd`; if the group is missing, creates it and runs it again.
    async fn run_in_group(
        &mut self,
        what: &'static str,
        cmd: &redis::Cmd,
        bound: Duration,
    ) -> Result<Value, BackendError> {
        match self.run(what, cmd, bound).await {
            Ok(value) => Ok(value),
            Err(Failure::Backend(e)) => Err(e),
            Err(Failure::NoGroup(e)) => {
                tracing::warn!(
                    stream = %self.settings.stream,
                    group = %self.settings.group,
                    error = %e,
                    "the consumer group is missing; creating it"
                );
                self.ensure_group().await?;
                match self.run(what, cmd, bound).await {
                    Ok(value) => Ok(value),
                    Err(Failure::Backend(e)) => Err(e),
                    Err(Failure::NoGroup(e)) => Err(BackendError::Unavailable(Box::new(e))),
                }
            }
        }
    }

    fn response_timeout(&self) -> Duration {
        self.backend.wiring.settings.response_timeout
    }

    /// `XGROUP CREATE stream group 0|$ MKSTREAM`; a group that exists
    /// already (`BUSYGROUP`) is left as it is.
    pub async fn ensure_group(&mut self) -> Result<(), BackendError> {
        let start = match self.settings.start {
            StreamStart::Earliest => "0",
            StreamStart::Latest => "$",
        };
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&self.settings.stream)
            .arg(&self.settings.group)
            .arg(start)
            .arg("MKSTREAM");
        let bound = self.response_timeout();
        let mut conn = self.connection().await?;
        match tokio::time::timeout(bound, cmd.query_async::<Value>(&mut conn)).await {
            Ok(Ok(_)) => {
                tracing::info!(
                    stream = %self.settings.stream,
                    group = %self.settings.group,
                    start,
                    "created the consumer group"
                );
                Ok(())
            }
            Ok(Err(e)) if e.code() == Some("BUSYGROUP") => Ok(()),
            Ok(Err(e)) => {
                self.conn = None;
                Err(classify(e))
            }
            Err(_) => {
                self.conn = None;
                Err(elapsed("XGROUP CREATE", bound))
            }
        }
    }

    /// This consumer's own pending entries with ids after `after` (`0` for
    /// all): what it was delivered and did not acknowledge (a previous
    /// process with this instance id, or a read whose answer was lost).
    pub async fn read_own_pending(
        &mut self,
        after: &str,
    ) -> Result<Vec<StreamEntry>, BackendError> {
        let cmd = self.read_cmd(after, None);
        let value = self
            .run_in_group("XREADGROUP (pending)", &cmd, self.response_timeout())
            .await?;
        parse_read(value)
    }

    /// New entries (`>`), waiting at most the `block` setting for one.
    /// Empty when none arrived.
    pub async fn read_new(&mut self) -> Result<Vec<StreamEntry>, BackendError> {
        let block = self.settings.block;
        let cmd = self.read_cmd(">", Some(block));
        let bound = self.response_timeout() + block;
        let value = self.run_in_group("XREADGROUP", &cmd, bound).await?;
        parse_read(value)
    }

    fn read_cmd(&self, id: &str, block: Option<Duration>) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.settings.group)
            .arg(&self.settings.consumer)
            .arg("COUNT")
            .arg(self.settings.batch.max(1));
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(&self.settings.stream).arg(id);
        cmd
    }

    /// `XAUTOCLAIM`: entries of any consumer idle longer than the
    /// `claim_idle` setting, from `cursor` on, become this consumer's.
    pub async fn claim(&mut self, cursor: &str) -> Result<Claimed, BackendError> {
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(&self.settings.stream)
            .arg(&self.settings.group)
            .arg(&self.settings.consumer)
            .arg(self.settings.claim_idle.as_millis() as u64)
            .arg(cursor)
            .arg("COUNT")
            .arg(self.settings.batch.max(1));
        let value = self
            .run_in_group("XAUTOCLAIM", &cmd, self.response_timeout())
            .await?;
        parse_claim(value)
    }

    /// `XCLAIM … JUSTID` to this consumer with no minimum idle time: resets
    /// the idle time of entries it still works on (a record retried longer
    /// than `claim_idle` is not claimed by another instance meanwhile).
    pub async fn keep(&mut self, ids: &[String]) -> Result<(), BackendError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.settings.stream)
            .arg(&self.settings.group)
            .arg(&self.settings.consumer)
            .arg(0)
            .arg(ids)
            .arg("JUSTID");
        self.run_in_group("XCLAIM", &cmd, self.response_timeout())
            .await
            .map(|_| ())
    }

    /// Removes the group's consumers other than this one that hold no
    /// pending entry and were idle at least `idle` (instances gone: an
    /// instance id is new at every start, so each restart leaves one);
    /// returns how many. One script, so a consumer cannot read between the
    /// check and the removal (removing a consumer drops its pending
    /// entries; it has none). A live consumer reads every `BLOCK` and is
    /// never that idle; one removed anyway is created again by its next
    /// read.
    pub async fn forget_idle_consumers(&mut self, idle: Duration) -> Result<usize, BackendError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(FORGET_IDLE_CONSUMERS)
            .arg(1)
            .arg(&self.settings.stream)
            .arg(&self.settings.group)
            .arg(&self.settings.consumer)
            .arg(idle.as_millis() as u64);
        let value = self
            .run_in_group("XGROUP DELCONSUMER", &cmd, self.response_timeout())
            .await?;
        Ok(elements(&value).map_or(0, <[Value]>::len))
    }

    /// `XACK` of `ids` (done entries). Acknowledging an entry that is not
    /// pending any more is harmless.
    pub async fn ack(&mut self, ids: &[String]) -> Result<(), BackendError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&self.settings.stream)
            .arg(&self.settings.group)
            .arg(ids);
        match self.run("XACK", &cmd, self.response_timeout()).await {
            Ok(_) => Ok(()),
            Err(Failure::Backend(e)) => Err(e),
            // No group: nothing is pending in it.
            Err(Failure::NoGroup(_)) => Ok(()),
        }
    }

    /// Copies a malformed entry to the dead-letter stream, if one is set:
    /// `XADD dl MAXLEN ~ 100000 * v <value> stream <stream> id <entry id>
    /// error <why>` (`v` only when the entry had one). Returns whether a
    /// copy was made.
    pub async fn dead_letter(
        &mut self,
        entry: &StreamEntry,
        error: &str,
    ) -> Result<bool, BackendError> {
        let Some(dead_letter) = self.settings.dead_letter.clone() else {
            return Ok(false);
        };
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&dead_letter)
            .arg("MAXLEN")
            .arg("~")
            .arg(DEAD_LETTER_MAXLEN)
            .arg("*");
        if let EntryContent::Value(value) = &entry.content {
            cmd.arg(VALUE_FIELD).arg(value.as_slice());
        }
        cmd.arg("stream")
            .arg(&self.settings.stream)
            .arg("id")
            .arg(&entry.id)
            .arg("error")
            .arg(error);
        match self
            .run("XADD (dead letter)", &cmd, self.response_timeout())
            .await
        {
            Ok(_) => Ok(true),
            Err(Failure::Backend(e)) => Err(e),
            Err(Failure::NoGroup(e)) => Err(BackendError::Unavailable(Box::new(e))),
        }
    }

    /// The group's lag and pending count (`XINFO GROUPS`); `None` if the
    /// group is not there.
    pub async fn lag(&mut self) -> Result<Option<GroupLag>, BackendError> {
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("GROUPS").arg(&self.settings.stream);
        let value = match self
            .run("XINFO GROUPS", &cmd, self.response_timeout())
            .await
        {
            Ok(value) => value,
            Err(Failure::Backend(e)) => return Err(e),
            Err(Failure::NoGroup(_)) => return Ok(None),
        };
        parse_groups(value, &self.settings.group)
    }
}

/// [`StreamConsumer::forget_idle_consumers`]: KEYS[1] the stream, ARGV the
/// group, this consumer, the idle time in ms. Replies are RESP2 inside a
/// script: each consumer a flat field/value list.
const FORGET_IDLE_CONSUMERS: &str = r"
local removed = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['name'] ~= ARGV[2] and info['pending'] == 0 and info['idle'] >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed[#removed + 1] = info['name']
  end
end
return removed
";

/// A failed command: a missing group is told apart (it is created again).
enum Failure {
    NoGroup(RedisError),
    Backend(BackendError),
}

/// Text of a string-like reply element.
fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Okay => Some("OK".to_owned()),
        _ => None,
    }
}

fn integer(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => text(other).and_then(|t| t.parse().ok()),
    }
}

/// The elements of an array-like reply (RESP2 arrays, RESP3 arrays/sets).
fn elements(value: &Value) -> Option<&[Value]> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        Value::Attribute { data, .. } => elements(data),
        _ => None,
    }
}

/// Key/value pairs of a map-like reply: a RESP3 map, or a RESP2 flat array.
fn pairs(value: &Value) -> Option<Vec<(&Value, &Value)>> {
    match value {
        Value::Map(pairs) => Some(pairs.iter().map(|(k, v)| (k, v)).collect()),
        Value::Attribute { data, .. } => pairs(data),
        other => {
            let items = elements(other)?;
            if items.len() % 2 != 0 {
                return None;
            }
            Some(items.chunks(2).map(|kv| (&kv[0], &kv[1])).collect())
        }
    }
}

/// One `[id, [field, value, …]]` entry; the fields are nil for an entry
/// deleted after delivery.
fn parse_entry(value: &Value) -> Option<StreamEntry> {
    let items = elements(value)?;
    let id = text(items.first()?)?;
    let content = match items.get(1) {
        None | Some(Value::Nil) => EntryContent::Deleted,
        Some(fields) => {
            let fields = pairs(fields)?;
            fields
                .into_iter()
                .find(|(field, _)| text(field).as_deref() == Some(VALUE_FIELD))
                .map(|(_, v)| match v {
                    Value::BulkString(bytes) => EntryContent::Value(bytes.clone()),
                    other => text(other)
                        .map(|t| EntryContent::Value(t.into_bytes()))
                        .unwrap_or(EntryContent::NoValue),
                })
                .unwrap_or(EntryContent::NoValue)
        }
    };
    Some(StreamEntry { id, content })
}

fn parse_entries(value: &Value) -> Result<Vec<StreamEntry>, BackendError> {
    match value {
        Value::Nil => Ok(Vec::new()),
        other => elements(other)
            .ok_or_else(|| unexpected("a list of stream entries"))?
            .iter()
            .map(|entry| parse_entry(entry).ok_or_else(|| unexpected("a stream entry")))
            .collect(),
    }
}

/// `XREADGROUP`'s reply: nil (nothing within BLOCK), or one stream's
/// entries — `[[stream, entries]]` in RESP2, `{stream: entries}` in RESP3.
fn parse_read(value: Value) -> Result<Vec<StreamEntry>, BackendError> {
    if value == Value::Nil {
        return Ok(Vec::new());
    }
    let streams: Vec<(&Value, &Value)> = match &value {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        other => elements(other)
            .ok_or_else(|| unexpected("XREADGROUP"))?
            .iter()
            .map(|stream| match elements(stream) {
                Some([name, entries]) => Ok((name, entries)),
                _ => Err(unexpected("XREADGROUP")),
            })
            .collect::<Result<_, _>>()?,
    };
    let mut out = Vec::new();
    for (_, entries) in streams {
        out.extend(parse_entries(entries)?);
    }
    Ok(out)
}

/// `XAUTOCLAIM`'s reply: `[cursor, entries, deleted ids]` (Redis 7; 6.2
/// has no third element and nil entries for deleted ones).
fn parse_claim(value: Value) -> Result<Claimed, BackendError> {
    let items = elements(&value).ok_or_else(|| unexpected("XAUTOCLAIM"))?;
    let cursor = items
        .first()
        .and_then(text)
        .ok_or_else(|| unexpected("XAUTOCLAIM"))?;
    let entries = match items.get(1) {
        Some(entries) => elements(entries)
            .ok_or_else(|| unexpected("XAUTOCLAIM"))?
            .iter()
            .filter(|entry| **entry != Value::Nil)
            .map(|entry| parse_entry(entry).ok_or_else(|| unexpected("a claimed entry")))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    Ok(Claimed { cursor, entries })
}

/// The entry of `group` in `XINFO GROUPS`.
fn parse_groups(value: Value, group: &str) -> Result<Option<GroupLag>, BackendError> {
    let groups = elements(&value).ok_or_else(|| unexpected("XINFO GROUPS"))?;
    for info in groups {
        let fields = pairs(info).ok_or_else(|| unexpected("XINFO GROUPS"))?;
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| text(k).as_deref() == Some(name))
                .map(|(_, v)| *v)
        };
        if field("name").and_then(text).as_deref() != Some(group) {
            continue;
        }
        return Ok(Some(GroupLag {
            undelivered: field("lag").and_then(integer),
            pending: field("pending").and_then(integer).unwrap_or(0),
        }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[&str]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(fields.iter().map(|f| bulk(f)).collect()),
        ])
    }

    #[test]
    fn reads_parse_in_resp2_and_resp3() {
        let entries = Value::Array(vec![
            entry("1-0", &["v", "{}"]),
            entry("2-0", &["x", "1"]),
            Value::Array(vec![bulk("3-0"), Value::Nil]),
        ]);
        let want = vec![
            StreamEntry {
                id: "1-0".into(),
                content: EntryContent::Value(b"{}".to_vec()),
            },
            StreamEntry {
                id: "2-0".into(),
                content: EntryContent::NoValue,
            },
            StreamEntry {
                id: "3-0".into(),
                content: EntryContent::Deleted,
            },
        ];
        let resp2 = Value::Array(vec![Value::Array(vec![bulk("s"), entries.clone()])]);
        assert_eq!(parse_read(resp2).ok(), Some(want.clone()));
        let resp3 = Value::Map(vec![(bulk("s"), entries)]);
        assert_eq!(parse_read(resp3).ok(), Some(want));
        assert_eq!(parse_read(Value::Nil).ok(), Some(Vec::new()));
        assert!(parse_read(Value::Int(3)).is_err());
        assert!(parse_read(Value::Array(vec![Value::Int(3)])).is_err());
    }

    #[test]
    fn claims_and_groups_parse() {
        let reply = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![entry("5-1", &["v", "x"]), Value::Nil]),
            Value::Array(vec![bulk("4-0")]),
        ]);
        let claimed = parse_claim(reply).expect("a claim reply");
        assert_eq!(claimed.cursor, "0-0");
        assert_eq!(claimed.entries.len(), 1);
        assert!(parse_claim(Value::Nil).is_err());

        let group = |name: &str, lag: Value| {
            Value::Array(vec![
                bulk("name"),
                bulk(name),
                bulk("pending"),
                Value::Int(2),
                bulk("lag"),
                lag,
            ])
        };
        let reply = Value::Array(vec![
            group("other", Value::Int(9)),
            group("g", Value::Int(5)),
        ]);
        assert_eq!(
            parse_groups(reply, "g").ok().flatten(),
            Some(GroupLag {
                undelivered: Some(5),
                pending: 2
            })
        );
        let reply = Value::Array(vec![group("g", Value::Nil)]);
        assert_eq!(
            parse_groups(reply, "g")
                .ok()
                .flatten()
                .map(|l| l.undelivered),
            Some(None)
        );
        assert_eq!(parse_groups(Value::Array(vec![]), "g").ok(), Some(None));
    }
}
