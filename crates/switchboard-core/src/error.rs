//! The one error the shared backend (Redis, or the in-process hub) reports
//! to the router, and what each variant promises about the request.
//!
//! The distinction matters to clients: a request that surely did nothing can
//! be retried blindly; one that may have taken effect (a DM that may have
//! been published) must not be, or the recipient sees it twice.

/// Any error, boxed, kept as the source of a [`BackendError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the shared backend did not carry out a request.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request was never sent, or the backend refused it: nothing
    /// happened, a retry is safe. Clients see `unavailable`.
    #[error("the shared backend is unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The request was sent but no answer came in time (or the connection
    /// broke while it was outstanding): it may have taken effect. Clients
    /// see `timeout`.
    #[error("the shared backend did not answer in time: {0}")]
    Timeout(#[source] BoxError),
}

impl BackendError {
    /// An [`BackendError::Unavailable`] with a plain message.
    pub fn unavailable(message: impl Into<String>) -> Self {
        BackendError::Unavailable(message.into().into())
    }

    /// Whether the request may have taken effect.
    pub fn is_timeout(&self) -> bool {
        matches!(self, BackendError::Timeout(_))
    }
}
