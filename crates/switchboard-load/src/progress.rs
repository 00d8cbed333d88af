//! Progress on stderr while a step runs: an indicatif bar when stderr is a
//! terminal, otherwise one plain line per second (sent/s, delivered/s, p99 so
//! far). Reads the step's atomic counters; never touches the message path.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::state::{lock, StepState};

/// Reports `step` until its `done` flag is set. `label` names the step.
pub async fn report(step: Arc<StepState>, label: String, quiet: bool) {
    if quiet {
        return;
    }
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let bar = ProgressBar::new(step.msgs.len() as u64);
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(label.clone());
        bar
    });
    let period = if tty {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(1)
    };
    // Check for the end of the step often, report once per period.
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let started = std::time::Instant::now();
    let (mut last_sent, mut last_del, mut last_t) = (0u64, 0u64, 0.0f64);
    while !step.done.load(Ordering::Relaxed) {
        ticker.tick().await;
        if step.done.load(Ordering::Relaxed) {
            break;
        }
        if started.elapsed().as_secs_f64() - last_t < period.as_secs_f64() {
            continue;
        }
        let t = started.elapsed().as_secs_f64();
        let sent = step.c.sent.load(Ordering::Relaxed);
        let del = step.c.delivered.load(Ordering::Relaxed);
        let dt = (t - last_t).max(1e-3);
        let p99 = {
            let h = lock(&step.hists);
            (!h.latency.is_empty()).then(|| h.latency.value_at_quantile(0.99) as f64 / 1000.0)
        };
        let p99 = p99.map_or_else(|| "-".to_owned(), |p| format!("{p:.2}ms"));
        let line = format!(
            "sent/s {:.0} delivered/s {:.0} p99 {p99} lost-conns {}",
            (sent - last_sent) as f64 / dt,
            del.saturating_sub(last_del) as f64 / dt,
            step.c.disconnects.load(Ordering::Relaxed),
        );
        match &bar {
            Some(bar) => {
                bar.set_position(sent);
                bar.set_message(line);
            }
            None => eprintln!("[{label} t={t:.1}s] {line}"),
        }
        (last_sent, last_del, last_t) = (sent, del, t);
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}
