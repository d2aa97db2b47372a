//! The merge record: what a failover merge needs to be resumed after the process dies.
//!
//! ```text
//!   STATE-DIR/merge            written once, at failover begin (the gate is exclusive: no
//!                              VM I/O): the overlays' frozen maps, their store files (named
//!                              then, see Overlay::keep), the host's boot id, a merge id
//!   STATE-DIR/merge-progress   the clusters of that map already merged, as a bitmap over
//!                              them; rewritten when a VM write waits for it, and at the end
//! ```
//!
//! Both are replaced atomically with a digest (`state::write_atomic_unsynced`), and nothing
//! here is flushed, neither the record nor an overlay byte: after a crash of the process the
//! page cache holds them all; after a crash of the host the overlays are not to be trusted,
//! and the record is then refused whatever survived of it (another boot id, a digest that
//! does not match, or no record at all while the disk's state, which is flushed, says
//! `merging`). So the record costs the failover no flush.
//!
//! Why a resumed merge cannot clobber a VM write: from failover begin on nothing new goes into
//! the overlays (a VM write to a cluster an overlay still holds merges that cluster first, then
//! goes to the disk), and a VM write to a cluster merged in this merge waits until
//! `merge-progress` says that cluster is merged. A resumed merge skips recorded clusters and
//! redoes the others from the frozen maps, which no VM write touched since: redoing them
//! writes the same bytes again. One record save covers every cluster merged before it, so the
//! waits are batched.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::{BlockError, ErrorKind, Op, Result};
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};

use super::geometry::Geometry;
use crate::state::{read_checked, write_atomic_unsynced};

/// The frozen maps.
const RECORD: &str = "merge";
/// The merged clusters.
const PROGRESS: &str = "merge-progress";

/// One hidden-overlay entry: cluster, slot (`u32::MAX`: preserved as zero).
pub(crate) type HiddenEntry = (u64, u32);
/// One active-overlay entry: cluster, slot (`u32::MAX`: none), allocated and zero blocks.
pub(crate) type ActiveEntry = (u64, u32, u128, u128);

/// The header line of the record (the maps follow it in binary).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Header {
    id: u64,
    boot: Option<String>,
    len: u64,
    cluster: u64,
    active_file: PathBuf,
    hidden_file: PathBuf,
    hidden: usize,
    active: usize,
}

/// A record read back, for a resume.
pub(crate) struct Loaded {
    pub boot: Option<String>,
    pub len: u64,
    pub cluster: u64,
    pub active_file: PathBuf,
    pub hidden_file: PathBuf,
    pub hidden: Vec<HiddenEntry>,
    pub active: Vec<ActiveEntry>,
    /// The journal, with what `merge-progress` recorded marked merged and durable.
    pub journal: Arc<Journal>,
}

/// What the merge has merged and recorded.
#[derive(Debug)]
struct Marks {
    /// Bit `i`: `todo[i]` is merged (the disk holds its view).
    merged: Vec<u64>,
    /// Bit `i`: `todo[i]` is recorded merged in `merge-progress`.
    durable: Vec<u64>,
    /// Bumped at each mark; the record's saves say which value they cover.
    seq: u64,
    /// Saving the progress failed: VM writes that wait for it fail too.
    failed: Option<String>,
    /// The merge is over: the recorder stops.
    closed: bool,
}

fn bit(v: &[u64], i: usize) -> bool {
    v[i / 64] >> (i % 64) & 1 == 1
}

/// A running merge's record. See the module docs.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    id: u64,
    /// The clusters the record's maps hold, ascending.
    todo: Vec<u64>,
    /// The overlays' named store files, removed once the merge is done.
    files: Vec<PathBuf>,
    marks: Mutex<Marks>,
    /// Wakes the recorder.
    wake: Notify,
    /// The last `seq` whose marks are durable.
    durable: watch::Sender<u64>,
    /// One save at a time (they write the same temporary file).
    saving: tokio::sync::Mutex<()>,
}

fn record_error(dir: &Path, e: impl std::fmt::Display) -> BlockError {
    BlockError::new(ErrorKind::Io(None), Op::Write, 0).context(format!(
        "cannot save the failover merge's record in {}: {e}",
        dir.display()
    ))
}

/// The sorted clusters of the maps (those with something to merge).
fn todo_of(hidden: &[HiddenEntry], active: &[ActiveEntry]) -> Vec<u64> {
    let mut v: Vec<u64> = hidden.iter().map(|e| e.0).collect();
    v.extend(active.iter().filter(|e| e.2 != 0).map(|e| e.0));
    v.sort_unstable();
    v.dedup();
    v
}

impl Journal {
    fn new(dir: &Path, id: u64, todo: Vec<u64>, files: Vec<PathBuf>) -> Self {
        let words = todo.len().div_ceil(64);
        Journal {
            dir: dir.to_path_buf(),
            id,
            todo,
            files,
            marks: Mutex::new(Marks {
                merged: vec![0; words],
                durable: vec![0; words],
                seq: 0,
                failed: None,
                closed: false,
            }),
            wake: Notify::new(),
            durable: watch::channel(0).0,
            saving: tokio::sync::Mutex::new(()),
        }
    }

    /// Writes the record of a merge about to begin (blocking: call it off the runtime).
    pub fn create(
        dir: &Path,
        geo: Geometry,
        boot: Option<String>,
        active_file: PathBuf,
        hidden_file: PathBuf,
        hidden: &[HiddenEntry],
        active: &[ActiveEntry],
    ) -> Result<Journal> {
        let id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()) << 40;
        let header = Header {
            id,
            boot,
            len: geo.len,
            cluster: geo.cluster,
            active_file: active_file.clone(),
            hidden_file: hidden_file.clone(),
            hidden: hidden.len(),
            active: active.len(),
        };
        let mut body = serde_json::to_vec(&header).expect("a header always serialises");
        body.push(b'\n');
        body.reserve(hidden.len() * 12 + active.len() * 44);
        for &(c, s) in hidden {
            body.extend_from_slice(&c.to_le_bytes());
            body.extend_from_slice(&s.to_le_bytes());
        }
        for &(c, s, a, z) in active {
            body.extend_from_slice(&c.to_le_bytes());
            body.extend_from_slice(&s.to_le_bytes());
            body.extend_from_slice(&a.to_le_bytes());
            body.extend_from_slice(&z.to_le_bytes());
        }
        // A progress file of an earlier merge must not be read against this one (the id
        // would refuse it anyway).
        match std::fs::remove_file(dir.join(PROGRESS)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(record_error(dir, e)),
        }
        write_atomic_unsynced(dir, RECORD, &body).map_err(|e| record_error(dir, e))?;
        Ok(Journal::new(
            dir,
            id,
            todo_of(hidden, active),
            vec![active_file, hidden_file],
        ))
    }

    /// Reads the record in `dir` (blocking); `None` when there is none.
    pub fn load(dir: &Path) -> std::result::Result<Option<Loaded>, String> {
        let Some(body) = read_checked(dir, RECORD).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let nl = body
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("the record has no header line")?;
        let h: Header = serde_json::from_slice(&body[..nl])
            .map_err(|e| format!("the record's header is not one: {e}"))?;
        let mut rest = &body[nl + 1..];
        if rest.len() != h.hidden * 12 + h.active * 44 {
            return Err(format!(
                "the record holds {} bytes of maps, not the {} its header names",
                rest.len(),
                h.hidden * 12 + h.active * 44
            ));
        }
        let mut take = |n: usize| {
            let (a, b) = rest.split_at(n);
            rest = b;
            a
        };
        let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let u128_of = |b: &[u8]| u128::from_le_bytes(b.try_into().expect("16 bytes"));
        let hidden: Vec<HiddenEntry> = (0..h.hidden)
            .map(|_| (u64_of(take(8)), u32_of(take(4))))
            .collect();
        let active: Vec<ActiveEntry> = (0..h.active)
            .map(|_| {
                (
                    u64_of(take(8)),
                    u32_of(take(4)),
                    u128_of(take(16)),
                    u128_of(take(16)),
                )
            })
            .collect();
        let journal = Journal::new(
            dir,
            h.id,
            todo_of(&hidden, &active),
            vec![h.active_file.clone(), h.hidden_file.clone()],
        );
        if let Some(p) = read_checked(dir, PROGRESS).map_err(|e| e.to_string())? {
            let words = journal.todo.len().div_ceil(64);
            if p.len() != 8 + words * 8 || u64_of(&p[..8]) != h.id {
                return Err(format!(
                    "{} is not the progress of this merge",
                    dir.join(PROGRESS).display()
                ));
            }
            let bits: Vec<u64> = p[8..].chunks(8).map(u64_of).collect();
            let mut m = journal.marks.lock();
            m.merged.clone_from(&bits);
            m.durable = bits;
        }
        Ok(Some(Loaded {
            boot: h.boot,
            len: h.len,
            cluster: h.cluster,
            active_file: h.active_file,
            hidden_file: h.hidden_file,
            hidden,
            active,
            journal: Arc::new(journal),
        }))
    }

    /// Removes the record and the store files it names (a merge whose end is recorded
    /// elsewhere, or a stale record). Nothing there is fine.
    pub fn discard(dir: &Path) -> std::io::Result<()> {
        let files = match Journal::load(dir) {
            Ok(Some(l)) => l.journal.files.clone(),
            _ => Vec::new(),
        };
        for f in files
            .iter()
            .cloned()
            .chain([dir.join(PROGRESS), dir.join(RECORD)])
        {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Index of cluster `c` in `todo`.
    fn index(&self, c: u64) -> Option<usize> {
        self.todo.binary_search(&c).ok()
    }

    /// Notes that `clusters` are merged (their view is on the disk).
    pub fn mark(&self, clusters: &[u64]) {
        let mut m = self.marks.lock();
        for &c in clusters {
            if let Some(i) = self.index(c) {
                m.merged[i / 64] |= 1 << (i % 64);
            }
        }
        m.seq += 1;
    }

    /// Waits until every cluster of `clusters` the merge holds or held is recorded merged.
    /// The caller saw them merged (held by no overlay), so they are marked.
    pub async fn wait_recorded(&self, clusters: std::ops::Range<u64>) -> Result<()> {
        let target = {
            let m = self.marks.lock();
            if let Some(e) = &m.failed {
                return Err(record_error(&self.dir, e));
            }
            let all = clusters
                .filter_map(|c| self.index(c))
                .all(|i| bit(&m.durable, i));
            if all {
                return Ok(());
            }
            m.seq
        };
        self.wake.notify_one();
        let mut rx = self.durable.subscribe();
        let _ = rx.wait_for(|&d| d >= target).await;
        match &self.marks.lock().failed {
            Some(e) => Err(record_error(&self.dir, e)),
            None => Ok(()),
        }
    }

    /// Saves what is marked, if anything is new; returns the `seq` now durable.
    async fn save(&self) -> Result<u64> {
        let _one = self.saving.lock().await;
        let (bits, seq) = {
            let m = self.marks.lock();
            if m.seq == *self.durable.borrow() {
                return Ok(m.seq);
            }
            (m.merged.clone(), m.seq)
        };
        let mut body = Vec::with_capacity(8 + bits.len() * 8);
        body.extend_from_slice(&self.id.to_le_bytes());
        bits.iter()
            .for_each(|w| body.extend_from_slice(&w.to_le_bytes()));
        let dir = self.dir.clone();
        let r = tokio::task::spawn_blocking(move || write_atomic_unsynced(&dir, PROGRESS, &body))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let mut m = self.marks.lock();
        match r {
            Ok(()) => {
                m.durable = bits;
                drop(m);
                self.durable.send_modify(|d| *d = (*d).max(seq));
                Ok(seq)
            }
            Err(e) => {
                m.failed = Some(e.clone());
                drop(m);
                self.durable.send_modify(|d| *d = u64::MAX);
                Err(record_error(&self.dir, e))
            }
        }
    }

    /// Saves the progress whenever a VM write waits for it, until the merge is over.
    pub async fn recorder(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            if self.marks.lock().closed || self.save().await.is_err() {
                return;
            }
        }
    }

    /// The merge is done: every cluster is marked and recorded (a restart then has nothing
    /// left to merge), and the recorder stops.
    pub async fn finish(&self) -> Result<()> {
        {
            let mut m = self.marks.lock();
            let n = self.todo.len();
            for i in 0..n {
                m.merged[i / 64] |= 1 << (i % 64);
            }
            m.seq += 1;
        }
        let r = self.save().await;
        self.marks.lock().closed = true;
        self.wake.notify_one();
        r.map(|_| ())
    }

    /// Removes the store files once nothing needs them (the record says all is merged).
    pub fn remove_files(&self) {
        for f in &self.files {
            if let Err(e) = std::fs::remove_file(f)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(file = %f.display(), error = %e, "cannot remove a merged overlay store");
            }
        }
    }

    /// The clusters of the record not recorded merged, ascending.
    pub fn unrecorded(&self) -> Vec<u64> {
        let m = self.marks.lock();
        self.todo
            .iter()
            .enumerate()
            .filter(|(i, _)| !bit(&m.durable, *i))
            .map(|(_, &c)| c)
            .collect()
    }
}
