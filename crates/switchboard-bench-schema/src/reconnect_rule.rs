//! The pass rule of a reconnect storm, once: every client of a killed
//! instance reconnects to a survivor, none gives up, and the last one is
//! back within `within_s` of the kill. Zero failures is the rule; there is no
//! tolerated share.
//!
//! The loaders count (one [`ConnectionsRun`] each); the orchestrator, which
//! knows when it killed the instance, adds them up into a [`StormTally`] and
//! applies the rule to it.

use serde::{Deserialize, Serialize};

use crate::ConnectionsRun;

/// A reconnect storm, added up over every loader process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StormTally {
    /// Connections open on the instance when it was killed.
    pub expected: u64,
    /// Connections that saw it go (and started reconnecting).
    pub lost: u64,
    /// Reconnected to a survivor.
    pub reconnected: u64,
    /// Reconnected within the loader's bound of their own loss.
    pub reconnected_within: u64,
    /// Gave up (or were stopped while still trying).
    pub failed: u64,
    /// Still trying when the documents were written.
    pub pending: u64,
    /// Attempts, retries included.
    pub attempts: u64,
    /// From the kill to the last reconnect, s (`None`: none reconnected).
    pub storm_s: Option<f64>,
}

impl StormTally {
    /// Adds up the loaders' documents; `expected` are the connections the
    /// killed instance held, `killed_unix_ms` when it was killed.
    pub fn of(runs: &[ConnectionsRun], expected: u64, killed_unix_ms: f64) -> StormTally {
        let mut tally = StormTally {
            expected,
            ..StormTally::default()
        };
        let mut last: Option<f64> = None;
        for summary in runs.iter().filter_map(|r| r.reconnect.as_ref()) {
            tally.lost += summary.started;
            tally.reconnected += summary.reconnected;
            tally.reconnected_within += summary.reconnected_within;
            tally.failed += summary.failed;
            tally.pending += summary.pending;
            tally.attempts += summary.attempts;
            if let Some(t) = summary.last_reconnect_unix_ms {
                last = Some(last.map_or(t, |l: f64| l.max(t)));
            }
        }
        tally.storm_s = last.map(|t| ((t - killed_unix_ms) / 1000.0).max(0.0));
        tally
    }
}

/// The bound of the rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReconnectRule {
    /// Every client must be reconnected within this many seconds of the kill.
    pub within_s: f64,
}

impl ReconnectRule {
    /// Every condition `tally` fails, in words; empty when it passes.
    pub fn failures(&self, tally: &StormTally) -> Vec<String> {
        let mut failures = Vec::new();
        if tally.expected == 0 {
            failures.push("no connection was open on the killed instance".to_owned());
            return failures;
        }
        if tally.lost < tally.expected {
            failures.push(format!(
                "only {} of {} connections saw the instance go",
                tally.lost, tally.expected
            ));
        }
        if tally.failed > 0 {
            failures.push(format!("{} reconnects failed", tally.failed));
        }
        if tally.pending > 0 {
            failures.push(format!("{} reconnects still pending", tally.pending));
        }
        if tally.reconnected < tally.expected {
            failures.push(format!(
                "{} of {} clients reconnected",
                tally.reconnected, tally.expected
            ));
        }
        match tally.storm_s {
            None => failures.push("no client reconnected".to_owned()),
            Some(s) if s > self.within_s => failures.push(format!(
                "the last client reconnected {s:.2} s after the kill (> {} s)",
                self.within_s
            )),
            Some(_) => {}
        }
        failures
    }

    /// The rule in words, for reports.
    pub fn describe(&self) -> String {
        format!(
            "every client of the killed instance reconnects to a survivor within {} s of the \
             kill; zero failures",
            self.within_s
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ConnectPhase, ConnectionsTag, HoldPhase, HoldSummary, NofileLimit, ReconnectSummary,
    };

    fn loader(started: u64, reconnected: u64, failed: u64, last_ms: Option<f64>) -> ConnectionsRun {
        ConnectionsRun {
            mode: ConnectionsTag::Connections,
            phase: HoldPhase::Done,
            pid: 1,
            targets: Vec::new(),
            source_addrs: Vec::new(),
            auth: "jwt".into(),
            user_prefix: "c".into(),
            nofile: NofileLimit::default(),
            connect: ConnectPhase::default(),
            hold: HoldSummary::default(),
            reconnect: Some(ReconnectSummary {
                started,
                reconnected,
                reconnected_within: reconnected,
                failed,
                attempts: reconnected + failed,
                last_reconnect_unix_ms: last_ms,
                ..ReconnectSummary::default()
            }),
            stop_reason: None,
            rss_kib: None,
            cpu_s: 0.0,
            elapsed_s: 0.0,
            updated_unix_ms: 0.0,
        }
    }

    #[test]
    fn all_back_in_time_passes_and_anything_less_fails() {
        let rule = ReconnectRule { within_s: 5.0 };
        let kill = 1_000_000.0;
        let ok = [
            loader(500, 500, 0, Some(kill + 2_000.0)),
            loader(500, 500, 0, Some(kill + 4_999.0)),
        ];
        let tally = StormTally::of(&ok, 1000, kill);
        assert_eq!(tally.reconnected, 1000);
        assert_eq!(tally.storm_s, Some(4.999));
        assert!(
            rule.failures(&tally).is_empty(),
            "{:?}",
            rule.failures(&tally)
        );

        let late = [loader(1000, 1000, 0, Some(kill + 5_001.0))];
        let failures = rule.failures(&StormTally::of(&late, 1000, kill));
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].contains("5.00 s after the kill"),
            "{failures:?}"
        );

        let one_failed = [loader(1000, 999, 1, Some(kill + 1_000.0))];
        let failures = rule.failures(&StormTally::of(&one_failed, 1000, kill));
        assert!(failures.iter().any(|f| f.contains("1 reconnects failed")));
        assert!(failures.iter().any(|f| f.contains("999 of 1000")));

        let unseen = [loader(900, 900, 0, Some(kill + 1_000.0))];
        let failures = rule.failures(&StormTally::of(&unseen, 1000, kill));
        assert!(failures
            .iter()
            .any(|f| f.contains("900 of 1000 connections saw")));

        assert!(!rule.failures(&StormTally::of(&[], 0, kill)).is_empty());
        assert!(!rule
            .failures(&StormTally::of(&[loader(5, 0, 5, None)], 5, kill))
            .is_empty());
    }
}
