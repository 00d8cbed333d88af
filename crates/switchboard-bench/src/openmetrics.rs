//! An instance's `GET /metrics` text (Prometheus / OpenMetrics exposition),
//! parsed by `prometheus-parse` into series (or series built from the
//! Socket.IO peer's `/stats`), and the counters read out of it by name and
//! label. A metric or label value the server does not export
//! reads as 0, so the benchmark works against older and newer servers alike.
//!
//! Histogram buckets are left out (their `_sum` and `_count` stay): the
//! benchmark subtracts counters, and buckets would triple the size of every
//! snapshot in the results file. `prometheus-parse` takes label values
//! verbatim (no unescaping, no commas inside a value), which fits the
//! server's fixed label values (`kind="personal"`, `reason="slow_consumer"`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One series: a metric name, its labels, its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The metric name as exported (`switchboard_dm_total`).
    pub name: String,
    /// Label name to value, as written.
    pub labels: BTreeMap<String, String>,
    /// The sample value.
    pub value: f64,
}

impl Series {
    /// `name{label="value",...}`: how the series is written in the exposition
    /// text, and the key it is stored under in the results file.
    fn key(&self) -> String {
        if self.labels.is_empty() {
            return self.name.clone();
        }
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        format!("{}{{{}}}", self.name, labels.join(","))
    }
}

/// Every counter, gauge and untyped series of one scrape. In the results
/// JSON it is the map `{"name{label=\"value\"}": value}` (the form the
/// previous versions of the benchmark wrote, so their files still read).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "BTreeMap<String, f64>", from = "BTreeMap<String, f64>")]
pub struct Scrape {
    series: Vec<Series>,
}

impl Scrape {
    /// Parses exposition text. Comments, histogram buckets, summary
    /// quantiles, non-finite values and lines that do not parse are skipped.
    pub fn parse(text: &str) -> Scrape {
        let lines = text.lines().map(|line| Ok(line.to_owned()));
        // The only error `prometheus-parse` reports is one of the line
        // iterator, and these lines come from a string.
        let Ok(parsed) = prometheus_parse::Scrape::parse(lines) else {
            return Scrape::default();
        };
        let mut series: Vec<Series> = parsed
            .samples
            .into_iter()
            .filter_map(|sample| {
                let value = match sample.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    prometheus_parse::Value::Histogram(_) | prometheus_parse::Value::Summary(_) => {
                        return None
                    }
                };
                value.is_finite().then(|| Series {
                    name: sample.metric,
                    labels: sample
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    value,
                })
            })
            .collect();
        // In series order, so equal scrapes compare equal however they were written.
        series.sort_by_cached_key(Series::key);
        Scrape { series }
    }

    /// A scrape of these series: counters read from something other than
    /// exposition text (the Socket.IO peer's `/stats`).
    pub fn from_series(mut series: Vec<Series>) -> Scrape {
        series.retain(|s| s.value.is_finite());
        series.sort_by_cached_key(Series::key);
        Scrape { series }
    }

    /// Sum of every series named `name` whose labels include `label` (any
    /// series of that name when `label` is `None`). 0 when none exists.
    pub fn sum(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        self.series
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| match label {
                None => true,
                Some((k, v)) => s.labels.get(k).is_some_and(|value| value == v),
            })
            .map(|s| s.value)
            .sum()
    }

    /// Sum of every series named `name` whose labels include all of
    /// `labels`. 0 when none exists.
    pub fn sum_where(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Whether a series named `name` with all of `labels` exists (a
    /// counter the server does not export reads as 0 everywhere else).
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Series> + 'a {
        self.series.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|value| value == v))
        })
    }

    /// Every value of `label` seen on series named `name`, with the sum of
    /// their values.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.series.iter().filter(|s| s.name == name) {
            if let Some(value) = s.labels.get(label) {
                *out.entry(value.clone()).or_insert(0.0) += s.value;
            }
        }
        out
    }
}

impl From<Scrape> for BTreeMap<String, f64> {
    fn from(scrape: Scrape) -> Self {
        scrape
            .series
            .into_iter()
            .map(|s| (s.key(), s.value))
            .collect()
    }
}

impl From<BTreeMap<String, f64>> for Scrape {
    /// Reads the stored form back: each entry is one line of exposition text.
    fn from(stored: BTreeMap<String, f64>) -> Self {
        let text: String = stored
            .iter()
            .map(|(key, value)| format!("{key} {value}\n"))
            .collect();
        Scrape::parse(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP switchboard_connections Open WebSocket connections\n\
# TYPE switchboard_connections gauge\n\
switchboard_connections 200\n\
# HELP switchboard_bus_received Bus messages received by this instance, by channel kind\n\
# TYPE switchboard_bus_received counter\n\
switchboard_bus_received_total{kind=\"personal\"} 12\n\
switchboard_bus_received_total{kind=\"room\"} 3\n\
switchboard_dropped_total{reason=\"slow_consumer\"} 2\n\
# TYPE switchboard_redis_command_seconds histogram\n\
# UNIT switchboard_redis_command_seconds seconds\n\
switchboard_redis_command_seconds_sum 0.004\n\
switchboard_redis_command_seconds_count 9\n\
switchboard_redis_command_seconds_bucket{le=\"0.001\"} 9\n\
switchboard_redis_command_seconds_bucket{le=\"+Inf\"} 9\n\
# EOF\n";

    #[test]
    fn reads_counters_by_label_and_treats_absent_as_zero() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.sum("switchboard_connections", None), 200.0);
        assert_eq!(
            s.sum("switchboard_bus_received_total", Some(("kind", "personal"))),
            12.0
        );
        assert_eq!(s.sum("switchboard_bus_received_total", None), 15.0);
        assert_eq!(
            s.sum("switchboard_bus_received_total", Some(("kind", "user"))),
            0.0
        );
        assert_eq!(s.sum("switchboard_missing_total", None), 0.0);
        assert_eq!(
            s.by_label("switchboard_dropped_total", "reason")
                .get("slow_consumer"),
            Some(&2.0)
        );
        assert_eq!(s.sum("switchboard_redis_command_seconds_count", None), 9.0);
        let stored = BTreeMap::from(s);
        assert!(!stored.keys().any(|k| k.contains("bucket")), "{stored:?}");
    }

    #[test]
    fn stored_form_is_the_series_text_and_reads_back() {
        let s = Scrape::parse(TEXT);
        let json = serde_json::to_value(&s).expect("serializes");
        assert_eq!(
            json["switchboard_bus_received_total{kind=\"personal\"}"],
            12.0
        );
        assert_eq!(json["switchboard_connections"], 200.0);
        let back: Scrape = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, s);
        // A snapshot as an earlier benchmark wrote it.
        let old: Scrape = serde_json::from_str(
            r#"{"switchboard_connections": 200.0,
                "switchboard_dm_total{path=\"routed\"}": 7.0,
                "switchboard_dm_total{path=\"local\"}": 3.0}"#,
        )
        .expect("reads");
        assert_eq!(old.sum("switchboard_dm_total", None), 10.0);
        assert_eq!(old.by_label("switchboard_dm_total", "path").len(), 2);
    }
}
