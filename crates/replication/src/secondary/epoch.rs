//! The checkpoint epoch: copy-before-write, and reading what lies below the active overlay
//! without ever seeing the primary's writes of this epoch.
//!
//! The protocol between the replica path and the top path, per cluster `c`:
//!
//! - a replica write to `c` first makes sure `c` is in the hidden overlay. If it is not, it
//!   locks `c` exclusive, checks again, copies the old content from the secondary disk into the
//!   hidden overlay and records it, then releases `c`, and only then writes the disk;
//! - a top read that needs `c` from below reads the hidden overlay if `c` is there (entries
//!   never change within an epoch, so no lock is needed). Otherwise it locks `c` shared,
//!   checks again, and reads the secondary disk while holding it.
//!
//! So a disk read of `c` under the shared lock has seen `c` absent from the hidden overlay
//! while no copy of `c` could run; any copy (hence any disk write) of `c` waits for it to end.
//! Once `c` is recorded, readers go to the hidden overlay and writers need no lock at all.
//! Concurrent replica writes to one cluster copy it once: the second finds it recorded after
//! taking the lock. Readers never wait for a disk write, only for a copy in progress.

use std::ops::Range;

use blockdev::{BlockError, ErrorKind, Op, Result};
use bytes::Bytes;

use super::Node;
use super::cluster_lock::ClusterLocks;
use super::hidden::Preserved;
use super::piece::{Piece, coalesce, fill_from, push_span, read_pieces, runs};

/// Largest copy done as one disk read and one store write.
const COPY_CHUNK: u64 = 4 << 20;
/// Copies at least this large ask the disk for holes before reading.
const STATUS_MIN: u64 = 1 << 20;

/// Whether `b` is all zero bytes (compared against a zero block: memcmp is vectorised).
fn is_zero(b: &[u8]) -> bool {
    static ZERO: [u8; 4096] = [0; 4096];
    b.chunks(ZERO.len()).all(|c| c == &ZERO[..c.len()])
}

/// Copy-before-write state of the current epoch: the lock table. The set of clusters already
/// copied is the hidden overlay's membership.
#[derive(Debug, Default)]
pub(crate) struct Epoch {
    pub locks: ClusterLocks,
}

impl Node {
    /// Preserves, in the hidden overlay, the current content of every cluster of
    /// `offset..offset+len` not yet preserved in this epoch.
    pub(crate) async fn copy_before_write(&self, offset: u64, len: u64) -> Result<()> {
        let todo: Vec<u64> = self
            .geo
            .clusters(offset, len)
            .filter(|&c| !self.hidden.contains(c))
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let _guard = self.epoch.locks.exclusive(&todo).await;
        let todo: Vec<u64> = todo
            .into_iter()
            .filter(|&c| !self.hidden.contains(c))
            .collect();
        for run in runs(&todo, COPY_CHUNK / self.geo.cluster) {
            self.copy_run(run).await?;
        }
        Ok(())
    }

    /// Copies consecutive clusters; zero clusters are recorded without copying.
    ///
    /// Zero clusters are found in the data read anyway; only runs of at least
    /// [`STATUS_MIN`] ask the disk for holes first, so that the holes of a sparse disk are not
    /// even read (block status is not free: on tmpfs it walks pages).
    async fn copy_run(&self, run: Range<u64>) -> Result<()> {
        let g = self.geo;
        let n = (run.end - run.start) as usize;
        let bytes = g.start(run.end - 1) + g.cluster_len(run.end - 1) - g.start(run.start);
        let hole = if bytes >= STATUS_MIN {
            self.zero_clusters(&run).await
        } else {
            vec![false; n]
        };
        let mut i = run.start;
        while i < run.end {
            if hole[(i - run.start) as usize] {
                self.hidden.insert(i, Preserved::Zero);
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < run.end && !hole[(j - run.start) as usize] {
                j += 1;
            }
            let (s, e) = (g.start(i), g.start(j - 1) + g.cluster_len(j - 1));
            let data = self.disk.read(s, (e - s) as usize).await?;
            if data.len() as u64 != e - s {
                return Err(
                    BlockError::new(ErrorKind::Io(None), Op::Read, s).context(format!(
                        "short read: {} bytes instead of {}",
                        data.len(),
                        e - s
                    )),
                );
            }
            self.preserve(i..j, data).await?;
            i = j;
        }
        Ok(())
    }

    /// Stores the old content `data` of clusters `run`: all-zero clusters as zero, runs of the
    /// others in consecutive slots with one store write each.
    async fn preserve(&self, run: Range<u64>, data: Bytes) -> Result<()> {
        let g = self.geo;
        let base = g.start(run.start);
        let bytes_of =
            |c: u64| (g.start(c) - base) as usize..(g.start(c) - base + g.cluster_len(c)) as usize;
        let zero = |c: u64| is_zero(&data[bytes_of(c)]);
        let mut i = run.start;
        while i < run.end {
            if zero(i) {
                self.hidden.insert(i, Preserved::Zero);
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < run.end && !zero(j) {
                j += 1;
            }
            let slot = self.hidden.store.place(i, j - i)?;
            let part = data.slice(bytes_of(i).start..bytes_of(j - 1).end);
            self.hidden.store.write(slot * g.cluster, part).await?;
            for k in 0..j - i {
                let slot = u32::try_from(slot + k).map_err(|_| {
                    BlockError::new(ErrorKind::NoSpace, Op::Write, g.start(i + k))
                        .context("hidden overlay out of slots")
                })?;
                self.hidden.insert(i + k, Preserved::Data(slot));
            }
            i = j;
        }
        Ok(())
    }

    /// Which clusters of `run` read as zero on the secondary disk. A device that cannot tell
    /// is treated as all data (block status is only an optimisation here).
    async fn zero_clusters(&self, run: &Range<u64>) -> Vec<bool> {
        let g = self.geo;
        let n = (run.end - run.start) as usize;
        let (s, e) = (
            g.start(run.start),
            g.start(run.end - 1) + g.cluster_len(run.end - 1),
        );
        let Ok(list) = self.disk.block_status(s, e - s).await else {
            return vec![false; n];
        };
        let mut zero = vec![true; n];
        let mut pos = s;
        for ext in list.iter() {
            let end = (pos + ext.len).min(e);
            if !ext.zero && end > pos {
                for c in g.clusters(pos, end - pos) {
                    zero[(c - run.start) as usize] = false;
                }
            }
            pos = end;
        }
        if pos < e {
            for c in g.clusters(pos, e - pos) {
                zero[(c - run.start) as usize] = false;
            }
        }
        zero
    }

    /// Fills `out` (which stands for disk bytes `base..base+out.len()`) at `spans` with the
    /// view below the active overlay: hidden overlay, else secondary disk. With `cbw`,
    /// follows the epoch protocol against concurrent copies (needed while replica writes can
    /// run, i.e. in RUNNING).
    pub(crate) async fn read_below(
        &self,
        spans: &[Range<u64>],
        out: &mut [u8],
        base: u64,
        cbw: bool,
    ) -> Result<()> {
        let g = self.geo;
        let mut hidden = Vec::new();
        let mut disk: Vec<(u64, Range<u64>)> = Vec::new();
        for s in spans {
            for c in g.clusters(s.start, s.end - s.start) {
                let w = g.within(c, s.start, s.end - s.start);
                let r = g.start(c) + w.start..g.start(c) + w.end;
                match self.hidden.get(c) {
                    Some(p) => self.plan_hidden(&mut hidden, out, base, c, p, r),
                    None => disk.push((c, r)),
                }
            }
        }
        let _guard = if cbw && !disk.is_empty() {
            let mut cl: Vec<u64> = disk.iter().map(|(c, _)| *c).collect();
            cl.dedup();
            let guard = self.epoch.locks.shared(&cl).await;
            // A copy may have finished while we waited: such clusters now read from hidden.
            disk.retain(|(c, r)| match self.hidden.get(*c) {
                Some(p) => {
                    self.plan_hidden(&mut hidden, out, base, *c, p, r.clone());
                    false
                }
                None => true,
            });
            Some(guard)
        } else {
            None
        };
        let mut ranges = Vec::new();
        for (_, r) in disk {
            push_span(&mut ranges, r);
        }
        for r in ranges {
            let want = (r.end - r.start) as usize;
            let data = self.disk.read(r.start, want).await?;
            fill_from(out, (r.start - base) as usize, &data, want, r.start)?;
        }
        hidden.sort_by_key(|p: &Piece| p.at);
        read_pieces(&*self.hidden.store, &coalesce(hidden), out).await
    }

    /// Plans the read of disk range `r` (inside cluster `c`) from the hidden overlay.
    fn plan_hidden(
        &self,
        pieces: &mut Vec<Piece>,
        out: &mut [u8],
        base: u64,
        c: u64,
        p: Preserved,
        r: Range<u64>,
    ) {
        let at = (r.start - base) as usize;
        let len = (r.end - r.start) as usize;
        match p {
            Preserved::Zero => out[at..at + len].fill(0),
            Preserved::Data(slot) => pieces.push(Piece {
                pos: u64::from(slot) * self.geo.cluster + (r.start - self.geo.start(c)),
                at,
                len,
            }),
        }
    }
}
