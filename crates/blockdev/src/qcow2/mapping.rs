//! The image's own cluster mapping, walked under the image lock: block status, discard to the
//! backing image, and zeroing that touches only what may not read as zeroes yet.
//!
//! Every walk asks imago for shallow mappings (this image only, never its backing chain), so a
//! walk costs one step per L1 entry plus one per allocated run, not one per cluster.

use std::io;
use std::path::{Path, PathBuf};

use imago::file::File;
use imago::{FormatAccess, ShallowMapping};
use parking_lot::RwLock;

use crate::{BlockError, ErrorKind, Extent, Op, Result};

/// Largest zero buffer written at once when zeroes must be written as data.
const ZERO_CHUNK: u64 = 1 << 20;

/// The open imago image, shared with the I/O threads running its requests.
#[derive(Debug)]
pub(super) struct Image {
    /// Read side: every `&self` imago call. Write side: discards, which need `&mut`.
    pub(super) access: RwLock<FormatAccess<File>>,
    pub(super) path: PathBuf,
}

impl Image {
    pub(super) fn error(&self, err: io::Error, op: Op, offset: u64) -> BlockError {
        io_error(err, op, offset, &self.path)
    }

    /// Writes imago's cached metadata back, then syncs the image file.
    pub(super) fn flush(&self, op: Op, offset: u64) -> Result<()> {
        let access = self.access.read();
        access.flush().map_err(|e| self.error(e, op, offset))?;
        access.sync().map_err(|e| self.error(e, op, offset))
    }
}

/// Maps an imago or OS error onto the block layer's kinds, naming the image.
pub(super) fn io_error(err: io::Error, op: Op, offset: u64, path: &Path) -> BlockError {
    if err.raw_os_error().is_some() {
        return BlockError::from_io(err, op, offset).path(path);
    }
    let kind = match err.kind() {
        io::ErrorKind::Unsupported => ErrorKind::NotSupported,
        io::ErrorKind::UnexpectedEof => ErrorKind::OutOfRange,
        io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
        io::ErrorKind::StorageFull => ErrorKind::NoSpace,
        _ => ErrorKind::Io(None),
    };
    BlockError::new(kind, op, offset).path(path).with_io(err)
}

/// Whether `x` is a multiple of `pow2`, a power of two.
pub(super) fn aligned(x: u64, pow2: u64) -> bool {
    x & (pow2 - 1) == 0
}

/// Allocation state of a run of the image's own clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Alloc {
    /// Data stored in this image (compressed included).
    Data,
    /// A zero cluster of this image: reads as zeroes, hides the backing image.
    Zero,
    /// Not allocated here; reads come from the backing image.
    Backing,
    /// Not allocated here, no backing image: reads as zeroes.
    Unallocated,
}

impl Alloc {
    fn allocated(self) -> bool {
        matches!(self, Alloc::Data | Alloc::Zero)
    }

    /// NBD `base:allocation`: allocated here => data or zero; otherwise a hole, known to read
    /// as zeroes only at the bottom of a chain (we do not look into the backing image).
    pub(super) fn extent(self, len: u64) -> Extent {
        match self {
            Alloc::Data => Extent::data(len),
            Alloc::Zero => Extent::zero(len),
            Alloc::Backing => Extent {
                len,
                hole: true,
                zero: false,
            },
            Alloc::Unallocated => Extent::hole(len),
        }
    }
}

/// Walks this image's own mapping over `offset..end`, calling `f` for every run.
///
/// imago reports an unallocated L2 table as one run, so the walk costs one step per L1 entry
/// plus one per run inside allocated L2 tables: proportional to allocation, not disk size.
pub(super) fn walk_mappings(
    access: &FormatAccess<File>,
    offset: u64,
    end: u64,
    mut f: impl FnMut(u64, u64, Alloc),
) -> io::Result<()> {
    let mut pos = offset;
    while pos < end {
        let (mapping, len) = access.get_shallow_mapping(pos, end - pos)?;
        let alloc = match mapping {
            ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => Alloc::Data,
            ShallowMapping::Zero { explicit: true, .. } => Alloc::Zero,
            ShallowMapping::Zero {
                explicit: false, ..
            } => Alloc::Unallocated,
            ShallowMapping::Indirect { .. } => Alloc::Backing,
            ShallowMapping::Eof { .. } => break,
            // A mapping kind newer than this code: calling it data is never wrong.
            _ => Alloc::Data,
        };
        if len == 0 {
            break;
        }
        let len = len.min(end - pos);
        f(pos, len, alloc);
        pos += len;
    }
    Ok(())
}

/// The runs of `offset..end` whose state satisfies `keep`, neighbours merged.
fn ranges_where(
    access: &FormatAccess<File>,
    offset: u64,
    end: u64,
    keep: impl Fn(Alloc) -> bool,
) -> io::Result<Vec<(u64, u64)>> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    walk_mappings(access, offset, end, |pos, len, alloc| {
        if !keep(alloc) {
            return;
        }
        match ranges.last_mut() {
            Some((start, run)) if *start + *run == pos => *run += len,
            _ => ranges.push((pos, len)),
        }
    })?;
    Ok(ranges)
}

/// Runs that may not read as zeroes: data here, or unallocated over a backing image. Zero
/// clusters, and unallocated clusters at the bottom of a chain, read as zeroes already, so
/// zeroing a fresh image (as `qemu-img convert` and nbdcopy do first) costs a walk of the L1
/// table instead of an L2 table for every 512 MiB.
fn maybe_nonzero(alloc: Alloc) -> bool {
    matches!(alloc, Alloc::Data | Alloc::Backing)
}

/// Discards the allocated clusters of `offset..end` so they read from the backing image again.
/// Returns the bytes of allocated ranges handed to imago.
///
/// Only allocated ranges are passed on, because imago's discard allocates an L2 table for any
/// range it is given, which would grow an overlay while emptying it.
pub(super) fn discard_allocated(image: &Image, offset: u64, end: u64, op: Op) -> Result<u64> {
    let mut access = image.access.write();
    let ranges = ranges_where(&access, offset, end, Alloc::allocated)
        .map_err(|e| image.error(e, op, offset))?;
    let mut total = 0;
    for (start, len) in ranges {
        access
            .discard_to_backing(start, len)
            .map_err(|e| image.error(e, op, start))?;
        total += len;
    }
    Ok(total)
}

/// Makes `offset..end` read as zeroes, touching only the runs that may not yet.
///
/// v3 images get zero clusters for whole clusters (imago writes zeroes into partial ones);
/// with `unmap` the zeroed clusters' storage is freed, which needs exclusive access. v2 images
/// have no zero clusters, so zeroes are written as data.
pub(super) fn zero_range(
    image: &Image,
    offset: u64,
    end: u64,
    zero_clusters: bool,
    unmap: bool,
) -> Result<()> {
    let err = |e, at| image.error(e, Op::WriteZeroes, at);
    if zero_clusters && unmap {
        let mut access = image.access.write();
        let ranges =
            ranges_where(&access, offset, end, maybe_nonzero).map_err(|e| err(e, offset))?;
        for (start, len) in ranges {
            access
                .discard_to_zero(start, len)
                .map_err(|e| err(e, start))?;
        }
        return Ok(());
    }
    let access = image.access.read();
    let ranges = ranges_where(&access, offset, end, maybe_nonzero).map_err(|e| err(e, offset))?;
    for (start, len) in ranges {
        if zero_clusters {
            access.write_zeroes(start, len).map_err(|e| err(e, start))?;
        } else {
            write_zero_data(&access, start, len).map_err(|(e, at)| err(e, at))?;
        }
    }
    Ok(())
}

/// Writes `len` zero bytes as data; on failure returns the error and where it happened.
fn write_zero_data(
    access: &FormatAccess<File>,
    offset: u64,
    len: u64,
) -> Result<(), (io::Error, u64)> {
    let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK) as usize;
        access
            .write(&zeroes[..n], offset + done)
            .map_err(|e| (e, offset + done))?;
        done += n as u64;
    }
    Ok(())
}
