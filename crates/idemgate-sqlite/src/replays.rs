//! Recently replayed records, kept in the process so that a replay skips the writer
//! thread (a thread hop, a transaction and a decode: a quarter of a replay's CPU).
//!
//! A completed record changes only by expiring, which each entry checks against its
//! stored `expires_at`, or by a purge, which may come from another process (`idemgate
//! purge` opens the file itself). Purges are seen through the *purge marker*, the file
//! `<database>-purges` beside the database: a random 8-byte generation that every
//! purge rewrites inside its transaction, while it holds SQLite's write lock and
//! before it commits. A lookup reads the marker first (one `pread`) and empties the
//! cache when it changed; an entry is stored only under the generation read before
//! the claim that found it. So after a purge has returned, no process serves what it
//! deleted: an entry read before the purge's commit carries a generation that the
//! purge replaced, and a claim that read the new generation reached the database
//! after the purge's commit (its transaction waited for the write lock).
//!
//! Should the marker be unreadable, nothing is served from the cache.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use idemgate::{Fingerprint, StorageKey, StoreError, StoredResponse, Timestamp, Token};

/// At most this many records are kept...
const MAX_ENTRIES: usize = 4096;
/// ...holding at most this many bytes of bodies and headers.
const MAX_BYTES: usize = 32 * 1024 * 1024;
/// A larger record is not kept at all.
const MAX_ENTRY_BYTES: usize = 1024 * 1024;

/// The marker's path for the database at `db`.
pub(crate) fn marker_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-purges");
    PathBuf::from(name)
}

pub(crate) struct Replays {
    /// `None` for a store in memory: no other process can purge it.
    marker: Option<File>,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    generation: u64,
    entries: HashMap<StorageKey, Entry>,
    bytes: usize,
}

struct Entry {
    fingerprint: Fingerprint,
    response: StoredResponse,
    expires_at: Timestamp,
    bytes: usize,
}

/// A generation read from the marker, to pass back to [`Replays::insert`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Generation(Option<u64>);

impl Replays {
    /// Opens (creating if needed) the purge marker of the database at `db`.
    pub(crate) fn open(db: Option<&Path>) -> Result<Self, StoreError> {
        let marker = match db {
            None => None,
            Some(db) => {
                let path = marker_path(db);
                let file =
                    File::options().read(true).write(true).create(true).truncate(false).open(&path).map_err(|e| {
                        StoreError::unavailable(format!("sqlite cannot open its purge marker {}", path.display()), e)
                    })?;
                Some(file)
            }
        };
        Ok(Self { marker, cache: Mutex::default() })
    }

    fn lock(&self) -> MutexGuard<'_, Cache> {
        // The map is consistent between statements: a panic elsewhere leaves it usable.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The marker's generation now: read it before the database.
    pub(crate) fn generation(&self) -> Generation {
        match &self.marker {
            None => Generation(Some(0)),
            Some(file) => Generation(read_generation(file).ok()),
        }
    }

    /// The record of `key` for a request with `fingerprint`, if one is cached under
    /// `generation` and alive at `now`.
    pub(crate) fn get(
        &self,
        generation: Generation,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        now: Timestamp,
    ) -> Option<StoredResponse> {
        let generation = generation.0?;
        let mut cache = self.lock();
        if cache.generation != generation {
            *cache = Cache { generation, ..Cache::default() };
            return None;
        }
        let entry = cache.entries.get(key)?;
        if entry.expires_at <= now {
            let bytes = entry.bytes;
            cache.entries.remove(key);
            cache.bytes -= bytes;
            return None;
        }
        // Another request's key: the database answers (a mismatch).
        (entry.fingerprint == *fingerprint).then(|| entry.response.clone())
    }

    /// Keeps a record a claim under `generation` found completed.
    pub(crate) fn insert(
        &self,
        generation: Generation,
        key: StorageKey,
        fingerprint: Fingerprint,
        response: &StoredResponse,
        expires_at: Timestamp,
    ) {
        let Some(generation) = generation.0 else { return };
        let bytes = response.body_len() + response.headers.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>();
        if bytes > MAX_ENTRY_BYTES {
            return;
        }
        let mut cache = self.lock();
        if cache.generation != generation {
            return;
        }
        while cache.entries.len() >= MAX_ENTRIES || cache.bytes + bytes > MAX_BYTES {
            // Any entry: the keys are hashes, so this is as good as a random choice.
            let Some(victim) = cache.entries.keys().next().copied() else { break };
            if let Some(gone) = cache.entries.remove(&victim) {
                cache.bytes -= gone.bytes;
            }
        }
        let entry = Entry { fingerprint, response: response.clone(), expires_at, bytes };
        if let Some(old) = cache.entries.insert(key, entry) {
            cache.bytes -= old.bytes;
        }
        cache.bytes += bytes;
    }

    /// Writes a new generation to the marker and empties this process's cache: called
    /// by a purge inside its transaction, before the commit.
    pub(crate) fn bump(&self) -> io::Result<()> {
        *self.lock() = Cache::default();
        match &self.marker {
            None => Ok(()),
            Some(file) => {
                // A UUIDv7: its time and random bits never repeat a generation.
                let token = Token::generate().as_u128();
                write_generation(file, (token >> 64) as u64 ^ token as u64)
            }
        }
    }
}

#[cfg(unix)]
fn read_generation(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0; 8];
    // A marker no purge has written yet is empty: generation 0.
    let n = file.read_at(&mut buf, 0)?;
    if n != 0 && n != 8 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "a short purge marker"));
    }
    Ok(u64::from_le_bytes(buf))
}

#[cfg(unix)]
fn write_generation(file: &File, generation: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(&generation.to_le_bytes(), 0)
}

// Elsewhere the cache is off: every read fails, so nothing is cached or served.
#[cfg(not(unix))]
fn read_generation(_: &File) -> io::Result<u64> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "the replay cache needs positional file reads"))
}

#[cfg(not(unix))]
fn write_generation(_: &File, _: u64) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;

    fn response(body: &'static [u8]) -> StoredResponse {
        StoredResponse::new(200, vec![], vec![Bytes::from_static(body)], Timestamp::from_millis(1_000))
    }

    fn key(n: u8) -> StorageKey {
        StorageKey::from_bytes([n; 32])
    }

    const FP: Fingerprint = Fingerprint::from_bytes([1; 32]);
    const LATER: Timestamp = Timestamp::from_millis(2_000);

    #[test]
    fn a_purge_in_another_handle_on_the_file_empties_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("idemgate.db");
        let (ours, theirs) = (Replays::open(Some(&db)).unwrap(), Replays::open(Some(&db)).unwrap());
        let expires = LATER + Duration::from_secs(60);
        let g = ours.generation();
        ours.insert(g, key(1), FP, &response(b"one"), expires);
        assert_eq!(ours.get(ours.generation(), &key(1), &FP, LATER), Some(response(b"one")));
        // Another fingerprint is the database's to answer.
        assert_eq!(ours.get(ours.generation(), &key(1), &Fingerprint::from_bytes([2; 32]), LATER), None);

        theirs.bump().unwrap();
        assert_eq!(ours.get(ours.generation(), &key(1), &FP, LATER), None);
        // What a claim read before the purge is not kept after it.
        ours.insert(g, key(1), FP, &response(b"one"), expires);
        assert_eq!(ours.get(ours.generation(), &key(1), &FP, LATER), None);
    }

    #[test]
    fn expired_records_are_not_served() {
        let replays = Replays::open(None).unwrap();
        let g = replays.generation();
        replays.insert(g, key(1), FP, &response(b"one"), LATER);
        assert_eq!(replays.get(g, &key(1), &FP, Timestamp::from_millis(1_999)), Some(response(b"one")));
        assert_eq!(replays.get(g, &key(1), &FP, LATER), None);
        assert_eq!(replays.lock().bytes, 0);
    }

    #[test]
    fn the_cache_stays_within_its_bounds() {
        let replays = Replays::open(None).unwrap();
        let g = replays.generation();
        let expires = LATER + Duration::from_secs(60);
        for n in 0..=u8::MAX {
            for m in 0..20u8 {
                let mut k = [n; 32];
                k[0] = m;
                replays.insert(g, StorageKey::from_bytes(k), FP, &response(b"body"), expires);
            }
        }
        let cache = replays.lock();
        assert_eq!(cache.entries.len(), MAX_ENTRIES);
        assert_eq!(cache.bytes, MAX_ENTRIES * 4);
        drop(cache);
        let big = StoredResponse::new(200, vec![], vec![Bytes::from(vec![0; MAX_ENTRY_BYTES + 1])], LATER);
        // (No key of the loop starts with 255.)
        replays.insert(g, key(255), FP, &big, expires);
        assert!(!replays.lock().entries.contains_key(&key(255)));
    }

    #[test]
    fn an_unreadable_marker_serves_nothing() {
        let replays = Replays::open(None).unwrap();
        let lost = Generation(None);
        replays.insert(lost, key(1), FP, &response(b"one"), LATER);
        assert_eq!(replays.get(lost, &key(1), &FP, Timestamp::from_millis(1_500)), None);
        assert!(replays.lock().entries.is_empty());
    }
}
