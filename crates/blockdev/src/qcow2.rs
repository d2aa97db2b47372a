//! qcow2 images through the `imago` crate (its synchronous build), run on the [`IoPool`].
//!
//! This module owns everything qcow2: opening an image with its backing chain, creating images,
//! and mapping the [`BlockDev`] operations onto imago's format layer.
//!
//! ```text
//!   BlockDev call (async)                    IoPool thread (blocking)
//!   ---------------------                    ------------------------------------------------
//!   read / write / flush                 ->  RwLock::read  -> imago FormatAccess (&self)
//!   write_zeroes                         ->  RwLock::read  -> walk mappings, write_zeroes on
//!                                                             runs that may not read as zero
//!   block_status                         ->  RwLock::read  -> walk get_shallow_mapping
//!   discard / make_empty /               ->  RwLock::write -> walk mappings, then
//!   write_zeroes(may_unmap)                                   discard_to_backing / _to_zero (&mut)
//!                                                             on allocated / non-zero runs
//!
//!   FormatAccess<File>  --backing (read-only, as recorded in the header or overridden)-->
//!       raw or qcow2 FormatAccess --> ... (imago opens the whole chain)
//! ```
//!
//! Why the lock: imago's I/O methods take `&self` and lock internally, so reads and writes run
//! concurrently. Its discard operations may invalidate mappings that concurrent requests hold;
//! imago offers them safely only on `&mut FormatAccess` (the `&self` variants are `unsafe`,
//! which this crate forbids). So discards take the write side of our lock and wait for in-flight
//! I/O, everything else shares the read side.
//!
//! What imago gives and what it does not (0.2.6, `sync` feature):
//! - Reads resolve the backing chain, compressed clusters included; writes do copy-on-write of
//!   partial clusters from the backing image.
//! - Zero clusters (qcow2 v3 only): whole clusters become zero without writing data. v2 images
//!   have none, so zeroes are written as data there.
//! - `discard_to_backing` works on whole clusters only (the last, partial cluster of the image
//!   counts as whole) and frees their host clusters in the refcounts, but does not punch holes in
//!   the image file; freed clusters are reused by later allocations. It also allocates an L2
//!   table for any range it touches, so we only ever hand it ranges that are allocated already.
//! - A backing image must be an imago image over the same storage type; an arbitrary
//!   [`BlockDev`] cannot be a backing image, because implementing imago's `Storage` trait needs
//!   `unsafe fn`s. Backing files are therefore the one recorded in the header, an explicit file
//!   ([`Qcow2Backing::File`]), or none.
//! - No image locking (QEMU takes OFD locks; imago does not), so nothing stops another process
//!   from writing the same image.
//! - Few checks of the header: a refcount table past the end of the file aborts the process on
//!   the first allocating write. [`Qcow2::open`] checks the header and the refcount structures
//!   first (`qcow2/header.rs`); backing images, which imago opens itself and never writes, are
//!   not checked.

mod header;

use std::fs::File as StdFile;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use imago::file::File;
use imago::format::Format;
use imago::qcow2::Qcow2 as ImagoQcow2;
use imago::{
    FormatAccess, FormatCreateBuilder, FormatDriverBuilder, PermissiveImplicitOpenGate,
    ShallowMapping, Storage, StorageCreateOptions, StorageOpenOptions,
};
use parking_lot::RwLock;

use crate::{
    BlockDev, BlockError, DevInfo, ErrorKind, Extent, ExtentList, IoPool, MAX_REQUEST, Op, Result,
    WriteFlags, ZeroFlags, check_range, check_status_range, check_write,
};

/// Default cluster size of new images (QEMU's default too).
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 * 1024;

/// Largest zero buffer written at once when zeroes must be written as data.
const ZERO_CHUNK: u64 = 1 << 20;

/// Format of a backing image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name QEMU records in the header's backing-format extension.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    fn imago(self) -> Format {
        match self {
            ImageFormat::Raw => Format::Raw,
            ImageFormat::Qcow2 => Format::Qcow2,
        }
    }
}

/// Which backing image to use when opening.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Qcow2Backing {
    /// The backing file recorded in the image header, if any (opened read-only, recursively;
    /// a relative name is relative to the image's directory, and a missing format is probed).
    #[default]
    FromHeader,
    /// No backing image: unallocated clusters read as zeroes, whatever the header says.
    None,
    /// This file instead of the recorded one (opened read-only; a qcow2 file brings its own
    /// recorded chain). A relative path is relative to the current directory, as imago opens
    /// it as given.
    File { path: PathBuf, format: ImageFormat },
}

/// How to open a qcow2 image.
#[derive(Debug, Clone, Default)]
pub struct Qcow2Options {
    pub read_only: bool,
    /// Bypass the page cache (O_DIRECT) for the image and its backing files. imago realigns
    /// requests internally, so callers need not align; aligned requests avoid bounce buffers.
    pub direct: bool,
    pub backing: Qcow2Backing,
}

/// How to create a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2CreateOptions {
    /// Power of two from 512 bytes to 2 MiB.
    pub cluster_size: u32,
    /// Backing file and its format, recorded in the header. A relative path is relative to the
    /// new image's directory (QEMU's rule), and the file must exist.
    pub backing: Option<(PathBuf, ImageFormat)>,
}

impl Default for Qcow2CreateOptions {
    fn default() -> Self {
        Qcow2CreateOptions {
            cluster_size: DEFAULT_CLUSTER_SIZE,
            backing: None,
        }
    }
}

/// The open imago image, shared with the I/O threads running its requests.
#[derive(Debug)]
struct Image {
    /// Read side: every `&self` imago call. Write side: discards, which need `&mut`.
    access: RwLock<FormatAccess<File>>,
    path: PathBuf,
}

impl Image {
    fn error(&self, err: io::Error, op: Op, offset: u64) -> BlockError {
        io_error(err, op, offset, &self.path)
    }

    /// Writes imago's cached metadata back, then syncs the image file.
    fn flush(&self, op: Op, offset: u64) -> Result<()> {
        let access = self.access.read();
        access.flush().map_err(|e| self.error(e, op, offset))?;
        access.sync().map_err(|e| self.error(e, op, offset))
    }
}

/// Maps an imago or OS error onto the block layer's kinds, naming the image.
fn io_error(err: io::Error, op: Op, offset: u64, path: &Path) -> BlockError {
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
fn aligned(x: u64, pow2: u64) -> bool {
    x & (pow2 - 1) == 0
}

/// Allocation state of a run of the image's own clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alloc {
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
    fn extent(self, len: u64) -> Extent {
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
fn walk_mappings(
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
fn discard_allocated(image: &Image, offset: u64, end: u64, op: Op) -> Result<u64> {
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
fn zero_range(
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

/// A qcow2 image (with its backing chain) as a [`BlockDev`].
///
/// [`BlockDev::discard`] is discard-to-backing: every whole cluster in the range stops being
/// allocated in this image and reads from the backing image again (zeroes without one). Partial
/// clusters at the edges keep their content. That is what emptying a QEMU-style overlay needs;
/// see also [`Qcow2::make_empty`].
///
/// Dropping a writable image flushes imago's metadata caches; that happens on a blocking thread
/// when a tokio runtime is around. Use [`Qcow2::close`] to see flush errors.
#[derive(Debug)]
pub struct Qcow2 {
    /// `Some` until dropped or closed: `Drop` moves it to a blocking thread, because the last
    /// reference flushes.
    image: Option<Arc<Image>>,
    path: PathBuf,
    info: DevInfo,
    cluster_size: u64,
    /// qcow2 v3: zero clusters exist.
    zero_clusters: bool,
    has_backing: bool,
    pool: IoPool,
}

impl Qcow2 {
    /// Opens an image and its backing chain (backing files read-only).
    ///
    /// Blocking (reads the header, L1 table and the chain's headers): call it at setup or from
    /// a blocking context; [`Qcow2::open_async`] runs it on the pool.
    pub fn open(path: impl AsRef<Path>, opts: Qcow2Options, pool: IoPool) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        // imago trusts the header; a bad one could abort the process on the first write.
        let header = header::check_image(&path)?;
        let open_err = |e: io::Error| io_error(e, Op::Open, 0, &path);

        let mut builder = ImagoQcow2::<File>::builder_path(&path)
            .write(!opts.read_only)
            .storage_open_options(StorageOpenOptions::new().direct(opts.direct));
        builder = match &opts.backing {
            Qcow2Backing::FromHeader => builder,
            Qcow2Backing::None => builder.backing(None),
            Qcow2Backing::File { path, format } => builder.backing_path(path, format.imago()),
        };
        // Permissive: the chain named in the header is opened as recorded. Images come from the
        // operator, not from guests, so that is the intended trust model.
        let qcow2 = builder
            .open(PermissiveImplicitOpenGate::default())
            .map_err(open_err)?;
        let has_backing = match &opts.backing {
            Qcow2Backing::FromHeader => qcow2.implicit_backing_file().is_some(),
            Qcow2Backing::None => false,
            Qcow2Backing::File { .. } => true,
        };
        let access = FormatAccess::new(qcow2);

        let zero_clusters = header.version >= 3;
        let min_block = access.req_align().max(1) as u32;
        let info = DevInfo {
            len: access.size(),
            min_block,
            preferred_block: (header.cluster_size as u32).max(min_block),
            max_request: MAX_REQUEST,
            read_only: opts.read_only,
            can_discard: !opts.read_only,
            fast_zero: !opts.read_only && zero_clusters,
        };
        Ok(Qcow2 {
            image: Some(Arc::new(Image {
                access: RwLock::new(access),
                path: path.clone(),
            })),
            path,
            info,
            cluster_size: header.cluster_size,
            zero_clusters,
            has_backing,
            pool,
        })
    }

    /// [`Qcow2::open`] on the I/O pool, for callers on a tokio worker.
    pub async fn open_async(
        path: impl AsRef<Path>,
        opts: Qcow2Options,
        pool: IoPool,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let runner = pool.clone();
        runner
            .run(Op::Open, 0, move || Qcow2::open(path, opts, pool))
            .await
    }

    /// Creates (or overwrites) a qcow2 v3 image of `len` bytes with 16-bit refcounts, using
    /// imago's creation code, and syncs it to disk.
    ///
    /// `len` must be a multiple of 512: QEMU refuses other sizes. Blocking, like
    /// [`Qcow2::open`]; [`Qcow2::create_async`] runs it on the pool.
    pub fn create(path: impl AsRef<Path>, len: u64, opts: Qcow2CreateOptions) -> Result<()> {
        let path = path.as_ref();
        let create_err = |e: io::Error| io_error(e, Op::Create, 0, path);
        if !aligned(len, 512) {
            return Err(BlockError::new(ErrorKind::InvalidArgument, Op::Create, 0)
                .path(path)
                .context(format!("size {len} is not a multiple of 512")));
        }
        let backing = match &opts.backing {
            None => None,
            Some((backing, format)) => {
                let name = backing.to_str().ok_or_else(|| {
                    BlockError::new(ErrorKind::InvalidArgument, Op::Create, 0).context(format!(
                        "backing file name {} is not UTF-8",
                        backing.display()
                    ))
                })?;
                // The header records the name as given; check now that it resolves, rather
                // than creating an image that cannot be opened.
                let resolved = match path.parent() {
                    Some(dir) if backing.is_relative() => dir.join(backing),
                    _ => backing.clone(),
                };
                std::fs::metadata(&resolved).map_err(|e| {
                    BlockError::from_io(e, Op::Create, 0)
                        .path(&resolved)
                        .context(format!("backing file of {}", path.display()))
                })?;
                Some((name.to_string(), format.name().to_string()))
            }
        };

        let file = File::create_open(StorageCreateOptions::new().filename(path).overwrite(true))
            .map_err(create_err)?;
        let mut builder = ImagoQcow2::<File>::create_builder(file)
            .cluster_size(opts.cluster_size as usize)
            .size(len);
        if let Some((name, format)) = backing {
            builder = builder.backing(name, format);
        }
        builder.create().map_err(create_err)?;
        StdFile::open(path)
            .and_then(|f| f.sync_all())
            .map_err(create_err)
    }

    /// [`Qcow2::create`] on the I/O pool.
    pub async fn create_async(
        path: impl AsRef<Path>,
        len: u64,
        opts: Qcow2CreateOptions,
        pool: &IoPool,
    ) -> Result<()> {
        let path = path.as_ref().to_path_buf();
        pool.run(Op::Create, 0, move || Qcow2::create(path, len, opts))
            .await
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cluster size in bytes (the granularity of allocation, zeroing and discard).
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// Whether a backing image is attached (unallocated clusters read from it).
    pub fn has_backing(&self) -> bool {
        self.has_backing
    }

    /// Discards every cluster allocated in this image, so the whole device reads from the
    /// backing image again (QEMU's `bdrv_make_empty` for an overlay). Returns the bytes that
    /// were allocated.
    ///
    /// Costs one step per L1 entry plus one per allocated run, not per cluster of the disk.
    /// Waits for in-flight requests and holds new ones back while it runs. Emptied L2 tables
    /// stay allocated (imago does not free them) and the file does not shrink; its clusters are
    /// reused. Call [`BlockDev::flush`] if the emptiness must survive a crash.
    pub async fn make_empty(&self) -> Result<u64> {
        if self.info.read_only {
            return Err(BlockError::new(ErrorKind::ReadOnly, Op::Discard, 0));
        }
        let image = self.image();
        let len = self.info.len;
        self.pool
            .run(Op::Discard, 0, move || {
                discard_allocated(&image, 0, len, Op::Discard)
            })
            .await
    }

    /// Flushes and closes the image, reporting errors that a plain drop could only log.
    pub async fn close(mut self) -> Result<()> {
        let Some(image) = self.image.take() else {
            return Ok(());
        };
        let read_only = self.info.read_only;
        self.pool
            .run(Op::Flush, 0, move || {
                if !read_only {
                    image.flush(Op::Flush, 0)?;
                }
                drop(image);
                Ok(())
            })
            .await
    }

    fn image(&self) -> Arc<Image> {
        Arc::clone(
            self.image
                .as_ref()
                .expect("the image is present until the device is dropped"),
        )
    }

    /// Whether write-zeroes of `offset..offset+len` can be done with zero clusters alone.
    fn zeroes_are_fast(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        self.zero_clusters
            && aligned(offset, self.cluster_size)
            && (aligned(end, self.cluster_size) || end == self.info.len)
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        let Some(image) = self.image.take() else {
            return;
        };
        // The last reference flushes imago's caches (blocking I/O): keep that off tokio workers.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || drop(image));
            }
            Err(_) => drop(image),
        }
    }
}

#[async_trait]
impl BlockDev for Qcow2 {
    fn info(&self) -> DevInfo {
        self.info
    }

    /// Unallocated clusters read from the backing chain, zeroes at its bottom.
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(Op::Read, offset, len as u64, self.info.len)?;
        let image = self.image();
        self.pool
            .run(Op::Read, offset, move || {
                let mut buf = BytesMut::zeroed(len);
                image
                    .access
                    .read()
                    .read(&mut buf[..], offset)
                    .map_err(|e| image.error(e, Op::Read, offset))?;
                Ok(buf.freeze())
            })
            .await
    }

    /// Writes to unallocated clusters allocate them here, copying the rest of each partial
    /// cluster from the backing image. FUA flushes metadata and syncs the file afterwards.
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        check_write(&self.info, Op::Write, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let image = self.image();
        self.pool
            .run(Op::Write, offset, move || {
                image
                    .access
                    .read()
                    .write(&data[..], offset)
                    .map_err(|e| image.error(e, Op::Write, offset))?;
                if flags.fua {
                    image.flush(Op::Write, offset)?;
                }
                Ok(())
            })
            .await
    }

    /// Writes imago's cached metadata (L2 tables, refcounts) to the file and syncs it.
    async fn flush(&self) -> Result<()> {
        if self.info.read_only {
            return Ok(());
        }
        let image = self.image();
        self.pool
            .run(Op::Flush, 0, move || image.flush(Op::Flush, 0))
            .await
    }

    /// Whole clusters become zero clusters (v3), which also hide the backing image; partial
    /// clusters get zeroes written as data (after copy-on-write from the backing image). With
    /// `may_unmap` the zeroed clusters' storage is freed, otherwise it stays allocated.
    /// `fast_only` fails with [`ErrorKind::NotSupported`] unless the range is whole clusters of
    /// a v3 image. v2 images write zeroes as data. Parts that read as zeroes already (zero
    /// clusters; unallocated clusters without a backing image) are left untouched.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_write(&self.info, Op::WriteZeroes, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if flags.fast_only && !self.zeroes_are_fast(offset, len) {
            let why = if self.zero_clusters {
                format!("range is not whole {}-byte clusters", self.cluster_size)
            } else {
                "qcow2 v2 images have no zero clusters".to_string()
            };
            return Err(
                BlockError::new(ErrorKind::NotSupported, Op::WriteZeroes, offset)
                    .path(&self.path)
                    .context(why),
            );
        }
        let image = self.image();
        let zero_clusters = self.zero_clusters;
        self.pool
            .run(Op::WriteZeroes, offset, move || {
                zero_range(&image, offset, offset + len, zero_clusters, flags.may_unmap)?;
                if flags.fua {
                    image.flush(Op::WriteZeroes, offset)?;
                }
                Ok(())
            })
            .await
    }

    /// Discard-to-backing: whole clusters in the range read from the backing image again
    /// (zeroes without one); partial clusters at the edges are left alone. Waits for in-flight
    /// requests, because imago's discard may invalidate their mappings.
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_write(&self.info, Op::Discard, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let image = self.image();
        self.pool
            .run(Op::Discard, offset, move || {
                discard_allocated(&image, offset, offset + len, Op::Discard).map(|_| ())
            })
            .await
    }

    /// NBD `base:allocation` for this image alone: clusters allocated here are data, or zero
    /// for zero clusters; unallocated clusters are holes, flagged zero only when there is no
    /// backing image (the backing image is not consulted, unlike qemu-nbd, which reports the
    /// whole chain). Compressed clusters are data.
    async fn block_status(&self, offset: u64, len: u64) -> Result<ExtentList> {
        check_status_range(offset, len, self.info.len)?;
        let image = self.image();
        self.pool
            .run(Op::BlockStatus, offset, move || {
                let mut list = ExtentList::new();
                let access = image.access.read();
                walk_mappings(&access, offset, offset + len, |_, n, alloc| {
                    list.push(alloc.extent(n))
                })
                .map_err(|e| image.error(e, Op::BlockStatus, offset))?;
                Ok(list)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fresh(len: u64, cluster_size: u32) -> (tempfile::TempDir, Qcow2) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.qcow2");
        Qcow2::create(
            &p,
            len,
            Qcow2CreateOptions {
                cluster_size,
                backing: None,
            },
        )
        .unwrap();
        let dev = Qcow2::open(&p, Qcow2Options::default(), IoPool::default()).unwrap();
        (dir, dev)
    }

    #[tokio::test]
    async fn unwritten_image_is_one_zero_hole() {
        let (_d, dev) = fresh(1 << 20, 4096).await;
        assert_eq!(
            dev.block_status(0, 1 << 20).await.unwrap().0,
            vec![Extent::hole(1 << 20)]
        );
        assert_eq!(&dev.read(0, 8192).await.unwrap()[..], &[0u8; 8192][..]);
    }

    #[tokio::test]
    async fn discard_of_partial_clusters_keeps_their_data() {
        let (_d, dev) = fresh(1 << 20, 4096).await;
        dev.write(0, Bytes::from(vec![3u8; 3 * 4096]), WriteFlags::default())
            .await
            .unwrap();
        dev.discard(100, 2 * 4096).await.unwrap();
        let got = dev.read(0, 3 * 4096).await.unwrap();
        assert!(got[..4096].iter().all(|&b| b == 3));
        assert!(got[4096..8192].iter().all(|&b| b == 0));
        assert!(got[8192..].iter().all(|&b| b == 3));
    }

    #[tokio::test]
    async fn make_empty_of_an_unwritten_image_allocates_nothing() {
        let (_d, dev) = fresh(1 << 30, 65536).await;
        assert_eq!(dev.make_empty().await.unwrap(), 0);
        assert_eq!(
            dev.block_status(0, 1 << 30).await.unwrap().0,
            vec![Extent::hole(1 << 30)]
        );
    }

    #[test]
    fn create_refuses_sizes_qemu_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let e = Qcow2::create(
            dir.path().join("x.qcow2"),
            1000,
            Qcow2CreateOptions::default(),
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
    }

    #[test]
    fn open_refuses_a_file_that_is_not_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("raw.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let e = Qcow2::open(&p, Qcow2Options::default(), IoPool::default()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
    }
}
