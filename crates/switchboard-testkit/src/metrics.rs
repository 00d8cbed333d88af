//! Reading `/metrics` (Prometheus / OpenMetrics text) the way a scraper
//! does, with prometheus-parse. A series is named as it is written in the
//! text: `name` or `name{label="value",...}`, with its exact label set. A
//! series that is not there fails the test: a renamed metric must not read
//! as a quiet zero.

use std::collections::BTreeSet;

use prometheus_parse::{Sample, Scrape, Value};

/// One scrape of an instance's `/metrics`.
pub struct Metrics {
    samples: Vec<Sample>,
    /// Where the text came from, for failure messages.
    source: String,
}

impl Metrics {
    /// Parses the text exposition format.
    pub fn parse(text: &str) -> Metrics {
        Metrics {
            samples: parse_samples(text, "a /metrics text"),
            source: "this /metrics text".to_string(),
        }
    }

    /// Names the text's origin (e.g. `GET /metrics on i1`) in failure messages.
    pub(crate) fn described_as(mut self, source: String) -> Metrics {
        self.source = source;
        self
    }

    /// The value of one series (name and exact label set, as written in the
    /// text). Panics, listing the series that do exist, when it is missing.
    #[track_caller]
    pub fn value(&self, series: &str) -> f64 {
        let wanted = parse_series(series);
        let found = self
            .samples
            .iter()
            .find(|s| s.metric == wanted.metric && s.labels == wanted.labels);
        match found.map(|s| &s.value) {
            Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
            Some(other) => panic!(
                "{series} in {} is a histogram or summary ({other:?}): ask for its _count or _sum",
                self.source
            ),
            None => panic!(
                "no series {series} in {}; the series there are:\n  {}",
                self.source,
                self.series_names().join("\n  ")
            ),
        }
    }

    /// Every series, written like the keys [`Metrics::value`] takes, sorted.
    fn series_names(&self) -> Vec<String> {
        let names: BTreeSet<String> = self
            .samples
            .iter()
            .map(|s| {
                if s.labels.is_empty() {
                    s.metric.clone()
                } else {
                    format!("{}{{{}}}", s.metric, s.labels)
                }
            })
            .collect();
        names.into_iter().collect()
    }
}

fn parse_samples(text: &str, what: &str) -> Vec<Sample> {
    let lines = text.lines().map(|line| Ok(line.to_string()));
    Scrape::parse(lines)
        .unwrap_or_else(|e| panic!("{what} does not parse: {e}\n{text}"))
        .samples
}

/// The series a key names, parsed by the same parser as the text (as a
/// one-line text with a dummy value), so that both sides agree on labels.
fn parse_series(series: &str) -> Sample {
    let mut samples = parse_samples(&format!("{series} 0"), "a series key");
    match (samples.pop(), samples.is_empty()) {
        (Some(sample), true) => sample,
        _ => panic!("{series:?} is not a series key like name{{label=\"value\"}}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What prometheus-client writes: OpenMetrics, `_total` counters, `# EOF`.
    const TEXT: &str = "\
# HELP switchboard_connections Open WebSocket connections.
# TYPE switchboard_connections gauge
switchboard_connections 2
# HELP switchboard_closed_connections Connections closed by the server.
# TYPE switchboard_closed_connections counter
switchboard_closed_connections_total{reason=\"idle\"} 1
switchboard_closed_connections_total{reason=\"flooding\"} 0
# TYPE switchboard_redis_command_seconds histogram
switchboard_redis_command_seconds_sum 0.5
switchboard_redis_command_seconds_count 3
switchboard_redis_command_seconds_bucket{le=\"0.1\"} 3
switchboard_redis_command_seconds_bucket{le=\"+Inf\"} 3
# EOF
";

    #[test]
    fn reads_plain_and_labelled_series() {
        let metrics = Metrics::parse(TEXT);
        assert_eq!(metrics.value("switchboard_connections"), 2.0);
        assert_eq!(
            metrics.value(r#"switchboard_closed_connections_total{reason="idle"}"#),
            1.0
        );
        assert_eq!(
            metrics.value(r#"switchboard_closed_connections_total{reason="flooding"}"#),
            0.0
        );
        assert_eq!(
            metrics.value("switchboard_redis_command_seconds_count"),
            3.0
        );
    }

    #[test]
    #[should_panic(expected = "no series switchboard_conections in this /metrics text; \
                               the series there are:\n  switchboard_closed_connections_total")]
    fn a_misspelled_series_fails_and_lists_what_exists() {
        Metrics::parse(TEXT).value("switchboard_conections");
    }

    #[test]
    #[should_panic(expected = "no series switchboard_closed_connections_total in")]
    fn the_label_set_must_match_exactly() {
        Metrics::parse(TEXT).value("switchboard_closed_connections_total");
    }

    #[test]
    #[should_panic(expected = "no series switchboard_closed_connections_total{reason=\"slow\"}")]
    fn an_unknown_label_value_fails() {
        Metrics::parse(TEXT).value(r#"switchboard_closed_connections_total{reason="slow"}"#);
    }
}
