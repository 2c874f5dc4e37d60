//! The ledger: an append-only, hash-chained log of events in a create-if-absent key–value store, read through a
//! cached materialised view. It is the record of everything kiln did and the lock that serialises writers.

pub mod event;
pub mod file;
pub mod store;
pub mod view;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rayon::prelude::*;

use crate::clock::Clock;
use crate::digest::Digest;
pub use event::{Event, EventBody, GateVerdict, StoredEvent};
pub use store::{Created, Store, StoreError};
pub use view::{Heads, View};
use view::{Rebuild, ShardFiles};

const EVENTS_PREFIX: &str = "events/";
const MAX_ATTEMPTS: u32 = 200;
const VERIFY_CHUNK: u64 = 16 * 1024;
const CACHE_SAVE_EVERY: u64 = 32;
const HEADS_FILE: &str = "heads.json";
const INDEX_DIR: &str = "index";
const SEEN_FILE: &str = "seen.json";
const LOCK_FILE: &str = "lock";
/// How far an event's real time may fall behind the one before it: clocks of machines sharing a ledger (CI runners,
/// laptops) disagree by seconds, rarely minutes. Beyond this, `verify` reports time running backwards.
pub const CLOCK_SKEW_TOLERANCE: Duration = Duration::from_secs(5 * 60);

pub fn event_key(seq: u64) -> String {
    format!("{EVENTS_PREFIX}{seq:012}.json")
}

fn seq_of_key(key: &str) -> Option<u64> {
    let digits = key.strip_prefix(EVENTS_PREFIX)?.strip_suffix(".json")?;
    (digits.len() == 12 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("ledger {location} is damaged at seq {seq}: {reason}")]
    Tampered { location: String, seq: u64, reason: String },
    #[error("ledger {location}: gave up after {attempts} attempts, other writers kept appending first")]
    Contended { location: String, attempts: u32 },
    #[error("ledger {location}: cannot tell whether {key} was written: the write failed ({write}) and reading it back failed too")]
    OutcomeUnknown {
        location: String,
        key: String,
        write: Box<StoreError>,
        #[source]
        read: Box<StoreError>,
    },
    #[error("the view cache cannot be used and there is no ledger to rebuild it from: {reason}")]
    CacheUnusable { reason: String },
    #[error("encoding an event")]
    Encode(#[from] serde_json::Error),
}

/// What `verify` found on a sound ledger.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub events: u64,
    pub head: Option<Digest>,
    /// Events written under a pinned clock (`KILN_NOW`): their `time` is whatever the writer chose.
    pub pinned_clock: Vec<u64>,
}

#[derive(Clone)]
pub struct Ledger {
    store: Arc<dyn Store>,
    cache_dir: Option<PathBuf>,
}

/// What a writer decided after looking at the current view.
pub enum Decision<T> {
    /// Append this event, then return `T`.
    Append(Box<EventBody>, T),
    /// Write nothing, return `T`.
    Skip(T),
}

impl Ledger {
    /// A ledger in `store`, with its view cache in `cache_dir` (none: no cache, every read replays the chain).
    pub fn new(store: Box<dyn Store>, cache_dir: Option<PathBuf>) -> Ledger {
        Ledger { store: Arc::from(store), cache_dir }
    }

    /// A file ledger in `dir`, with its view cache beside the events.
    pub fn open_dir(dir: &Path) -> Ledger {
        Ledger::new(Box::new(file::FileStore::new(dir)), Some(dir.join("cache")))
    }

    pub fn location(&self) -> String {
        self.store.location()
    }

    fn tampered(&self, seq: u64, reason: impl Into<String>) -> LedgerError {
        LedgerError::Tampered { location: self.location(), seq, reason: reason.into() }
    }

    fn cache_file(&self, name: &str) -> Option<PathBuf> {
        Some(self.cache_dir.as_ref()?.join(name))
    }

    /// Event `seq`, checked against its own hash.
    pub fn read(&self, seq: u64) -> Result<Option<StoredEvent>, LedgerError> {
        let Some(bytes) = self.store.get(&event_key(seq))? else { return Ok(None) };
        let stored = event::decode(&bytes).map_err(|e| self.tampered(seq, e.to_string()))?;
        if stored.event.seq != seq {
            return Err(self.tampered(seq, format!("the event stored there says seq {}", stored.event.seq)));
        }
        Ok(Some(stored))
    }

    /// The current view: the cache, caught up by probing `seq+1, seq+2, …`; rebuilt when the cache disagrees.
    pub fn view(&self) -> Result<View, LedgerError> {
        let (mut view, cached_seq) = self.cached_view()?;
        self.catch_up(&mut view)?;
        if let Some(err) = view.take_failure() {
            return Err(err);
        }
        self.maybe_save_cache(&view, cached_seq);
        Ok(view)
    }

    /// The cached view if it still matches the chain, and the seq it covered; else an empty one to rebuild.
    fn cached_view(&self) -> Result<(View, u64), LedgerError> {
        let index_dir = self.cache_file(INDEX_DIR);
        match self.load_heads() {
            Some((heads, shards)) if self.heads_match_chain(&heads)? => {
                let seq = heads.seq;
                let view = match index_dir {
                    Some(dir) => View::cached(heads, shards, dir, self.rebuilder()),
                    None => View::from_heads(heads, None, true),
                };
                Ok((view, seq))
            }
            stale => {
                if stale.is_some() {
                    tracing::warn!(ledger = %self.location(), "view cache disagrees with the ledger; rebuilding it");
                }
                // Rebuilding replays every event into memory and reads no shard from disk; the stale shard files
                // are removed by the next save, under the cache lock.
                Ok((View::empty(index_dir, true), 0))
            }
        }
    }

    fn heads_match_chain(&self, heads: &Heads) -> Result<bool, LedgerError> {
        if heads.seq == 0 {
            return Ok(true);
        }
        Ok(match self.store.get(&event_key(heads.seq))? {
            Some(bytes) => event::check_hash(&bytes).ok() == Some(heads.hash),
            None => false,
        })
    }

    fn catch_up(&self, view: &mut View) -> Result<(), LedgerError> {
        while let Some(next) = self.read(view.seq() + 1)? {
            if next.event.prev != view.hash() {
                return Err(self.tampered(next.event.seq, "its prev does not match the hash of the event before it"));
            }
            view.apply(&next);
        }
        Ok(())
    }

    /// How a view loaded from the cache replaces its index when a shard fails its check.
    fn rebuilder(&self) -> Rebuild {
        let ledger = self.clone();
        Rebuild(Arc::new(move |upto| ledger.replay(upto)))
    }

    /// A complete view of events 1..=`upto`, read from the store, and saved as the new cache.
    fn replay(&self, upto: u64) -> Result<View, LedgerError> {
        let mut view = View::empty(self.cache_file(INDEX_DIR), true);
        while view.seq() < upto {
            let seq = view.seq() + 1;
            let next = self.read(seq)?.ok_or_else(|| self.tampered(seq, "the event is missing"))?;
            if next.event.prev != view.hash() {
                return Err(self.tampered(seq, "its prev does not match the hash of the event before it"));
            }
            view.apply(&next);
        }
        self.save_cache(&view);
        Ok(view)
    }

    fn load_heads(&self) -> Option<(Heads, ShardFiles)> {
        let bytes = std::fs::read(self.cache_file(HEADS_FILE)?).ok()?;
        match serde_json::from_slice::<HeadsFile>(&bytes) {
            Ok(file) if file.heads.format == view::VIEW_FORMAT => Some((file.heads, file.shards)),
            _ => None,
        }
    }

    /// Rewriting the cache costs the changed shards and the heads, so it is rewritten only once readers would
    /// otherwise have to replay more than a few events past it.
    fn maybe_save_cache(&self, view: &View, cached_seq: u64) {
        if view.seq() > cached_seq {
            self.save_seen(view.seq(), view.hash());
        }
        if view.seq() >= cached_seq + CACHE_SAVE_EVERY || (cached_seq == 0 && view.seq() > 0) {
            self.save_cache(view);
        }
    }

    /// The highest (seq, hash) this machine has seen: a small anchor, rewritten on every append, that lets
    /// `verify` notice events removed from the end even when the view cache lags behind.
    fn load_seen(&self) -> Option<(u64, Digest)> {
        let bytes = std::fs::read(self.cache_file(SEEN_FILE)?).ok()?;
        let mark: SeenMark = serde_json::from_slice(&bytes).ok()?;
        Some((mark.seq, mark.hash))
    }

    fn save_seen(&self, seq: u64, hash: Digest) {
        let Some(path) = self.cache_file(SEEN_FILE) else { return };
        if self.load_seen().is_some_and(|(seen, _)| seen >= seq) {
            return;
        }
        if let Ok(bytes) = serde_json::to_vec(&SeenMark { seq, hash }) {
            write_atomically(&path, &bytes);
        }
    }

    /// Saves the changed index shards, then the heads that name them, then removes shard files that neither
    /// these heads nor the ones they replace name; all under a lock so two savers do not interleave. Readers
    /// take no lock: the files their heads name stay until two saves later. Best effort: the cache only
    /// accelerates reads, and if any shard cannot be written the heads are left as they were.
    fn save_cache(&self, view: &View) {
        self.save_cache_with(view, crate::fsutil::replace_file)
    }

    fn save_cache_with(&self, view: &View, write_shard: impl Fn(&Path, &[u8]) -> std::io::Result<()>) {
        let (Some(heads_path), Some(lock_path), Some(index_dir)) =
            (self.cache_file(HEADS_FILE), self.cache_file(LOCK_FILE), self.cache_file(INDEX_DIR))
        else {
            return;
        };
        let Some(_lock) = CacheLock::try_take(&lock_path) else { return };
        let previous = self.load_heads();
        if previous.as_ref().is_some_and(|(on_disk, _)| on_disk.seq > view.seq()) {
            return;
        }
        let shards = match view.save_index(&index_dir, write_shard) {
            Ok(shards) => shards,
            Err(err) => {
                tracing::debug!(%err, "could not write a view cache shard; the cached heads stay as they were");
                return;
            }
        };
        let file = HeadsFile { heads: view.heads.clone(), shards };
        let saved = serde_json::to_vec(&file)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::fsutil::replace_file(&heads_path, &bytes));
        if let Err(err) = saved {
            tracing::debug!(%err, "could not write the view cache heads");
            return;
        }
        let kept = previous.map(|(_, shards)| shards).unwrap_or_default();
        remove_unnamed_shards(&index_dir, &[&file.shards, &kept]);
    }

    /// Appends one event decided against the current head. If another writer appended first, the view is
    /// re-read and `decide` runs again, so no event is ever recorded on a decision made against stale state.
    pub fn append<T, E: From<LedgerError>>(
        &self,
        actor: &str,
        clock: &Clock,
        mut decide: impl FnMut(&View) -> Result<Decision<T>, E>,
    ) -> Result<(T, Option<StoredEvent>), E> {
        let mut backoff = Backoff::new();
        let (mut view, cached_seq) = self.cached_view()?;
        for _ in 0..MAX_ATTEMPTS {
            // Decide against the true head: catch up with whatever other writers appended meanwhile.
            self.catch_up(&mut view)?;
            if let Some(err) = view.take_failure() {
                return Err(err.into());
            }
            let decided = decide(&view);
            // A decision made while the index could not be rebuilt was made on missing facts: record nothing.
            if let Some(err) = view.take_failure() {
                return Err(err.into());
            }
            let (body, result) = match decided? {
                Decision::Skip(result) => {
                    self.maybe_save_cache(&view, cached_seq);
                    return Ok((result, None));
                }
                Decision::Append(body, result) => (body, result),
            };
            let event = Event {
                seq: view.seq() + 1,
                prev: view.hash(),
                time: clock.stamp(),
                actor: actor.to_string(),
                clock: clock.record(),
                body: *body,
            };
            let (bytes, hash) = event::encode(&event).map_err(LedgerError::from)?;
            crate::fault::point("ledger:before-create");
            let key = event_key(event.seq);
            let created = match self.store.create(&key, &bytes) {
                Ok(Created::Yes) => Created::Yes,
                Ok(Created::AlreadyExists) => self.read_back(&key, &bytes, None)?,
                Err(err) => self.read_back(&key, &bytes, Some(err))?,
            };
            match created {
                Created::Yes => {
                    crate::fault::point("ledger:after-create");
                    let stored = StoredEvent { event, hash };
                    view.apply(&stored);
                    self.maybe_save_cache(&view, cached_seq);
                    return Ok((result, Some(stored)));
                }
                Created::AlreadyExists => {
                    tracing::debug!(seq = event.seq, "another writer appended first; re-reading");
                    backoff.wait();
                }
            }
        }
        Err(LedgerError::Contended { location: self.location(), attempts: MAX_ATTEMPTS }.into())
    }

    /// Settles a create whose answer does not say whether our bytes are at `key`: a store that reports
    /// `AlreadyExists` for its own retried write (an S3 PUT retried after a lost 200 answers 412), or an error
    /// after the write may have landed (the file store's directory fsync failing after the link). The bytes at
    /// `key` decide: ours means our write happened; someone else's means another writer won.
    fn read_back(&self, key: &str, ours: &[u8], create_error: Option<StoreError>) -> Result<Created, LedgerError> {
        let found = match self.store.get(key) {
            Ok(found) => found,
            Err(read_error) => {
                return Err(match create_error {
                    Some(write) => LedgerError::OutcomeUnknown {
                        location: self.location(),
                        key: key.to_string(),
                        write: Box::new(write),
                        read: Box::new(read_error),
                    },
                    None => read_error.into(),
                })
            }
        };
        match (found, create_error) {
            (Some(theirs), _) if theirs == ours => {
                tracing::debug!(key, "the create did not say so, but our event is there");
                Ok(Created::Yes)
            }
            (Some(_), _) => Ok(Created::AlreadyExists),
            // Nothing landed: the write failed, and saying so is all that is left.
            (None, Some(write)) => Err(write.into()),
            // Reported to exist yet absent (a store that is slow to show writes): catch up and try again, as
            // after any lost race; the attempts are bounded.
            (None, None) => Ok(Created::AlreadyExists),
        }
    }

    /// Events newest first, from `from` (inclusive) down, that `keep` accepts, at most `limit`.
    pub fn newest_first(
        &self,
        from: u64,
        limit: usize,
        mut keep: impl FnMut(&StoredEvent) -> bool,
    ) -> Result<Vec<StoredEvent>, LedgerError> {
        let mut out = Vec::new();
        let mut seq = from;
        while seq > 0 && out.len() < limit {
            let stored = self.read(seq)?.ok_or_else(|| self.tampered(seq, "the event is missing"))?;
            if keep(&stored) {
                out.push(stored);
            }
            seq -= 1;
        }
        Ok(out)
    }

    /// Checks the whole chain: every event present, matching its hash, in its place, linked to the one before.
    /// Names the first bad seq. Also checks that the chain still reaches what the view cache last saw, which
    /// catches events removed from the end.
    pub fn verify(&self) -> Result<VerifyReport, LedgerError> {
        let keys = self.store.list(EVENTS_PREFIX)?;
        let mut last = 0;
        for key in &keys {
            match seq_of_key(key) {
                Some(seq) => last = last.max(seq),
                None if key.ends_with(".json") => {
                    return Err(self.tampered(0, format!("unexpected file {key} among the events")));
                }
                None => {}
            }
        }
        let mut prev_hash = Digest::ZERO;
        let mut prev_time: Option<std::time::SystemTime> = None;
        let mut pinned_clock = Vec::new();
        let mut start = 1;
        while start <= last {
            let end = (start + VERIFY_CHUNK).min(last + 1);
            let checked: Vec<Result<ChainLink, (u64, String)>> = (start..end)
                .into_par_iter()
                .map(|seq| {
                    let bytes = match self.store.get(&event_key(seq)) {
                        Ok(Some(bytes)) => bytes,
                        Ok(None) => return Err((seq, format!("the event is missing (events run to seq {last})"))),
                        Err(e) => return Err((seq, format!("cannot be read: {e}"))),
                    };
                    let (header, hash) = event::decode_header(&bytes).map_err(|e| (seq, e.to_string()))?;
                    let real_time = crate::clock::parse(header.real_time())
                        .ok_or_else(|| (seq, format!("its time `{}` is not an RFC 3339 time", header.real_time())))?;
                    Ok(ChainLink {
                        recorded_seq: header.seq,
                        prev: header.prev,
                        hash,
                        real_time,
                        pinned: header.pinned(),
                    })
                })
                .collect();
            for (offset, result) in checked.into_iter().enumerate() {
                let seq = start + offset as u64;
                let ChainLink { recorded_seq, prev, hash, real_time, pinned } =
                    result.map_err(|(seq, reason)| self.tampered(seq, reason))?;
                if recorded_seq != seq {
                    return Err(self.tampered(
                        seq,
                        format!("the event stored there says seq {recorded_seq} (moved or reordered)"),
                    ));
                }
                if prev != prev_hash {
                    return Err(self.tampered(seq, "its prev does not match the hash of the event before it (an event was inserted, removed or rewritten)"));
                }
                prev_hash = hash;
                if let Some(behind) = prev_time.and_then(|before| before.duration_since(real_time).ok()) {
                    if behind > CLOCK_SKEW_TOLERANCE {
                        return Err(self.tampered(seq, format!(
                            "time runs backwards: it was written at {}, {} before seq {} (at {}), more than the {} allowed for clock skew between machines",
                            crate::clock::format(real_time),
                            humantime::format_duration(Duration::from_secs(behind.as_secs())),
                            seq - 1,
                            prev_time.map(crate::clock::format).unwrap_or_default(),
                            humantime::format_duration(CLOCK_SKEW_TOLERANCE),
                        )));
                    }
                }
                prev_time = Some(real_time);
                if pinned {
                    pinned_clock.push(seq);
                }
            }
            start = end;
        }
        let seen = [self.load_seen(), self.load_heads().map(|(h, _)| (h.seq, h.hash))];
        for (seen_seq, seen_hash) in seen.into_iter().flatten() {
            if seen_seq > last {
                return Err(self.tampered(last + 1, format!("the ledger ends at seq {last} but seq {seen_seq} was seen before (events removed from the end)")));
            }
            if seen_seq > 0 && self.read(seen_seq)?.map(|e| e.hash) != Some(seen_hash) {
                return Err(self.tampered(seen_seq, "the event differs from the one seen before (rewritten)"));
            }
        }
        Ok(VerifyReport { events: last, head: (last > 0).then_some(prev_hash), pinned_clock })
    }
}

/// One event's place in the chain, as `verify` reads it.
struct ChainLink {
    recorded_seq: u64,
    prev: Digest,
    hash: Digest,
    /// When it was really written: the recorded real time for a pinned clock, else its `time`.
    real_time: std::time::SystemTime,
    pinned: bool,
}

/// An exclusive, non-blocking `flock` on the cache directory, released on drop.
struct CacheLock {
    _held: std::fs::File,
}

impl CacheLock {
    fn try_take(path: &Path) -> Option<CacheLock> {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(path.parent()?).ok()?;
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).ok()?;
        // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
        let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        taken.then_some(CacheLock { _held: file })
    }
}

/// `cache/heads.json`: the heads and the shard files that hold the index as of the same seq.
#[derive(serde::Serialize, serde::Deserialize)]
struct HeadsFile {
    heads: Heads,
    shards: ShardFiles,
}

/// Removes index files that no heads in `named` refers to: shards replaced two saves ago, or left by a save that
/// failed half way.
fn remove_unnamed_shards(index_dir: &Path, named: &[&ShardFiles]) {
    let Ok(entries) = std::fs::read_dir(index_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") && !named.iter().any(|files| view::is_named_shard(&name, files)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SeenMark {
    seq: u64,
    hash: Digest,
}

/// Best effort: caches only accelerate reads, so failing to write one is logged, not an error.
fn write_atomically(path: &Path, bytes: &[u8]) {
    if let Err(err) = crate::fsutil::replace_file(path, bytes) {
        tracing::debug!(%err, path = %path.display(), "could not write a cache file");
    }
}

/// Exponential backoff with jitter, so colliding writers spread out instead of colliding again.
struct Backoff {
    attempt: u32,
    state: u64,
}

impl Backoff {
    fn new() -> Backoff {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(1);
        Backoff { attempt: 0, state: nanos ^ ((std::process::id() as u64) << 32) | 1 }
    }

    fn wait(&mut self) {
        // xorshift64: enough randomness for jitter without a dependency.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let cap_ms = (1u64 << self.attempt.min(7)).min(100);
        self.attempt += 1;
        std::thread::sleep(Duration::from_micros(200 + self.state % (cap_ms * 1000)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestQuery;

    fn approve(n: u64) -> EventBody {
        EventBody::Approved { pipeline: "p".into(), stage: "prod".into(), digest: image(n), note: None }
    }

    fn image(n: u64) -> Digest {
        Digest::of(&n.to_le_bytes())
    }

    fn baked(n: u64, parent: Option<u64>) -> EventBody {
        EventBody::Baked {
            pipeline: "p".into(),
            recipe: "r".into(),
            digest: image(n),
            recipe_key: Digest::of(format!("key {n}").as_bytes()),
            parent: parent.map(image),
            provider: "local".into(),
            image_ref: format!("r:{n}"),
            commit: None,
            dirty: false,
            copies: Vec::new(),
            instance: None,
        }
    }

    fn append(ledger: &Ledger, body: EventBody) {
        ledger
            .append::<(), LedgerError>("t", &Clock::system(), |_| Ok(Decision::Append(Box::new(body.clone()), ())))
            .unwrap();
    }

    /// Bakes images 0..n (each the child of the one before) and approves each.
    fn fill(ledger: &Ledger, n: u64) {
        fill_range(ledger, 0..n);
    }

    fn fill_range(ledger: &Ledger, range: std::ops::Range<u64>) {
        for i in range {
            append(ledger, baked(i, i.checked_sub(1)));
            append(ledger, approve(i));
        }
    }

    fn snapshot(ledger: &Ledger) -> (Heads, Vec<(Digest, view::ImageRecord)>) {
        let view = ledger.view().unwrap();
        (view.heads.clone(), view.images())
    }

    #[test]
    fn keys_sort_by_seq() {
        assert_eq!(event_key(42), "events/000000000042.json");
        assert_eq!(seq_of_key("events/000000000042.json"), Some(42));
        assert_eq!(seq_of_key("events/42.json"), None);
    }

    #[test]
    fn appends_chain_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_dir(dir.path());
        fill(&ledger, 3);
        let report = ledger.verify().unwrap();
        assert_eq!(report.events, 6);
        let view = ledger.view().unwrap();
        assert_eq!(view.seq(), 6);
        assert_eq!(Some(view.hash()), report.head);
        assert_eq!(ledger.read(1).unwrap().unwrap().event.prev, Digest::ZERO);
    }

    #[test]
    fn the_index_answers_after_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        fill(&Ledger::open_dir(dir.path()), 40);
        let view = Ledger::open_dir(dir.path()).view().unwrap();
        assert_eq!(view.images().len(), 40);
        assert_eq!(view.image_for_key(&Digest::of(b"key 7")), Some(image(7)));
        assert_eq!(view.ancestors(&image(3)), vec![image(2), image(1), image(0)]);
        assert_eq!(view.descendants(&image(37)).len(), 2);
        assert_eq!(view.approvers("p", "prod", &image(5)).len(), 1);
        assert_eq!(view.heads.newest.get("r"), Some(&image(39)));
    }

    #[test]
    fn a_deleted_cache_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_dir(dir.path());
        fill(&ledger, 40);
        let before = snapshot(&ledger);
        std::fs::remove_dir_all(dir.path().join("cache")).unwrap();
        assert!(snapshot(&ledger) == before, "the view differs from the one before");
    }

    #[test]
    fn a_cache_that_disagrees_is_rebuilt_without_phantoms() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_dir(dir.path());
        fill(&ledger, 3);
        let truth = snapshot(&ledger);
        let mut wrong = truth.0.clone();
        wrong.hash = Digest::of(b"not the head");
        wrong.pipelines.clear();
        std::fs::write(dir.path().join("cache/heads.json"), serde_json::to_vec(&wrong).unwrap()).unwrap();
        let phantom = image(999);
        let shard = format!("cache/index/{:02x}.json", phantom.as_bytes()[0]);
        std::fs::write(dir.path().join(shard), br#"{"images":{},"keys":{}}"#).unwrap();
        assert!(snapshot(&ledger) == truth, "the view differs from the one before");
    }

    #[test]
    fn replaying_onto_newer_shards_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_dir(dir.path());
        fill(&ledger, 1);
        let old_heads = std::fs::read(dir.path().join("cache/heads.json")).unwrap();
        fill_range(&ledger, 1..40);
        let truth = snapshot(&ledger);
        ledger.save_cache(&ledger.view().unwrap());
        // Heads older than the shards: every later event is replayed onto records that already hold it.
        std::fs::write(dir.path().join("cache/heads.json"), old_heads).unwrap();
        assert!(snapshot(&ledger) == truth, "the view differs from the one before");
    }

    /// How [`LyingStore`] answers a create.
    #[derive(Clone, Copy, PartialEq)]
    enum Lie {
        /// Writes, then reports an error (a directory fsync failing after the link).
        WriteThenFail,
        /// Writes, then reports AlreadyExists (an S3 PUT retried after a lost 200, answered 412).
        WriteThenExists,
        /// Writes nothing and reports an error.
        FailWithoutWriting,
        /// Writes nothing, reports an error, and reading back fails too.
        FailAndUnreadable,
    }

    /// A file store whose creates of event `lie_at` answer wrongly, once.
    struct LyingStore {
        inner: file::FileStore,
        lie: Lie,
        lie_at: String,
        lied: std::sync::atomic::AtomicBool,
        creates: std::sync::atomic::AtomicU32,
    }

    impl LyingStore {
        fn ledger(dir: &Path, lie: Lie, lie_at: u64) -> (Ledger, std::sync::Arc<LyingStore>) {
            let store = std::sync::Arc::new(LyingStore {
                inner: file::FileStore::new(dir),
                lie,
                lie_at: event_key(lie_at),
                lied: Default::default(),
                creates: Default::default(),
            });
            (Ledger::new(Box::new(SharedStore(store.clone())), Some(dir.join("cache"))), store)
        }

        fn failure(&self, key: &str) -> StoreError {
            StoreError::Backend { location: self.location(), message: format!("injected failure at {key}") }
        }
    }

    impl Store for LyingStore {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            let after_the_lie = self.lied.load(std::sync::atomic::Ordering::SeqCst);
            if self.lie == Lie::FailAndUnreadable && key == self.lie_at && after_the_lie {
                return Err(self.failure(key));
            }
            self.inner.get(key)
        }
        fn create(&self, key: &str, bytes: &[u8]) -> Result<Created, StoreError> {
            self.creates.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if key != self.lie_at || self.lied.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return self.inner.create(key, bytes);
            }
            match self.lie {
                Lie::WriteThenFail => {
                    self.inner.create(key, bytes)?;
                    Err(self.failure(key))
                }
                Lie::WriteThenExists => {
                    self.inner.create(key, bytes)?;
                    Ok(Created::AlreadyExists)
                }
                Lie::FailWithoutWriting | Lie::FailAndUnreadable => Err(self.failure(key)),
            }
        }
        fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
            self.inner.list(prefix)
        }
        fn location(&self) -> String {
            self.inner.location()
        }
    }

    struct SharedStore(std::sync::Arc<LyingStore>);

    impl Store for SharedStore {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.get(key)
        }
        fn create(&self, key: &str, bytes: &[u8]) -> Result<Created, StoreError> {
            self.0.create(key, bytes)
        }
        fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
            self.0.list(prefix)
        }
        fn location(&self) -> String {
            self.0.location()
        }
    }

    fn try_append(ledger: &Ledger, body: EventBody) -> Result<Option<StoredEvent>, LedgerError> {
        ledger
            .append::<(), LedgerError>("t", &Clock::system(), |_| Ok(Decision::Append(Box::new(body.clone()), ())))
            .map(|(_, stored)| stored)
    }

    #[test]
    fn a_write_that_landed_counts_once_whatever_the_store_answered() {
        for lie in [Lie::WriteThenFail, Lie::WriteThenExists] {
            let dir = tempfile::tempdir().unwrap();
            let (ledger, store) = LyingStore::ledger(dir.path(), lie, 2);
            append(&ledger, baked(0, None));
            let stored = try_append(&ledger, approve(0)).unwrap().expect("the append reports its event");
            assert_eq!(stored.event.seq, 2);
            try_append(&ledger, approve(1)).unwrap();
            // Before reading back, the landed write was retried as seq 3: the approval was recorded twice.
            assert_eq!(ledger.verify().unwrap().events, 3, "the approval was written once");
            assert_eq!(store.creates.load(std::sync::atomic::Ordering::SeqCst), 3, "no create was retried");
            let approvals: Vec<_> =
                ledger.newest_first(3, 10, |e| matches!(e.event.body, EventBody::Approved { .. })).unwrap();
            assert_eq!(approvals.len(), 2);
        }
    }

    #[test]
    fn another_writers_event_at_the_key_is_a_lost_race() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_dir(dir.path());
        append(&ledger, baked(0, None));
        let rival = Ledger::open_dir(dir.path());
        let decided_at = std::cell::RefCell::new(Vec::new());
        let (_, stored) = ledger
            .append::<(), LedgerError>("t", &Clock::system(), |v| {
                // The rival takes seq 2 between our decision and our create.
                if decided_at.borrow().is_empty() {
                    append(&rival, approve(7));
                }
                decided_at.borrow_mut().push(v.seq());
                Ok(Decision::Append(Box::new(approve(0)), ()))
            })
            .unwrap();
        assert_eq!(stored.unwrap().event.seq, 3);
        assert_eq!(*decided_at.borrow(), vec![1, 2], "decided again after the lost race");
        assert_eq!(ledger.verify().unwrap().events, 3);
    }

    #[test]
    fn a_write_that_did_not_land_fails_with_the_stores_error() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, _) = LyingStore::ledger(dir.path(), Lie::FailWithoutWriting, 1);
        let err = try_append(&ledger, baked(0, None)).unwrap_err();
        assert!(matches!(err, LedgerError::Store(_)), "{err:?}");
        assert!(err.to_string().contains("injected failure at events/000000000001.json"), "{err}");
        assert_eq!(ledger.verify().unwrap().events, 0);
    }

    #[test]
    fn a_write_that_cannot_be_read_back_says_its_outcome_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, _) = LyingStore::ledger(dir.path(), Lie::FailAndUnreadable, 1);
        let err = try_append(&ledger, baked(0, None)).unwrap_err();
        assert!(matches!(err, LedgerError::OutcomeUnknown { .. }), "{err:?}");
        assert!(err.to_string().contains("cannot tell whether events/000000000001.json was written"), "{err}");
    }

    /// The truth a view cache must agree with: the same ledger read with no cache at all.
    fn uncached_snapshot(dir: &Path) -> (Heads, Vec<(Digest, view::ImageRecord)>) {
        snapshot(&Ledger::new(Box::new(file::FileStore::new(dir)), None))
    }

    fn heads_file(dir: &Path) -> HeadsFile {
        serde_json::from_slice(&std::fs::read(dir.join("cache/heads.json")).unwrap()).unwrap()
    }

    /// The shard file that holds `digest`'s record, as the saved heads name it.
    fn shard_path_of(dir: &Path, digest: &Digest) -> PathBuf {
        let shard = digest.as_bytes()[0];
        let named = heads_file(dir).shards[&view::shard_name(shard)];
        dir.join(format!("cache/index/{}-{}.json", view::shard_name(shard), named.hex()))
    }

    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                copy_tree(&entry.path(), &to.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }

    /// Every way a shard file can go bad, applied to the shard of one image that has a parent, children,
    /// approvals and a revocation to answer about.
    #[test]
    fn a_bad_shard_is_never_answered_from() {
        type Damage = fn(&Path, &Path);
        let damages: [(&str, Damage); 6] = [
            ("deleted", |_, shard| std::fs::remove_file(shard).unwrap()),
            ("truncated", |_, shard| {
                let bytes = std::fs::read(shard).unwrap();
                std::fs::write(shard, &bytes[..bytes.len() / 2]).unwrap()
            }),
            ("emptied", |_, shard| std::fs::write(shard, b"").unwrap()),
            ("valid JSON, other content", |_, shard| std::fs::write(shard, br#"{"images":{},"keys":{}}"#).unwrap()),
            ("one byte flipped", |_, shard| {
                let mut bytes = std::fs::read(shard).unwrap();
                let at = bytes.len() / 2;
                bytes[at] ^= 0x01;
                std::fs::write(shard, bytes).unwrap()
            }),
            ("whole index deleted", |dir, _| std::fs::remove_dir_all(dir.join("cache/index")).unwrap()),
        ];
        let template = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_dir(template.path());
        fill(&ledger, 40);
        let revoke = EventBody::Revoked { digest: image(3), reason: "bad".into(), descendants: vec![] };
        append(&ledger, revoke);
        ledger.save_cache(&ledger.view().unwrap());
        let truth = uncached_snapshot(template.path());
        for (damage, apply) in damages {
            let dir = tempfile::tempdir().unwrap();
            copy_tree(template.path(), dir.path());
            apply(dir.path(), &shard_path_of(dir.path(), &image(5)));

            // Each query on a freshly loaded view, so each one is the first to touch the damaged shard.
            let fresh = || Ledger::open_dir(dir.path()).view().unwrap();
            let query = DigestQuery::parse(&image(5).short()).unwrap();
            assert_eq!(fresh().resolve(&query).ok(), Some(image(5)), "{damage}: resolve");
            assert!(fresh().image(&image(5)).is_some(), "{damage}: image");
            assert_eq!(fresh().image_for_key(&Digest::of(b"key 5")), Some(image(5)), "{damage}: recipe key");
            assert_eq!(fresh().approvers("p", "prod", &image(5)).len(), 1, "{damage}: approvals");
            assert!(fresh().revocation(&image(5)).is_some(), "{damage}: revoked through its ancestor");
            assert_eq!(fresh().descendants(&image(4)).len(), 35, "{damage}: descendants");
            assert!(snapshot(&Ledger::open_dir(dir.path())) == truth, "{damage}: the view differs from no cache");
            // The rebuilt cache was saved: the next reader trusts it again, without replaying.
            let next = Ledger::open_dir(dir.path()).view().unwrap();
            assert!(!next.is_complete(), "{damage}: the rebuilt cache was not saved");
            assert!(next.image(&image(5)).is_some() && !next.is_complete(), "{damage}: the saved shard is bad");
        }
    }

    /// A shard found bad while catching up (folding in events past the cached heads) is rebuilt up to the
    /// event being folded, so that event and the ones after it are not lost or applied twice.
    #[test]
    fn a_bad_shard_found_while_catching_up_is_rebuilt_to_that_point() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_dir(dir.path());
        fill(&ledger, 40);
        ledger.save_cache(&ledger.view().unwrap());
        std::fs::remove_file(shard_path_of(dir.path(), &image(5))).unwrap();
        // Written with no cache, so the cached heads lag behind these and they are folded in on the next read.
        let behind = Ledger::new(Box::new(file::FileStore::new(dir.path())), None);
        // A child of the image in the damaged shard: folding it changes its own shard, then its parent's.
        assert_ne!(image(100).as_bytes()[0], image(5).as_bytes()[0]);
        append(&behind, baked(100, Some(5)));
        append(&behind, approve(100));
        let view = Ledger::open_dir(dir.path()).view().unwrap();
        assert!(view.is_complete(), "the damaged shard was not noticed");
        assert!((view.heads.clone(), view.images()) == uncached_snapshot(dir.path()), "the view differs from no cache");
    }

    /// When the ledger itself cannot be replayed (here: an event is gone), a decision that needed the bad shard
    /// is not recorded; the append fails with the ledger's error instead.
    #[test]
    fn nothing_is_decided_on_a_bad_shard_that_cannot_be_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_dir(dir.path());
        fill(&ledger, 40);
        ledger.save_cache(&ledger.view().unwrap());
        std::fs::remove_file(shard_path_of(dir.path(), &image(5))).unwrap();
        std::fs::remove_file(dir.path().join(event_key(1))).unwrap();
        let ledger = Ledger::open_dir(dir.path());
        let result = ledger.append::<(), LedgerError>("t", &Clock::system(), |view| {
            assert_eq!(view.image(&image(5)), None, "answers from nothing, not from the bad shard");
            Ok(Decision::Append(Box::new(approve(5)), ()))
        });
        let err = result.unwrap_err();
        assert!(err.to_string().contains("damaged at seq 1: the event is missing"), "{err}");
        assert_eq!(ledger.read(82).unwrap(), None, "nothing was appended");
    }

    #[test]
    fn heads_are_not_saved_when_a_shard_write_fails() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_dir(dir.path());
        fill(&ledger, 1);
        let saved_before = std::fs::read(dir.path().join("cache/heads.json")).unwrap();
        fill_range(&ledger, 1..10);
        let writes = std::sync::atomic::AtomicU32::new(0);
        ledger.save_cache_with(&ledger.view().unwrap(), |path, bytes| {
            if writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                return Err(std::io::Error::other("disk full"));
            }
            crate::fsutil::replace_file(path, bytes)
        });
        assert_eq!(writes.load(std::sync::atomic::Ordering::SeqCst), 2, "the second shard write failed");
        let saved_after = std::fs::read(dir.path().join("cache/heads.json")).unwrap();
        assert_eq!(saved_after, saved_before, "heads were saved over a shard that was not");
        assert!(snapshot(&Ledger::open_dir(dir.path())) == uncached_snapshot(dir.path()));
    }

    /// A ledger of approvals written at these times, each `(time, real time if the clock was pinned)`.
    fn forge(dir: &Path, times: &[(&str, Option<&str>)]) -> Ledger {
        let store = file::FileStore::new(dir);
        let mut prev = Digest::ZERO;
        for (i, (time, real_time)) in times.iter().enumerate() {
            let event = Event {
                seq: i as u64 + 1,
                prev,
                time: time.to_string(),
                actor: "t".into(),
                clock: real_time.map(|r| crate::clock::ClockRecord { pinned: true, real_time: r.into() }),
                body: approve(i as u64),
            };
            let (bytes, hash) = event::encode(&event).unwrap();
            assert_eq!(store.create(&event_key(event.seq), &bytes).unwrap(), Created::Yes);
            prev = hash;
        }
        Ledger::open_dir(dir)
    }

    #[test]
    fn verify_names_the_event_where_time_runs_backwards_beyond_clock_skew() {
        type Times<'a> = &'a [(&'a str, Option<&'a str>)];
        /// The pinned seqs verify lists, or what its error says.
        type Verdict<'a> = Result<Vec<u64>, &'a str>;
        let cases: [(&str, Times, Verdict); 6] = [
            ("forward", &[("2026-11-28T12:00:00Z", None), ("2026-11-28T12:01:00Z", None)], Ok(vec![])),
            (
                "4m back: skew between machines",
                &[("2026-11-28T12:00:00Z", None), ("2026-11-28T11:56:00Z", None), ("2026-11-28T12:02:00Z", None)],
                Ok(vec![]),
            ),
            (
                "10m back",
                &[("2026-11-28T12:00:00Z", None), ("2026-11-28T12:01:00Z", None), ("2026-11-28T11:51:00Z", None)],
                Err("damaged at seq 3: time runs backwards: it was written at 2026-11-28T11:51:00.000Z, 10m before seq 2 (at 2026-11-28T12:01:00.000Z), more than the 5m allowed"),
            ),
            (
                "pinned a year back, really written in order",
                &[("2026-11-28T12:00:00Z", None), ("2025-01-01T00:00:00Z", Some("2026-11-28T12:01:00Z"))],
                Ok(vec![2]),
            ),
            (
                "pinned, and the real time runs backwards",
                &[("2026-11-28T12:00:00Z", None), ("2026-11-28T12:30:00Z", Some("2026-11-28T11:00:00Z"))],
                Err("damaged at seq 2: time runs backwards: it was written at 2026-11-28T11:00:00.000Z, 1h before seq 1"),
            ),
            (
                "an unpinned event after one pinned in the future",
                &[("2030-01-01T00:00:00Z", Some("2026-11-28T12:00:00Z")), ("2026-11-28T12:00:01Z", None)],
                Ok(vec![1]),
            ),
        ];
        for (case, times, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            let verified = forge(dir.path(), times).verify();
            match (verified, expected) {
                (Ok(report), Ok(pinned)) => assert_eq!(report.pinned_clock, pinned, "{case}"),
                (Err(err), Err(message)) => {
                    assert!(matches!(err, LedgerError::Tampered { .. }), "{case}: {err:?}");
                    assert!(err.to_string().contains(message), "{case}: {err}");
                }
                (got, _) => panic!("{case}: {got:?}"),
            }
        }
    }

    #[test]
    fn events_written_under_a_pinned_clock_record_the_real_time() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_dir(dir.path());
        append(&ledger, baked(0, None));
        let pinned = Clock::fixed(crate::clock::parse("2020-01-01T00:00:00Z").unwrap());
        let body = approve(0);
        let (_, stored) = ledger
            .append::<(), LedgerError>("t", &pinned, |_| Ok(Decision::Append(Box::new(body.clone()), ())))
            .unwrap();
        let event = stored.unwrap().event;
        assert_eq!(event.time, "2020-01-01T00:00:00.000Z");
        let record = event.clock.clone().expect("the pinned clock is recorded");
        assert!(record.pinned && record.real_time.starts_with("20") && record.real_time != event.time);
        assert_eq!(ledger.read(1).unwrap().unwrap().event.clock, None, "a real clock records nothing");
        assert_eq!(ledger.verify().unwrap().pinned_clock, vec![2]);
    }

    #[test]
    fn skip_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_dir(dir.path());
        let (value, stored) =
            ledger.append::<u8, LedgerError>("t", &Clock::system(), |_| Ok(Decision::Skip(7))).unwrap();
        assert_eq!((value, stored), (7, None));
        assert_eq!(ledger.view().unwrap().seq(), 0);
    }
}
