//! The one error type of the store API.

use std::error::Error as StdError;
use std::fmt;

/// A boxed error, as tower and hyper pass them around.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What kind of failure a [`StoreError`] is, for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The store could not be reached or did not answer in time; retrying may work.
    Unavailable,
    /// A fenced operation presented a token that no longer owns the key: another
    /// request took it over, or the record was purged.
    Conflict,
    /// The store holds data this build cannot read.
    Corrupt,
    /// The store's settings (its URL, its options) cannot work; retrying will not help.
    Invalid,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub struct StoreError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<BoxError>,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StoreError {
    /// The store is unreachable or failed; `source` says why.
    pub fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self { kind: ErrorKind::Unavailable, message: message.into(), source: Some(source.into()) }
    }

    /// The lease presented is no longer the owner's.
    pub fn lease_lost() -> Self {
        Self { kind: ErrorKind::Conflict, message: "the lease is no longer held".into(), source: None }
    }

    /// The store holds unreadable data.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Corrupt, message: message.into(), source: None }
    }

    /// The store's settings cannot work (a malformed URL, an unknown option).
    pub fn invalid(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self { kind: ErrorKind::Invalid, message: message.into(), source: Some(source.into()) }
    }

    /// The kind of failure.
    pub const fn kind(&self) -> ErrorKind {
        self.kind
    }
}
