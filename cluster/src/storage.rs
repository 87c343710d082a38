//! Durable raft storage: `raft.log` (append-only entry records), `raft.state` (hard state + conf state) and
//! `raft.snap` (the latest snapshot) in the node's data dir.
//!
//! A record is `len: u32 LE | crc32(payload): u32 LE | payload` (a protobuf message). The log is only ever
//! appended to and fsynced; an entry whose index is at or below the last one replaces the tail (raft
//! truncating a conflicting suffix), so recovery replays records in order with the same rule. A torn or
//! corrupt record ends the log: recovery truncates the file there (it was never acknowledged, since a record
//! is only acknowledged after fsync). State and snapshot files are replaced atomically: write a temp file,
//! fsync, rename, fsync the directory. Compaction writes the snapshot first, then rewrites the log without the
//! compacted prefix the same way. All entries since the snapshot are also kept in memory: the log is bounded
//! by `snapshot_every`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use protobuf::Message as PbMessage;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::ClusterError;

const LOG: &str = "raft.log";
const STATE: &str = "raft.state";
const SNAP: &str = "raft.snap";
/// A record above this is taken as corruption, not allocated.
const MAX_RECORD: usize = 256 << 20;

struct Core {
    dir: PathBuf,
    log: File,
    /// Every entry after the snapshot, in index order.
    entries: Vec<Entry>,
    snapshot: Snapshot,
    hard_state: HardState,
    conf_state: ConfState,
}

/// Raft storage on disk; cheap to clone (shared core), like raft's `MemStorage`.
#[derive(Clone)]
pub struct DiskStorage {
    core: Arc<RwLock<Core>>,
    /// Raft asked for a snapshot the stored one cannot serve (too old, or from before the peer was added):
    /// the node takes a fresh one at its applied index, and raft asks again.
    snapshot_wanted: Arc<AtomicBool>,
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ClusterError + 'a {
    move |e| ClusterError::storage(what, path, e)
}

fn encode_record(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The records of `buf` and the length of its valid prefix (a torn or corrupt record ends it).
fn decode_records(buf: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 8 {
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(buf[at + 4..at + 8].try_into().expect("4 bytes"));
        if len > MAX_RECORD || buf.len() - at - 8 < len {
            break;
        }
        let payload = &buf[at + 8..at + 8 + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        out.push(payload);
        at += 8 + len;
    }
    (out, at)
}

fn sync_dir(dir: &Path) -> Result<(), ClusterError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Replaces `dir/name` with `records`, atomically and durably.
fn write_atomic(dir: &Path, name: &str, records: &[&[u8]]) -> Result<(), ClusterError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut buf = Vec::new();
    for r in records {
        encode_record(&mut buf, r);
    }
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(&buf).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
    sync_dir(dir)
}

fn read_file(path: &Path) -> Result<Option<Vec<u8>>, ClusterError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ClusterError::storage("read", path, e)),
    }
}

fn pb<M: PbMessage>(payload: &[u8], what: &str) -> Result<M, ClusterError> {
    M::parse_from_bytes(payload).map_err(|e| ClusterError::Corrupt(format!("{what}: {e}")))
}

fn pb_bytes<M: PbMessage>(m: &M) -> Vec<u8> {
    m.write_to_bytes().expect("raft messages always encode")
}

fn store_err(e: StorageError) -> raft::Error {
    raft::Error::Store(e)
}

impl Core {
    fn first_index(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot.get_metadata().index, |e| e.index)
    }

    /// Adds entries to the in-memory log, replacing any suffix they overlap.
    fn push(&mut self, e: Entry) -> Result<(), ClusterError> {
        let first = self.first_index();
        if e.index < first {
            return Ok(());
        }
        if e.index > self.last_index() + 1 {
            return Err(ClusterError::Corrupt(format!(
                "log entry {} follows entry {}: a gap",
                e.index,
                self.last_index()
            )));
        }
        self.entries.truncate((e.index - first) as usize);
        self.entries.push(e);
        Ok(())
    }

    fn save_state(&self) -> Result<(), ClusterError> {
        let hs = pb_bytes(&self.hard_state);
        let cs = pb_bytes(&self.conf_state);
        write_atomic(&self.dir, STATE, &[&hs, &cs])
    }

    /// Rewrites the log file with exactly the in-memory entries.
    fn rewrite_log(&mut self) -> Result<(), ClusterError> {
        let bodies: Vec<Vec<u8>> = self.entries.iter().map(pb_bytes).collect();
        let refs: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
        write_atomic(&self.dir, LOG, &refs)?;
        let path = self.dir.join(LOG);
        self.log = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        Ok(())
    }
}

impl DiskStorage {
    /// Opens (creating if needed) the storage in `dir` and recovers whatever it holds.
    pub fn open(dir: &Path) -> Result<Self, ClusterError> {
        fs::create_dir_all(dir).map_err(io_err("create data dir", dir))?;
        let snapshot = match read_file(&dir.join(SNAP))? {
            Some(buf) => match decode_records(&buf).0.first() {
                Some(r) => pb::<Snapshot>(r, "snapshot file")?,
                None => {
                    return Err(ClusterError::Corrupt(
                        "snapshot file has no valid record".into(),
                    ))
                }
            },
            None => Snapshot::default(),
        };
        let (mut hard_state, mut conf_state) = (HardState::default(), ConfState::default());
        if let Some(buf) = read_file(&dir.join(STATE))? {
            let (recs, _) = decode_records(&buf);
            if recs.len() != 2 {
                return Err(ClusterError::Corrupt(
                    "state file is not hard state + conf state".into(),
                ));
            }
            hard_state = pb(recs[0], "hard state")?;
            conf_state = pb(recs[1], "conf state")?;
        }
        let log_path = dir.join(LOG);
        let buf = read_file(&log_path)?.unwrap_or_default();
        let (recs, valid) = decode_records(&buf);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("open", &log_path))?;
        if valid < buf.len() {
            tracing::warn!(
                path = %log_path.display(),
                dropped = buf.len() - valid,
                "raft log ends in a torn or corrupt record; truncating it (it was never acknowledged)"
            );
            log.set_len(valid as u64)
                .map_err(io_err("truncate", &log_path))?;
            log.sync_all().map_err(io_err("fsync", &log_path))?;
        }
        let snap_index = snapshot.get_metadata().index;
        if conf_state == ConfState::default() && snap_index > 0 {
            conf_state = snapshot.get_metadata().get_conf_state().clone();
        }
        let mut core = Core {
            dir: dir.to_owned(),
            log,
            entries: Vec::new(),
            snapshot,
            hard_state,
            conf_state,
        };
        for r in recs {
            core.push(pb::<Entry>(r, "log entry")?)?;
        }
        if core.hard_state.commit < snap_index {
            core.hard_state.commit = snap_index;
        }
        Ok(DiskStorage {
            core: Arc::new(RwLock::new(core)),
            snapshot_wanted: Arc::new(AtomicBool::new(false)),
        })
    }

    fn rl(&self) -> RwLockReadGuard<'_, Core> {
        self.core.read().unwrap_or_else(|e| e.into_inner())
    }

    fn wl(&self) -> RwLockWriteGuard<'_, Core> {
        self.core.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this storage belongs to a cluster (bootstrapped, or received its state from one).
    pub fn is_initialized(&self) -> bool {
        let c = self.rl();
        c.snapshot.get_metadata().index > 0
            || !c.conf_state.voters.is_empty()
            || !c.entries.is_empty()
    }

    /// Appends entries (fsynced before returning), replacing any suffix they overlap.
    pub fn append(&self, ents: &[Entry]) -> Result<(), ClusterError> {
        if ents.is_empty() {
            return Ok(());
        }
        let mut c = self.wl();
        let mut buf = Vec::new();
        for e in ents {
            encode_record(&mut buf, &pb_bytes(e));
            c.push(e.clone())?;
        }
        let path = c.dir.join(LOG);
        c.log.write_all(&buf).map_err(io_err("append to", &path))?;
        c.log.sync_data().map_err(io_err("fsync", &path))?;
        Ok(())
    }

    /// Stores the hard state: fsynced when the term or the vote changed (what raft's safety rests on). A
    /// change of the commit index alone stays in memory until the next durable write: a restarted node
    /// re-learns it from the leader, and replays from its snapshot either way.
    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), ClusterError> {
        let mut c = self.wl();
        let durable = c.hard_state.term != hs.term || c.hard_state.vote != hs.vote;
        c.hard_state = hs.clone();
        if durable {
            c.save_state()
        } else {
            Ok(())
        }
    }

    /// A new commit index (in memory; see `set_hard_state`).
    pub fn set_commit(&self, commit: u64) -> Result<(), ClusterError> {
        self.wl().hard_state.commit = commit;
        Ok(())
    }

    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), ClusterError> {
        let mut c = self.wl();
        c.conf_state = cs.clone();
        c.save_state()
    }

    pub fn hard_state(&self) -> HardState {
        self.rl().hard_state.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.rl().conf_state.clone()
    }

    /// The latest snapshot (metadata and state machine data).
    pub fn latest_snapshot(&self) -> Snapshot {
        self.rl().snapshot.clone()
    }

    /// Installs a snapshot received from the leader (or the bootstrap one): the log before it is dropped.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), ClusterError> {
        let mut c = self.wl();
        let meta = snap.get_metadata();
        if meta.index < c.snapshot.get_metadata().index {
            return Ok(());
        }
        write_atomic(&c.dir, SNAP, &[&pb_bytes(snap)])?;
        c.snapshot = snap.clone();
        c.hard_state.term = c.hard_state.term.max(meta.term);
        c.hard_state.commit = c.hard_state.commit.max(meta.index);
        c.conf_state = meta.get_conf_state().clone();
        c.save_state()?;
        c.entries.clear();
        c.rewrite_log()
    }

    /// Takes a snapshot at `index` (applied, and in the log) with the state machine's `data`, then drops the
    /// log up to it.
    pub fn compact(
        &self,
        index: u64,
        conf_state: &ConfState,
        data: Vec<u8>,
    ) -> Result<(), ClusterError> {
        let mut c = self.wl();
        let first = c.first_index();
        if index < first || index > c.last_index() {
            return Ok(());
        }
        let term = c.entries[(index - first) as usize].term;
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf_state.clone());
        write_atomic(&c.dir, SNAP, &[&pb_bytes(&snap)])?;
        c.snapshot = snap;
        c.entries.drain(..(index + 1 - first) as usize);
        c.rewrite_log()
    }

    /// Whether raft asked for a fresher snapshot than the stored one (and forgets the request).
    pub fn take_snapshot_request(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
    }
}

impl raft::Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.rl();
        Ok(RaftState::new(c.hard_state.clone(), c.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let c = self.rl();
        if low < c.first_index() {
            return Err(store_err(StorageError::Compacted));
        }
        if high > c.last_index() + 1 {
            return Err(store_err(StorageError::Unavailable));
        }
        let first = c.first_index();
        let mut out = Vec::new();
        let mut size = 0u64;
        let max = max_size.into().unwrap_or(u64::MAX);
        for e in &c.entries[(low - first) as usize..(high - first) as usize] {
            size += u64::from(e.compute_size());
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let c = self.rl();
        let meta = c.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < c.first_index() {
            return Err(store_err(StorageError::Compacted));
        }
        if idx > c.last_index() {
            return Err(store_err(StorageError::Unavailable));
        }
        Ok(c.entries[(idx - c.first_index()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.rl().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.rl().last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let c = self.rl();
        let meta = c.snapshot.get_metadata();
        let cs = meta.get_conf_state();
        // raft refuses a snapshot whose configuration does not name the receiver (a new learner).
        if meta.index < request_index || !(cs.voters.contains(&to) || cs.learners.contains(&to)) {
            self.snapshot_wanted.store(true, Ordering::Relaxed);
            return Err(store_err(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(c.snapshot.clone())
    }
}

/// Reads a small file of the data dir (e.g. the node id), if present.
pub(crate) fn read_small(dir: &Path, name: &str) -> Result<Option<String>, ClusterError> {
    let path = dir.join(name);
    let mut s = String::new();
    match File::open(&path) {
        Ok(mut f) => {
            f.read_to_string(&mut s).map_err(io_err("read", &path))?;
            Ok(Some(s))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ClusterError::storage("open", &path, e)),
    }
}

/// Writes a small file of the data dir atomically.
pub(crate) fn write_small(dir: &Path, name: &str, text: &str) -> Result<(), ClusterError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = BufWriter::new(File::create(&tmp).map_err(io_err("create", &tmp))?);
    f.write_all(text.as_bytes())
        .map_err(io_err("write", &tmp))?;
    let f = f
        .into_inner()
        .map_err(|e| ClusterError::storage("write", &tmp, e.into_error()))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn all(s: &DiskStorage) -> Vec<(u64, u64)> {
        let (lo, hi) = (s.first_index().unwrap(), s.last_index().unwrap());
        s.entries(lo, hi + 1, None, GetEntriesContext::empty(false))
            .unwrap()
            .iter()
            .map(|e| (e.index, e.term))
            .collect()
    }

    #[test]
    fn empty_storage_is_uninitialised() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        assert!(!s.is_initialized());
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
        assert_eq!(s.term(0).unwrap(), 0);
    }

    #[test]
    fn entries_and_hard_state_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = DiskStorage::open(dir.path()).unwrap();
            s.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")])
                .unwrap();
            // A new leader overwrites a conflicting suffix.
            s.append(&[entry(3, 2, b"C"), entry(4, 2, b"d")]).unwrap();
            let hs = HardState {
                term: 2,
                vote: 7,
                commit: 3,
                ..Default::default()
            };
            s.set_hard_state(&hs).unwrap();
            let cs = ConfState {
                voters: vec![1, 7],
                ..Default::default()
            };
            s.set_conf_state(&cs).unwrap();
        }
        let s = DiskStorage::open(dir.path()).unwrap();
        assert!(s.is_initialized());
        assert_eq!(all(&s), vec![(1, 1), (2, 1), (3, 2), (4, 2)]);
        let st = s.initial_state().unwrap();
        assert_eq!(
            (st.hard_state.term, st.hard_state.vote, st.hard_state.commit),
            (2, 7, 3)
        );
        assert_eq!(st.conf_state.voters, vec![1, 7]);
        let e = s
            .entries(3, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(&e[0].data[..], b"C");
    }

    #[test]
    fn a_torn_trailing_record_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = DiskStorage::open(dir.path()).unwrap();
            s.append(&[entry(1, 1, b"a"), entry(2, 1, b"b")]).unwrap();
        }
        let path = dir.path().join(LOG);
        let len = fs::metadata(&path).unwrap().len();
        // Half of a third record, as a crash mid-write leaves it.
        let mut rec = Vec::new();
        encode_record(&mut rec, &pb_bytes(&entry(3, 1, b"ccccccccccccccc")));
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&rec[..rec.len() / 2]).unwrap();
        drop(f);
        let s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(all(&s), vec![(1, 1), (2, 1)]);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            len,
            "the torn record is truncated away"
        );
        // Appending after recovery continues a clean log.
        s.append(&[entry(3, 1, b"c")]).unwrap();
        drop(s);
        // A flipped bit in the last record is caught by its checksum.
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(all(&s), vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn compaction_keeps_a_snapshot_and_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        {
            let s = DiskStorage::open(dir.path()).unwrap();
            let ents: Vec<Entry> = (1..=10).map(|i| entry(i, 1 + i / 5, b"x")).collect();
            s.append(&ents).unwrap();
            s.compact(6, &cs, b"state@6".to_vec()).unwrap();
            assert_eq!(s.first_index().unwrap(), 7);
            assert_eq!(s.term(6).unwrap(), 2);
            assert!(matches!(
                s.term(5),
                Err(raft::Error::Store(StorageError::Compacted))
            ));
            assert!(s
                .entries(5, 8, None, GetEntriesContext::empty(false))
                .is_err());
            s.append(&[entry(11, 3, b"y")]).unwrap();
        }
        let s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(all(&s), vec![(7, 2), (8, 2), (9, 2), (10, 3), (11, 3)]);
        assert!(
            s.snapshot(0, 2).is_err(),
            "node 2 is not in the snapshot's configuration"
        );
        assert!(s.take_snapshot_request());
        let snap = s.snapshot(0, 1).unwrap();
        assert_eq!(snap.get_metadata().index, 6);
        assert_eq!(&snap.data[..], b"state@6");
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1]);
        assert!(s.hard_state().commit >= 6);
    }

    #[test]
    fn an_installed_snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = DiskStorage::open(dir.path()).unwrap();
            s.append(&[entry(1, 1, b"a"), entry(2, 1, b"b")]).unwrap();
            let mut snap = Snapshot::default();
            snap.set_data(b"remote".to_vec().into());
            snap.mut_metadata().index = 20;
            snap.mut_metadata().term = 4;
            snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
            s.apply_snapshot(&snap).unwrap();
        }
        let s = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (21, 20)
        );
        assert_eq!(s.term(20).unwrap(), 4);
        let st = s.initial_state().unwrap();
        assert_eq!((st.hard_state.commit, st.hard_state.term), (20, 4));
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(&s.latest_snapshot().data[..], b"remote");
    }
}
