//! The benchmark's error type: one enum for everything that can stop a run or
//! the whole matrix, each variant carrying enough context to act on.

use std::path::PathBuf;

/// Why a run (or the whole benchmark) could not complete.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file or directory operation failed.
    #[error("{context} ({path}): {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        /// Our name for the process (`redis`, `n1`, `loader`).
        name: String,
        /// The program that failed to start.
        program: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A process exited while it was needed.
    #[error("{name} exited early ({status}); last log lines:\n{log_tail}")]
    ExitedEarly {
        /// Our name for the process.
        name: String,
        /// How it exited.
        status: String,
        /// The end of its log, to see why.
        log_tail: String,
    },
    /// A process did not become ready in time.
    #[error("{name} not ready after {seconds} s; last log lines:\n{log_tail}")]
    NotReady {
        /// Our name for the process.
        name: String,
        /// How long we waited.
        seconds: f64,
        /// The end of its log, to see why.
        log_tail: String,
    },
    /// Talking to the benchmark's redis-server failed.
    #[error("redis: {0}")]
    Redis(String),
    /// The load generator failed or produced unusable output.
    #[error("loader: {0}")]
    Loader(String),
    /// The results could not be written or rendered.
    #[error("report: {0}")]
    Report(String),
    /// Ctrl-C or SIGTERM.
    #[error("interrupted")]
    Interrupted,
}

impl BenchError {
    /// An [`BenchError::Io`] with its context.
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BenchError::Io {
            context,
            path: path.into(),
            source,
        }
    }
}
