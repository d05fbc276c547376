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
//! Should the marker be unreadable, nothing is served from the cache. A store in
//! memory has no marker (no other process sees it): its generation is a counter.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use idemgate::{Fingerprint, StorageKey, StoreError, StoredResponse, Timestamp, Token};

/// At most this many records are kept...
const MAX_ENTRIES: usize = 4096;
/// ...holding at most this many bytes of bodies and headers.
const MAX_BYTES: usize = 32 * 1024 * 1024;
/// A larger record is not kept at all.
const MAX_ENTRY_BYTES: usize = 1024 * 1024;
/// What an entry costs besides its bytes: the entry, the map slot, the response.
const ENTRY_OVERHEAD: usize = 256;
/// What each chunk costs besides its bytes: its handle, its offset, its framing in the
/// decoded blob the chunks are slices of.
const CHUNK_OVERHEAD: usize = 48;
/// What each header costs besides its name and value.
const HEADER_OVERHEAD: usize = 64;

/// The marker's path for the database at `db`: the path SQLite resolved (symlinks
/// followed), so that every process on the file, by whatever path, shares one marker.
pub(crate) fn marker_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-purges");
    PathBuf::from(name)
}

pub(crate) struct Replays {
    /// `None` for a store in memory: no other process can purge it.
    marker: Option<File>,
    /// The generation of a store in memory (no marker): bumped by each purge.
    counter: AtomicU64,
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
    /// Opens (creating if needed) the purge marker of the database at `db`, the path
    /// SQLite resolved for it.
    pub(crate) fn open(db: Option<&Path>) -> Result<Self, StoreError> {
        let marker = db.map(open_marker).transpose()?;
        Ok(Self { marker, counter: AtomicU64::new(0), cache: Mutex::default() })
    }

    fn lock(&self) -> MutexGuard<'_, Cache> {
        // The map is consistent between statements: a panic elsewhere leaves it usable.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The marker's generation now: read it before the database.
    pub(crate) fn generation(&self) -> Generation {
        match &self.marker {
            None => Generation(Some(self.counter.load(Ordering::Acquire))),
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
        let bytes = ENTRY_OVERHEAD
            + response.body_len()
            + CHUNK_OVERHEAD * response.chunks.len()
            + response.headers.iter().map(|(n, v)| HEADER_OVERHEAD + n.as_str().len() + v.len()).sum::<usize>();
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

    /// Writes a new generation to the marker and empties this process's cache under
    /// it (so that a claim which read the old one cannot fill it again): called by a
    /// purge inside its transaction, before the commit.
    pub(crate) fn bump(&self) -> io::Result<()> {
        let generation = match &self.marker {
            None => self.counter.fetch_add(1, Ordering::AcqRel).wrapping_add(1),
            Some(file) => {
                // A UUIDv7: its time and random bits never repeat a generation.
                let token = Token::generate().as_u128();
                let generation = (token >> 64) as u64 ^ token as u64;
                write_generation(file, generation)?;
                generation
            }
        };
        *self.lock() = Cache { generation, ..Cache::default() };
        Ok(())
    }
}

/// Opens the marker beside `db` read-write (read-only if that is all this user may:
/// replays still work, a purge then fails). A new marker gets the database file's
/// permissions and, where allowed, its owner, as SQLite gives its `-wal` and `-shm`.
fn open_marker(db: &Path) -> Result<File, StoreError> {
    let path = marker_path(db);
    let failed = |e| StoreError::unavailable(format!("sqlite cannot open its purge marker {}", path.display()), e);
    let file = match File::options().read(true).write(true).create(true).truncate(false).open(&path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => File::open(&path).map_err(failed)?,
        opened => opened.map_err(failed)?,
    };
    #[cfg(unix)]
    if let (Ok(db), Ok(marker)) = (std::fs::metadata(db), file.metadata()) {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if marker.len() == 0 && marker.mode() & 0o777 != db.mode() & 0o777 {
            // Not ours to change (another user's empty marker): it stays as it is.
            let _ = file.set_permissions(std::fs::Permissions::from_mode(db.mode() & 0o777));
        }
        if marker.len() == 0 && (marker.uid(), marker.gid()) != (db.uid(), db.gid()) {
            // Only root may give the file away; anyone else keeps it.
            let _ = std::os::unix::fs::fchown(&file, Some(db.uid()), Some(db.gid()));
        }
    }
    Ok(file)
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
    fn in_memory_a_claim_read_before_a_purge_is_not_kept_after_it() {
        let replays = Replays::open(None).unwrap();
        let expires = LATER + Duration::from_secs(60);
        let before = replays.generation();
        replays.insert(before, key(1), FP, &response(b"one"), expires);
        assert!(replays.get(replays.generation(), &key(1), &FP, LATER).is_some());
        replays.bump().unwrap();
        // The claim's answer arrives after the purge returned: it is not kept.
        replays.insert(before, key(1), FP, &response(b"one"), expires);
        assert_eq!(replays.get(replays.generation(), &key(1), &FP, LATER), None);
        // Nor does a lookup that read the old generation bring it back.
        assert_eq!(replays.get(before, &key(1), &FP, LATER), None);
        replays.insert(before, key(1), FP, &response(b"one"), expires);
        assert_eq!(replays.get(replays.generation(), &key(1), &FP, LATER), None);
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
        assert_eq!(cache.bytes, MAX_ENTRIES * (ENTRY_OVERHEAD + CHUNK_OVERHEAD + 4));
        drop(cache);
        // Many small chunks count for what they hold, not only their bytes.
        let tiny = StoredResponse::new(200, vec![], vec![Bytes::from_static(b"x"); 40_000], LATER);
        replays.insert(g, key(254), FP, &tiny, expires);
        assert!(!replays.lock().entries.contains_key(&key(254)), "40,000 one-byte chunks are over 1 MiB");
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
