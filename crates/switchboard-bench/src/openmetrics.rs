//! Parsing an instance's `GET /metrics` text (Prometheus / OpenMetrics
//! exposition) into samples, and reading counters out of it by name and
//! label. A metric or label value the server does not export reads as 0, so
//! the benchmark works against older and newer servers alike.

use std::collections::BTreeMap;

/// Every sample of one scrape, keyed by the series as written
/// (`name{label="value"}`), histogram buckets left out.
pub type Scrape = BTreeMap<String, f64>;

/// Parses the exposition text. Comment lines, `_bucket` series and lines that
/// do not parse are skipped.
pub fn parse(text: &str) -> Scrape {
    let mut out = Scrape::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The series ends at the closing brace if there are labels (label
        // values may hold spaces), else at the first space.
        let series_end = match (line.find('{'), line.find(' ')) {
            (Some(open), Some(space)) if open < space => match line.rfind('}') {
                Some(close) => close + 1,
                None => continue,
            },
            (_, Some(space)) => space,
            _ => continue,
        };
        let (series, rest) = line.split_at(series_end);
        if series_name(series).ends_with("_bucket") {
            continue;
        }
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        out.insert(series.to_owned(), value);
    }
    out
}

fn series_name(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

/// The labels of a series as `(name, value)` pairs.
fn labels(series: &str) -> Vec<(String, String)> {
    let Some(open) = series.find('{') else {
        return Vec::new();
    };
    let inner = series[open + 1..].trim_end_matches('}');
    let mut out = Vec::new();
    let mut rest = inner;
    while let Some(eq) = rest.find('=') {
        let name = rest[..eq].trim().trim_start_matches(',').trim().to_owned();
        let after = &rest[eq + 1..];
        let Some(after_quote) = after.strip_prefix('"') else {
            break;
        };
        // Find the closing quote, skipping escaped ones.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after_quote.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let Some(end) = end else { break };
        out.push((name, after_quote[..end].to_owned()));
        rest = &after_quote[end + 1..];
    }
    out
}

/// Sum of every series named `name` whose labels include `label` (any series
/// of that name when `label` is `None`). 0 when none exists.
pub fn sum(scrape: &Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    scrape
        .iter()
        .filter(|(series, _)| series_name(series) == name)
        .filter(|(series, _)| match label {
            None => true,
            Some((k, v)) => labels(series).iter().any(|(lk, lv)| lk == k && lv == v),
        })
        .map(|(_, value)| *value)
        .sum()
}

/// Every value of `label` seen on series named `name`, with the series' value.
pub fn by_label(scrape: &Scrape, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (series, value) in scrape {
        if series_name(series) != name {
            continue;
        }
        for (k, v) in labels(series) {
            if k == label {
                *out.entry(v).or_insert(0.0) += *value;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP switchboard_connections Open WebSocket connections\n\
# TYPE switchboard_connections gauge\n\
switchboard_connections 200\n\
switchboard_bus_received_total{kind=\"personal\"} 12\n\
switchboard_bus_received_total{kind=\"room\"} 3\n\
switchboard_dropped_total{reason=\"slow consumer, \\\"bad\\\"\"} 2\n\
switchboard_redis_command_seconds_bucket{le=\"0.001\"} 9\n\
switchboard_redis_command_seconds_count 9\n\
# EOF\n";

    #[test]
    fn reads_counters_by_label_and_treats_absent_as_zero() {
        let s = parse(TEXT);
        assert_eq!(sum(&s, "switchboard_connections", None), 200.0);
        assert_eq!(
            sum(
                &s,
                "switchboard_bus_received_total",
                Some(("kind", "personal"))
            ),
            12.0
        );
        assert_eq!(sum(&s, "switchboard_bus_received_total", None), 15.0);
        assert_eq!(
            sum(&s, "switchboard_bus_received_total", Some(("kind", "user"))),
            0.0
        );
        assert_eq!(sum(&s, "switchboard_missing_total", None), 0.0);
        assert_eq!(
            by_label(&s, "switchboard_dropped_total", "reason").get("slow consumer, \\\"bad\\\""),
            Some(&2.0)
        );
        assert!(!s.keys().any(|k| k.contains("_bucket")));
        assert_eq!(
            sum(&s, "switchboard_redis_command_seconds_count", None),
            9.0
        );
    }
}
