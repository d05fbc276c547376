//! Where a storage key's data lives: every name carries the same hash tag, so that a
//! script touching the record, the live log and the wake-up channel runs in one
//! Redis Cluster slot.

use idemgate::StorageKey;

/// The Redis names of one storage key under one prefix.
pub(crate) struct Keys {
    /// The record hash.
    pub(crate) rec: String,
    /// The live log's hash (token, head, end).
    pub(crate) live: String,
    /// The live log's chunks (a list).
    pub(crate) chunks: String,
    /// The pub/sub channel that wakes waiters.
    pub(crate) channel: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, key: &StorageKey) -> Self {
        let tag = format!("{{{prefix}:{}}}", key.to_hex());
        Self {
            rec: format!("{tag}:rec"),
            live: format!("{tag}:live"),
            chunks: format!("{tag}:chunks"),
            channel: format!("{tag}:ch"),
        }
    }
}

/// The `SCAN MATCH` pattern of every record under `prefix`: the prefix with its glob
/// characters escaped, then exactly 64 characters of key, so that a prefix that
/// starts with this one (`idemgate` and `idemgate:test`) is not matched.
pub(crate) fn record_pattern(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 72);
    out.push('{');
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push(':');
    out.extend(std::iter::repeat_n('?', 64));
    out.push_str("}:rec");
    out
}

/// The storage key a wake-up channel (`{prefix:<hex>}:ch`) belongs to.
pub(crate) fn key_of_channel(channel: &[u8]) -> Option<StorageKey> {
    let tagged = channel.strip_suffix(b"}:ch")?;
    let hex = tagged.get(tagged.len().checked_sub(64)?..)?;
    StorageKey::from_hex(std::str::from_utf8(hex).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_shares_one_hash_tag() {
        let key = StorageKey::from_bytes([0xab; 32]);
        let keys = Keys::new("idemgate", &key);
        let tag = format!("{{idemgate:{}}}", "ab".repeat(32));
        assert_eq!(keys.rec, format!("{tag}:rec"));
        assert_eq!(keys.live, format!("{tag}:live"));
        assert_eq!(keys.chunks, format!("{tag}:chunks"));
        assert_eq!(keys.channel, format!("{tag}:ch"));
        assert_eq!(key_of_channel(keys.channel.as_bytes()), Some(key));
        assert_eq!(key_of_channel(keys.rec.as_bytes()), None);
        assert_eq!(key_of_channel(b"}:ch"), None);
    }

    #[test]
    fn the_record_pattern_escapes_the_prefix() {
        assert_eq!(record_pattern("a*b"), format!("{{a\\*b:{}}}:rec", "?".repeat(64)));
    }
}
