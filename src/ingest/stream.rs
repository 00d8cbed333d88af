//! The Redis Streams source (`--ingest-stream`): one consumer per instance
//! (named by the instance id) in the consumer group `--ingest-group`.
//!
//! This module owns the consumer's loop: which read comes next (the
//! consumer's own pending entries first — what a previous process with
//! this instance id read and did not acknowledge —, then at most every
//! half `--ingest-claim-ms` an `XAUTOCLAIM` step over every consumer's
//! entries idle longer than `--ingest-claim-ms` — after a full pass, at
//! most every [`FORGET_EVERY`], consumers idle ten times that with nothing
//! pending are removed from the group —, otherwise new entries
//! with a bounded `BLOCK`), processing each batch of at most
//! `--ingest-batch` entries — up to `--ingest-inflight` (and
//! `--ingest-inflight-bytes`) routed at once, entries for the same user or
//! room one after another in stream order ([`super::flight`]) — and
//! acknowledging the done ones; malformed entries are dead-lettered and
//! acknowledged; the lag gauge. Redis commands are issued by
//! [`StreamConsumer`] only; what a record means and how it is routed is
//! the core's ([`Ingest`]).
//!
//! In flight, at most one batch: nothing is read before the previous batch
//! is done (or shutdown interrupted it), so no queue grows behind a stalled
//! record. While a batch takes long (a record retried), its done entries
//! are acknowledged and the others kept claimed by this consumer
//! (`XCLAIM … JUSTID`) every third of `--ingest-claim-ms`, so other
//! instances do not take them over while it is alive. Per-user order holds
//! across the group only with one consumer: with several, entries are
//! spread over them as read, and two instances may route one user's
//! entries at the same time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use switchboard_core::metrics::Metrics;
use switchboard_core::protocol::MAX_KEY_LEN;
use switchboard_redis::ingest::{EntryContent, StreamEntry, VALUE_FIELD};
use switchboard_redis::{StreamConsumer, StreamSettings, StreamStart};

use super::flight::{Flight, Limits};
use super::{backoff, wait, worth_logging, Ingest, MalformedRecord};
use crate::config::{Config, IngestStart};

/// Longest `BLOCK` of a read of new entries: how long a shutdown may wait
/// for the read in progress.
const BLOCK: Duration = Duration::from_millis(500);

/// Consumers idle this many `--ingest-claim-ms` with nothing pending are
/// removed from the group (instances gone).
const FORGET_AFTER_CLAIMS: u32 = 10;

/// At most this often, after a full claim pass, idle consumers are looked
/// for.
const FORGET_EVERY: Duration = Duration::from_secs(10);

/// How often the lag gauge is refreshed (`XINFO GROUPS`).
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Attempts at copying a malformed entry to the dead-letter stream before
/// it is acknowledged without a copy.
const DEAD_LETTER_ATTEMPTS: u32 = 3;

/// The consumer's settings from the configuration.
pub fn settings(config: &Config, stream: &str) -> StreamSettings {
    let claim_idle = Duration::from_millis(config.ingest_claim_ms);
    StreamSettings {
        stream: stream.to_owned(),
        group: config.ingest_group.clone(),
        consumer: config.instance().to_owned(),
        start: match config.ingest_start {
            IngestStart::Earliest => StreamStart::Earliest,
            IngestStart::Latest => StreamStart::Latest,
        },
        batch: config.ingest_batch,
        block: BLOCK.min(claim_idle / 2),
        claim_idle,
        dead_letter: config.ingest_dead_letter_stream.clone(),
    }
}

/// The idempotency key of a DM entry that names none: `<stream>/<entry
/// id>`. When that is longer than the key limit (64 characters), the
/// stream name is replaced by `h` and 16 hex digits of its 64-bit FNV-1a
/// hash (`h1a2b…/1700000000000-0`, at most 59 characters): entry ids are
/// unique within a stream, so only two long stream names with the same
/// hash, feeding one user the same entry id within the idempotency window,
/// could collide.
pub fn default_key(stream: &str, id: &str) -> String {
    let key = format!("{stream}/{id}");
    if key.chars().count() <= MAX_KEY_LEN {
        return key;
    }
    let key = format!("h{:016x}/{id}", fnv1a(stream.as_bytes()));
    if key.chars().count() <= MAX_KEY_LEN {
        return key;
    }
    format!(
        "h{:016x}{:016x}",
        fnv1a(stream.as_bytes()),
        fnv1a(id.as_bytes())
    )
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Which read the loop makes next.
enum Next {
    /// This consumer's own pending entries after this id.
    OwnPending(String),
    /// An `XAUTOCLAIM` step.
    Claim,
    /// New entries.
    New,
}

/// Consumes the stream until `stop` is cancelled; the batch in progress is
/// finished (a retry wait is interrupted) and what is done acknowledged.
pub async fn run(
    core: Ingest,
    mut consumer: StreamConsumer,
    limits: Limits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let settings = consumer.settings().clone();
    let claim_every =
        (settings.claim_idle / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut failures = 0u32;
    while let Err(e) = consumer.ensure_group().await {
        failures += 1;
        if worth_logging(failures) {
            tracing::warn!(stream = %settings.stream, error = %e, "cannot create the consumer group; retrying");
        }
        if !wait(backoff(failures), &stop).await {
            return;
        }
    }
    failures = 0;
    let mut own_pending_after = Some("0".to_owned());
    let mut claim_cursor = "0-0".to_owned();
    // A first claim step at once: entries a crashed consumer left idle
    // long enough are taken over without waiting.
    let mut next_claim = Instant::now();
    let mut next_lag = Instant::now();
    let mut forget_due = false;
    let mut next_forget = Instant::now();
    while !stop.is_cancelled() {
        let now = Instant::now();
        if now >= next_lag {
            refresh_lag(&core, &mut consumer).await;
            next_lag = now + LAG_EVERY;
        }
        let next = match own_pending_after.take() {
            Some(after) => Next::OwnPending(after),
            None if now >= next_claim => Next::Claim,
            None => Next::New,
        };
        let read = match &next {
            Next::OwnPending(after) => consumer.read_own_pending(after).await,
            Next::Claim => consumer.claim(&claim_cursor).await.map(|c| {
                metrics.ingest_claimed.inc_by(c.entries.len() as u64);
                if !c.entries.is_empty() {
                    tracing::info!(
                        stream = %settings.stream,
                        entries = c.entries.len(),
                        "claimed entries idle past --ingest-claim-ms"
                    );
                }
                if c.cursor == "0-0" {
                    next_claim = Instant::now() + claim_every;
                    forget_due = true;
                }
                claim_cursor = c.cursor;
                c.entries
            }),
            Next::New => consumer.read_new().await,
        };
        if forget_due && Instant::now() >= next_forget {
            forget_due = false;
            next_forget = Instant::now() + FORGET_EVERY;
            let idle = settings.claim_idle.saturating_mul(FORGET_AFTER_CLAIMS);
            match consumer.forget_idle_consumers(idle).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(stream = %settings.stream, consumers = n, "removed consumers idle with nothing pending")
                }
                Err(e) => tracing::debug!(error = %e, "could not remove idle consumers"),
            }
        }
        let entries = match read {
            Ok(entries) => {
                failures = 0;
                entries
            }
            Err(e) => {
                failures += 1;
                if worth_logging(failures) {
                    tracing::warn!(stream = %settings.stream, error = %e, "reading the stream failed; retrying");
                }
                // A read whose answer was lost may have delivered entries
                // to this consumer: read its own pending ones again.
                own_pending_after = Some("0".to_owned());
                if !wait(backoff(failures), &stop).await {
                    break;
                }
                continue;
            }
        };
        if let Next::OwnPending(_) = next {
            // Continue after the last one; an empty answer ends them.
            own_pending_after = entries.last().map(|e| e.id.clone());
        }
        let done = process(&core, &mut consumer, &entries, limits, &stop).await;
        ack(&mut consumer, &done, &stop).await;
    }
    tracing::info!(stream = %settings.stream, "stopped consuming the stream");
}

/// Processes `entries`: up to `limits` of them routed at once, those
/// for the same user or room one after another in stream order; returns
/// the ids of those done (delivered, malformed, deleted) and not yet
/// acknowledged. While the batch takes long (a record retried), every
/// third of `--ingest-claim-ms` the done ones are acknowledged and the
/// others kept claimed by this consumer. Stops early only when `stop`
/// interrupts retries.
async fn process(
    core: &Ingest,
    consumer: &mut StreamConsumer,
    entries: &[StreamEntry],
    limits: Limits,
    stop: &CancellationToken,
) -> Vec<String> {
    let stream = consumer.settings().stream.clone();
    let keep_every = consumer.settings().claim_idle / 3;
    let mut batch = Batch {
        entries,
        finished: vec![false; entries.len()],
        done: Vec::with_capacity(entries.len()),
        flight: Flight::default(),
        keep_every,
        keep_at: Instant::now() + keep_every,
    };
    for (i, entry) in entries.iter().enumerate() {
        let value = match &entry.content {
            EntryContent::Deleted => {
                batch.mark_done(i);
                continue;
            }
            EntryContent::NoValue => Err(MalformedRecord::NoValue { field: VALUE_FIELD }),
            EntryContent::Value(value) => Ok(value),
        };
        let size = value.as_ref().map_or(0, |v| v.len());
        let key = default_key(&stream, &entry.id);
        let record = match value.and_then(|value| core.parse(value, &key)) {
            Ok(record) => record,
            Err(malformed) => {
                dead_letter(core, consumer, entry, &malformed, stop).await;
                batch.mark_done(i);
                continue;
            }
        };
        while !limits.fit(batch.flight.len(), batch.flight.bytes(), size) {
            if !batch.finish_one(core, consumer).await {
                break;
            }
        }
        let order_key = record.order_key();
        let position = format!("{stream}/{}", entry.id);
        let task_core = core.clone();
        let stop = stop.clone();
        core.counters().in_flight.inc();
        batch.flight.add(i, Some(order_key), size, async move {
            task_core.deliver(&record, &position, &stop).await
        });
    }
    while batch.finish_one(core, consumer).await {}
    batch.done
}

/// One batch being processed.
struct Batch<'a> {
    entries: &'a [StreamEntry],
    /// Per entry: done.
    finished: Vec<bool>,
    /// Ids done and not yet acknowledged.
    done: Vec<String>,
    /// Entries being routed, by index.
    flight: Flight<usize>,
    keep_every: Duration,
    /// When the done ones are acknowledged and the others kept claimed.
    keep_at: Instant,
}

impl Batch<'_> {
    /// Entry `i` is done.
    fn mark_done(&mut self, i: usize) {
        if let (Some(entry), Some(flag)) = (self.entries.get(i), self.finished.get_mut(i)) {
            self.done.push(entry.id.clone());
            *flag = true;
        }
    }

    /// Waits for the next entry in flight to finish and records it; false
    /// when nothing is in flight. Each time `keep_at` passes meanwhile,
    /// acknowledges the done ones and keeps the others claimed
    /// (`XCLAIM … JUSTID`), so no other instance takes them over while
    /// this one is alive.
    async fn finish_one(&mut self, core: &Ingest, consumer: &mut StreamConsumer) -> bool {
        loop {
            if self.flight.is_empty() {
                return false;
            }
            tokio::select! {
                finish = self.flight.next() => {
                    let Some(finish) = finish else { return false };
                    core.counters().in_flight.dec();
                    if finish.done {
                        self.mark_done(finish.position);
                    }
                    return true;
                }
                _ = tokio::time::sleep_until(self.keep_at.into()) => {
                    if !self.done.is_empty() && consumer.ack(&self.done).await.is_ok() {
                        self.done.clear();
                    }
                    let rest: Vec<String> = self
                        .entries
                        .iter()
                        .zip(&self.finished)
                        .filter(|(_, finished)| !**finished)
                        .map(|(e, _)| e.id.clone())
                        .collect();
                    if let Err(e) = consumer.keep(&rest).await {
                        tracing::debug!(error = %e, "could not keep the batch's entries claimed");
                    }
                    self.keep_at = Instant::now() + self.keep_every;
                }
            }
        }
    }
}

/// Counts and logs a malformed entry (never its value) and copies it to
/// the dead-letter stream when one is set.
async fn dead_letter(
    core: &Ingest,
    consumer: &mut StreamConsumer,
    entry: &StreamEntry,
    malformed: &MalformedRecord,
    stop: &CancellationToken,
) {
    core.counters().malformed.inc();
    let stream = consumer.settings().stream.clone();
    let reason = malformed.to_string();
    tracing::warn!(stream = %stream, id = %entry.id, error = %reason, "malformed record; acknowledged without delivery");
    for attempt in 1..=DEAD_LETTER_ATTEMPTS {
        match consumer.dead_letter(entry, &reason).await {
            Ok(_) => return,
            Err(e) if attempt == DEAD_LETTER_ATTEMPTS => {
                tracing::warn!(stream = %stream, id = %entry.id, error = %e, "could not copy the malformed record to the dead-letter stream");
            }
            Err(_) => {
                if !wait(backoff(attempt), stop).await {
                    return;
                }
            }
        }
    }
}

/// Acknowledges `ids`, retrying with backoff until it works or `stop` is
/// cancelled (then they stay pending and are claimed or re-read later: a
/// DM's key makes that safe).
async fn ack(consumer: &mut StreamConsumer, ids: &[String], stop: &CancellationToken) {
    let mut attempt = 0u32;
    loop {
        match consumer.ack(ids).await {
            Ok(()) => return,
            Err(e) => {
                attempt += 1;
                if worth_logging(attempt) {
                    tracing::warn!(entries = ids.len(), error = %e, "acknowledging entries failed; retrying");
                }
                if !wait(backoff(attempt), stop).await {
                    return;
                }
            }
        }
    }
}

/// The lag gauge: entries not yet delivered to the group plus those
/// delivered and not yet acknowledged. Left as it is when Redis cannot
/// tell.
async fn refresh_lag(core: &Ingest, consumer: &mut StreamConsumer) {
    match consumer.lag().await {
        Ok(Some(lag)) => {
            if let Some(undelivered) = lag.undelivered {
                let total = undelivered.saturating_add(lag.pending);
                core.counters()
                    .lag
                    .set(i64::try_from(total).unwrap_or(i64::MAX));
            }
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "could not read the stream's lag"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_keys_fit_the_key_limit() {
        assert_eq!(default_key("events", "1-0"), "events/1-0");
        let long = "s".repeat(100);
        let id = "18446744073709551615-18446744073709551615";
        let key = default_key(&long, id);
        assert!(key.chars().count() <= MAX_KEY_LEN, "{key}");
        assert!(key.ends_with(id), "{key}");
        assert_ne!(key, default_key(&"t".repeat(100), id));
        assert_eq!(key, default_key(&long, id), "deterministic");
        let weird = default_key(&long, &"9".repeat(80));
        assert!(weird.chars().count() <= MAX_KEY_LEN, "{weird}");
    }
}
