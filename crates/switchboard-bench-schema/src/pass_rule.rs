//! The pass rule, once: whether a step sustained its rate. The loader applies
//! it to write `pass` and `fail_reasons`; the benchmark applies it again to
//! the same [`StepResult`] with its own thresholds, so the two verdicts can
//! only differ when the thresholds do.
//!
//! The rule is the Socket.IO peer benchmark's (delivered >= 99% and p99 <=
//! 100 ms by default) plus what that benchmark cannot see but this loader
//! counts: messages never sent, error answers, duplicates, misrouted
//! deliveries and lost connections. Every boundary is inclusive on the
//! passing side: a p99 equal to the maximum passes, a delivery ratio equal
//! to the minimum passes.

use serde::{Deserialize, Serialize};

use crate::StepResult;

/// Thresholds of the pass rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PassRule {
    /// Delivered / expected (and sent / offered) must be at least this; a
    /// share of `1 - min_delivery` of the sent messages may be answered with
    /// an error.
    pub min_delivery: f64,
    /// p99 of the end-to-end latency must be at most this, ms.
    pub max_p99_ms: f64,
}

impl Default for PassRule {
    fn default() -> Self {
        PassRule::PEER
    }
}

impl PassRule {
    /// The Socket.IO peer benchmark's thresholds: 99 % delivered, p99 <= 100 ms.
    pub const PEER: PassRule = PassRule {
        min_delivery: 0.99,
        max_p99_ms: 100.0,
    };

    /// Every condition `step` fails, in words; empty when it passes.
    pub fn failures(&self, step: &StepResult) -> Vec<String> {
        let mut failures = Vec::new();
        let pct = percent(self.min_delivery);
        match step.delivery_ratio {
            None => failures.push("no deliveries were expected".to_owned()),
            Some(ratio) if ratio < self.min_delivery => failures.push(format!(
                "delivered {} ({:.2}% of expected) < {pct}%",
                step.delivered,
                ratio * 100.0
            )),
            Some(_) => {}
        }
        if (step.sent as f64) < self.min_delivery * step.offered as f64 {
            failures.push(format!(
                "sent only {} of {} offered messages (< {pct}%)",
                step.sent, step.offered
            ));
        }
        match step.latency_ms.p99 {
            None => failures.push("no latency recorded".to_owned()),
            Some(p99) if p99 > self.max_p99_ms => {
                failures.push(format!("p99 {p99} ms > {} ms", self.max_p99_ms))
            }
            Some(_) => {}
        }
        let errors = step.acks.error;
        if errors > 0 && errors as f64 > (1.0 - self.min_delivery) * step.sent as f64 {
            failures.push(format!("{errors} messages answered with an error"));
        }
        if step.duplicated > 0 {
            failures.push(format!("{} deliveries duplicated", step.duplicated));
        }
        if step.misrouted > 0 {
            failures.push(format!("{} deliveries misrouted", step.misrouted));
        }
        if step.disconnects > 0 {
            failures.push(format!("{} connections lost", step.disconnects));
        }
        failures
    }

    /// Whether `step` passes ([`PassRule::failures`] is empty).
    pub fn passes(&self, step: &StepResult) -> bool {
        self.failures(step).is_empty()
    }

    /// The rule in words, for result files and reports.
    pub fn describe(&self) -> String {
        let pct = percent(self.min_delivery);
        let error_pct = round3(100.0 - pct);
        format!(
            "delivered >= {pct}% of expected and p99 <= {} ms (expected: every sent message as if \
             routed, except under churn); also sent >= {pct}% of offered, errors <= {error_pct}% of \
             sent, nothing duplicated or misrouted, no lost connections",
            self.max_p99_ms
        )
    }
}

/// A share as a percentage, rounded so 0.99 prints as 99.
fn percent(share: f64) -> f64 {
    round3(share * 100.0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::tests::step;

    const RULE: PassRule = PassRule::PEER;

    #[test]
    fn p99_at_the_maximum_passes_and_just_above_fails() {
        assert!(RULE.passes(&step(1000.0, 100.0, true)));
        let failures = RULE.failures(&step(1000.0, 100.001, true));
        assert_eq!(failures, vec!["p99 100.001 ms > 100 ms".to_owned()]);
        let mut no_latency = step(1000.0, 1.0, true);
        no_latency.latency_ms.p99 = None;
        assert_eq!(RULE.failures(&no_latency), vec!["no latency recorded"]);
    }

    #[test]
    fn delivery_at_the_minimum_passes_and_just_below_fails() {
        let mut s = step(1000.0, 5.0, true);
        s.delivered = 9_900;
        s.delivery_ratio = Some(0.99);
        assert!(RULE.passes(&s), "{:?}", RULE.failures(&s));
        s.delivered = 9_899;
        s.delivery_ratio = Some(0.9899);
        assert_eq!(RULE.failures(&s).len(), 1);
        s.delivery_ratio = None;
        assert_eq!(RULE.failures(&s), vec!["no deliveries were expected"]);
    }

    #[test]
    fn sent_share_and_error_share_have_the_same_boundary() {
        let mut s = step(1000.0, 5.0, true);
        s.sent = 9_900;
        s.acks.error = 99;
        assert!(RULE.passes(&s), "{:?}", RULE.failures(&s));
        s.sent = 9_899;
        s.acks.error = 100;
        assert_eq!(RULE.failures(&s).len(), 2, "{:?}", RULE.failures(&s));
    }

    #[test]
    fn any_duplicate_misroute_or_lost_connection_fails() {
        for (what, set) in [
            (
                "duplicated",
                (|s: &mut StepResult| s.duplicated = 1) as fn(&mut StepResult),
            ),
            ("misrouted", |s| s.misrouted = 1),
            ("connections lost", |s| s.disconnects = 1),
        ] {
            let mut s = step(1000.0, 5.0, true);
            set(&mut s);
            let failures = RULE.failures(&s);
            assert_eq!(failures.len(), 1, "{what}: {failures:?}");
            assert!(failures[0].contains(what), "{what}: {failures:?}");
        }
    }

    #[test]
    fn thresholds_are_the_callers() {
        let strict = PassRule {
            min_delivery: 1.0,
            max_p99_ms: 10.0,
        };
        assert!(!strict.passes(&step(1000.0, 10.5, true)));
        assert!(strict.passes(&step(1000.0, 10.0, true)));
    }

    #[test]
    fn describes_itself_with_its_thresholds() {
        let text = RULE.describe();
        assert!(text.starts_with("delivered >= 99% of expected and p99 <= 100 ms"));
        assert!(text.contains("errors <= 1% of sent"), "{text}");
    }
}
