//! The key–value store a ledger lives in: reads, and one write primitive, create-if-absent.

/// Whether a create-if-absent write made the key or found it already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Yes,
    AlreadyExists,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{operation} {key} in {location}")]
    Io {
        operation: &'static str,
        key: String,
        location: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{location}: {message}")]
    Backend { location: String, message: String },
}

/// A ledger store. Implementations: the file store here; the S3 store lives with the AWS provider.
pub trait Store: Send + Sync {
    /// The bytes at `key`, or `None` when there is none.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes `bytes` at `key` only if `key` does not exist; never overwrites, never leaves a partial value.
    fn create(&self, key: &str, bytes: &[u8]) -> Result<Created, StoreError>;
    /// Every key under `prefix`, in no particular order. Only full scans (`verify`) list; reads probe keys.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Where the store is, for messages.
    fn location(&self) -> String;
}
