//! The primary's write log: which extents may differ from the secondary, on disk before the
//! VM's write reaches the local disk, so a primary killed at any moment knows after restart
//! every range its secondary may lack.
//!
//! ```text
//!   VM write --record(range)--> extent already logged? --yes--> go on (no I/O)
//!                                   | no
//!                                   v
//!                  one flush for every writer waiting (group commit):
//!                  the whole extent set --> slot A or B (alternating) --fdatasync--> go on
//!   checkpoint done --> extents last written before the checkpoint began, with no write in
//!                       progress, are cleared (written with the next flush)
//! ```
//!
//! DRBD's activity log keeps the hot extents in a ring of transactions; here the whole set is
//! one small bitmap (a bit per 4 MiB: 32 KiB for a 1 TiB disk) written in one of two slots,
//! each with a sequence number and a digest, so a flush torn by a crash leaves the other slot,
//! which holds every extent whose write could have started. COLO adds what DRBD lacks: a
//! checkpoint is a moment when both disks are known equal, so the set shrinks at every
//! checkpoint instead of growing until a resync.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::StateError;

/// Bytes per extent: a write to an extent not yet logged costs one flush.
pub const EXTENT: u64 = 4 << 20;

/// Checkpoints an extent stays logged after its last write. A VM's working set is written
/// again and again: trimming it at every checkpoint would cost a flush per hot extent per
/// checkpoint (DRBD keeps its hot extents in the activity log for the same reason); an extent
/// left logged only adds its 4 MiB to the resync after a crash.
pub const HOT_CHECKPOINTS: u32 = 8;

const MAGIC: &[u8; 8] = b"CBLKLOG\0";
const VERSION: u32 = 1;
/// magic, version, extent shift, disk length, sequence, bitmap bytes.
const HEAD: usize = 8 + 4 + 4 + 8 + 8 + 8;
const DIGEST: usize = 16;

/// The extent set of one disk, on disk in `dir/log`.
pub struct ExtentLog {
    path: PathBuf,
    file: Arc<File>,
    disk_len: u64,
    slot_len: u64,
    inner: Mutex<Inner>,
    /// One flush at a time; writers that arrive meanwhile are carried by the next one.
    flushing: tokio::sync::Mutex<()>,
}

struct Inner {
    /// Extents logged on disk (or about to be cleared there by the next flush).
    durable: Vec<u64>,
    /// Extents writers wait to have logged.
    wanted: Vec<u64>,
    /// Per extent, the checkpoint epoch of its last write (begun or finished).
    epochs: Vec<u32>,
    /// Per extent, writes recorded and not yet finished.
    in_progress: Vec<u32>,
    epoch: u32,
    seq: u64,
    /// A cleared extent is not on disk yet.
    stale: bool,
}

fn bit(v: &[u64], i: usize) -> bool {
    v[i / 64] & (1 << (i % 64)) != 0
}

fn set(v: &mut [u64], i: usize, on: bool) {
    if on {
        v[i / 64] |= 1 << (i % 64);
    } else {
        v[i / 64] &= !(1 << (i % 64));
    }
}

/// A write's claim on its extents: while it lives they are not cleared; when it ends they
/// count as written in the epoch it ends in.
pub struct Recorded {
    log: Arc<ExtentLog>,
    first: usize,
    last: usize,
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let mut g = self.log.inner.lock();
        let epoch = g.epoch;
        for e in self.first..=self.last {
            g.in_progress[e] -= 1;
            g.epochs[e] = epoch;
        }
    }
}

impl ExtentLog {
    /// Opens (or creates) the log of a `disk_len`-byte disk in `dir`. A log whose two slots
    /// are both unreadable is refused, never guessed around.
    pub fn open(dir: &Path, disk_len: u64) -> Result<Arc<Self>, StateError> {
        let path = dir.join("log");
        let extents = disk_len.div_ceil(EXTENT) as usize;
        let words = extents.div_ceil(64);
        let slot_len = ((HEAD + words * 8 + DIGEST) as u64).next_multiple_of(4096);
        let io = |e: io::Error, what: &str| StateError::io(&path, what, e);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io(e, "opening"))?;
        let len = file.metadata().map_err(|e| io(e, "reading"))?.len();
        let mut best: Option<(u64, Vec<u64>)> = None;
        let mut why = Vec::new();
        for slot in 0..2u64 {
            let mut buf = vec![0u8; slot_len as usize];
            if len < (slot + 1) * slot_len {
                why.push(format!("slot {slot} is missing"));
                continue;
            }
            file.read_exact_at(&mut buf, slot * slot_len)
                .map_err(|e| io(e, "reading"))?;
            match parse_slot(&buf, disk_len, words) {
                Ok((seq, bits)) => {
                    if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                        best = Some((seq, bits));
                    }
                }
                Err(e) => why.push(format!("slot {slot}: {e}")),
            }
        }
        let (seq, durable) = match best {
            Some(b) => b,
            None if !existed || len == 0 => (0, vec![0; words]),
            None => {
                return Err(StateError::Corrupt {
                    path,
                    why: format!(
                        "neither copy of the write log is readable ({}); the ranges the \
                         secondary may lack are unknown: remove the state directory to start \
                         over with a full comparison",
                        why.join("; ")
                    ),
                });
            }
        };
        let log = Arc::new(ExtentLog {
            path,
            file: Arc::new(file),
            disk_len,
            slot_len,
            inner: Mutex::new(Inner {
                durable,
                wanted: vec![0; words],
                epochs: vec![0; extents],
                in_progress: vec![0; extents],
                epoch: 1,
                seq,
                stale: false,
            }),
            flushing: tokio::sync::Mutex::new(()),
        });
        Ok(log)
    }

    /// The ranges logged: every range written since the last checkpoint the log saw complete
    /// (whole extents, the last one cut at the disk's end).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let g = self.inner.lock();
        let extents = self.disk_len.div_ceil(EXTENT) as usize;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for e in (0..extents).filter(|&e| bit(&g.durable, e)) {
            let (o, end) = (
                e as u64 * EXTENT,
                ((e as u64 + 1) * EXTENT).min(self.disk_len),
            );
            match out.last_mut() {
                Some((lo, ll)) if *lo + *ll == o => *ll += end - o,
                _ => out.push((o, end - o)),
            }
        }
        out
    }

    /// Logs `offset..offset+len` before the write it covers starts; returns when that is on
    /// disk. Keep the returned claim until the write has been handed to the secondary.
    pub async fn record(self: &Arc<Self>, offset: u64, len: u64) -> Result<Recorded, StateError> {
        let first = (offset / EXTENT) as usize;
        let last =
            ((offset + len.max(1) - 1).min(self.disk_len.saturating_sub(1)) / EXTENT) as usize;
        let mut need = false;
        {
            let mut g = self.inner.lock();
            let epoch = g.epoch;
            for e in first..=last {
                g.in_progress[e] += 1;
                g.epochs[e] = epoch;
                if !bit(&g.durable, e) {
                    set(&mut g.wanted, e, true);
                    need = true;
                }
            }
        }
        let claim = Recorded {
            log: self.clone(),
            first,
            last,
        };
        while need {
            let _one = self.flushing.lock().await;
            need = {
                let g = self.inner.lock();
                (first..=last).any(|e| !bit(&g.durable, e))
            };
            if need {
                self.flush_locked().await?;
            }
        }
        Ok(claim)
    }

    /// A checkpoint begins: writes from now on belong to the next epoch. Returns the mark to
    /// give [`checkpoint_done`](Self::checkpoint_done).
    pub fn checkpoint_begin(&self) -> u32 {
        let mut g = self.inner.lock();
        g.epoch += 1;
        g.epoch
    }

    /// The checkpoint that began at `mark` succeeded (both disks equal as of its drain): the
    /// extents last written more than [`HOT_CHECKPOINTS`] checkpoints before it began, with no
    /// write in progress, are cleared on disk.
    pub async fn checkpoint_done(&self, mark: u32) -> Result<(), StateError> {
        let before = mark.saturating_sub(HOT_CHECKPOINTS - 1);
        {
            let mut g = self.inner.lock();
            let extents = g.epochs.len();
            for e in 0..extents {
                if g.epochs[e] < before && g.in_progress[e] == 0 && bit(&g.durable, e) {
                    set(&mut g.durable, e, false);
                    g.stale = true;
                }
            }
            if !g.stale {
                return Ok(());
            }
        }
        let _one = self.flushing.lock().await;
        if self.inner.lock().stale {
            self.flush_locked().await?;
        }
        Ok(())
    }

    /// Writes the set (durable and wanted) to the older slot and syncs it. The caller holds
    /// `flushing`.
    async fn flush_locked(&self) -> Result<(), StateError> {
        let (seq, bits) = {
            let mut g = self.inner.lock();
            let bits: Vec<u64> = g
                .durable
                .iter()
                .zip(&g.wanted)
                .map(|(d, w)| d | w)
                .collect();
            g.stale = false;
            (g.seq + 1, bits)
        };
        let slot = encode_slot(seq, self.disk_len, &bits, self.slot_len);
        let (file, at) = (self.file.clone(), (seq % 2) * self.slot_len);
        let r = tokio::task::spawn_blocking(move || {
            file.write_all_at(&slot, at)?;
            file.sync_data()
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        r.map_err(|e| StateError::io(&self.path, "writing", e))?;
        let mut g = self.inner.lock();
        g.seq = seq;
        for (i, w) in bits.iter().enumerate() {
            // What this flush wrote is durable; what was wanted meanwhile waits for the next.
            g.durable[i] |= w;
            g.wanted[i] &= !w;
        }
        Ok(())
    }
}

fn encode_slot(seq: u64, disk_len: u64, bits: &[u64], slot_len: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(slot_len as usize);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&EXTENT.trailing_zeros().to_le_bytes());
    b.extend_from_slice(&disk_len.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(bits.len() as u64 * 8).to_le_bytes());
    for w in bits {
        b.extend_from_slice(&w.to_le_bytes());
    }
    let digest = blake3::hash(&b);
    b.extend_from_slice(&digest.as_bytes()[..DIGEST]);
    b.resize(slot_len as usize, 0);
    b
}

fn parse_slot(b: &[u8], disk_len: u64, words: usize) -> Result<(u64, Vec<u64>), String> {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    if &b[..8] != MAGIC {
        return Err("not written".into());
    }
    if u32_at(8) != VERSION {
        return Err(format!(
            "format version {} (this build reads {VERSION})",
            u32_at(8)
        ));
    }
    if u32_at(12) != EXTENT.trailing_zeros() || u64_at(16) != disk_len {
        return Err(format!(
            "written for a {}-byte disk in {}-byte extents, not this {disk_len}-byte disk",
            u64_at(16),
            1u64 << u32_at(12).min(63)
        ));
    }
    let seq = u64_at(24);
    let n = u64_at(32) as usize;
    if n != words * 8 || HEAD + n + DIGEST > b.len() {
        return Err("bitmap length does not match the disk".into());
    }
    let digest = blake3::hash(&b[..HEAD + n]);
    if b[HEAD + n..HEAD + n + DIGEST] != digest.as_bytes()[..DIGEST] {
        return Err("digest does not match (torn write)".into());
    }
    let bits = (0..words).map(|i| u64_at(HEAD + i * 8)).collect();
    Ok((seq, bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[tokio::test]
    async fn recorded_extents_survive_a_reopen_and_a_checkpoint_clears_only_finished_ones() {
        let d = tempfile::tempdir().unwrap();
        let len = 40 * M + 5; // the last extent is short
        let log = ExtentLog::open(d.path(), len).unwrap();
        assert_eq!(log.ranges(), vec![]);
        drop(log.record(M, 10).await.unwrap()); // extent 0
        drop(log.record(4 * M - 1, 2).await.unwrap()); // extents 0 and 1
        drop(log.record(len - 1, 1).await.unwrap()); // the short last extent
        let busy = log.record(20 * M, 4 * M).await.unwrap(); // extent 5, still writing
        let reopened = ExtentLog::open(d.path(), len).unwrap();
        assert_eq!(
            reopened.ranges(),
            vec![(0, 8 * M), (20 * M, 4 * M), (40 * M, 5)]
        );
        // Hot extents stay logged for HOT_CHECKPOINTS checkpoints after their last write.
        for _ in 0..HOT_CHECKPOINTS - 1 {
            let mark = log.checkpoint_begin();
            log.checkpoint_done(mark).await.unwrap();
        }
        assert_eq!(
            log.ranges(),
            vec![(0, 8 * M), (20 * M, 4 * M), (40 * M, 5)],
            "still hot"
        );
        let mark = log.checkpoint_begin();
        drop(log.record(M, 1).await.unwrap()); // extent 0 again, in the new epoch
        log.checkpoint_done(mark).await.unwrap();
        assert_eq!(log.ranges(), vec![(0, 4 * M), (20 * M, 4 * M)]);
        drop(busy); // finished after the checkpoint began: counts from then
        let reopened = ExtentLog::open(d.path(), len).unwrap();
        assert_eq!(reopened.ranges(), vec![(0, 4 * M), (20 * M, 4 * M)]);
        for _ in 0..HOT_CHECKPOINTS {
            let mark = log.checkpoint_begin();
            log.checkpoint_done(mark).await.unwrap();
        }
        assert_eq!(ExtentLog::open(d.path(), len).unwrap().ranges(), vec![]);
    }

    // A flush torn by a crash damages one slot: the other still holds every extent whose write
    // could have started. Both damaged, or another disk's log, is refused.
    #[tokio::test]
    async fn a_torn_slot_falls_back_to_the_other_and_two_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let len = 64 * M;
        let log = ExtentLog::open(d.path(), len).unwrap();
        drop(log.record(0, 1).await.unwrap()); // seq 1: slot 1
        drop(log.record(8 * M, 1).await.unwrap()); // seq 2: slot 0
        drop(log);
        let path = d.path().join("log");
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"torn", 60).unwrap(); // inside slot 0's bitmap
        let log = ExtentLog::open(d.path(), len).unwrap();
        assert_eq!(
            log.ranges(),
            vec![(0, 4 * M)],
            "slot 1 (seq 1) is what is left"
        );
        let e = ExtentLog::open(d.path(), 128 * M)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not this 134217728-byte disk"), "{e}");
        f.write_all_at(b"torn", 4096 + 60).unwrap();
        let e = ExtentLog::open(d.path(), len).err().unwrap().to_string();
        assert!(
            e.contains("neither copy") && e.contains("torn write"),
            "{e}"
        );
    }

    // Writers that arrive while a flush runs share the next one: many writers, few flushes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_flushes() {
        let d = tempfile::tempdir().unwrap();
        let log = ExtentLog::open(d.path(), 1024 * M).unwrap();
        let tasks: Vec<_> = (0..64u64)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { drop(log.record(i * 16 * M, 1).await.unwrap()) })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let seq = log.inner.lock().seq;
        assert!((1..64).contains(&seq), "{seq} flushes for 64 writers");
        let want: Vec<_> = (0..64u64).map(|i| (i * 16 * M, 4 * M)).collect();
        assert_eq!(ExtentLog::open(d.path(), 1024 * M).unwrap().ranges(), want);
    }
}
