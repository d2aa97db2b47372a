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
//!
//! Here: the options, [`Qcow2`] and its [`BlockDev`] operations. Beside it: `header.rs` (the
//! checks before imago sees an image), `mapping.rs` (walks of the image's own clusters: block
//! status, discard, zeroing) and `create.rs` (new images).

mod create;
mod header;
mod mapping;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use imago::file::File;
use imago::format::Format;
use imago::qcow2::Qcow2 as ImagoQcow2;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate, StorageOpenOptions};
use parking_lot::RwLock;

use crate::{
    BlockDev, BlockError, DevInfo, ErrorKind, ExtentList, ImageFormat, IoPool, MAX_REQUEST, Op,
    Result, WriteFlags, ZeroFlags, check_range, check_status_range, check_write,
};
use mapping::{Image, aligned, discard_allocated, io_error, walk_mappings, zero_range};

/// Default cluster size of new images (QEMU's default too).
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 * 1024;

/// imago's name for a format, to open a backing image of it.
fn imago_format(format: ImageFormat) -> Format {
    match format {
        ImageFormat::Raw => Format::Raw,
        ImageFormat::Qcow2 => Format::Qcow2,
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
    File {
        /// The backing file.
        path: PathBuf,
        /// Its format (not probed: a probed raw file could claim to be anything).
        format: ImageFormat,
    },
}

/// How to open a qcow2 image.
#[derive(Debug, Clone, Default)]
pub struct Qcow2Options {
    /// Refuse writes; the image file is opened read-only.
    pub read_only: bool,
    /// Bypass the page cache (O_DIRECT) for the image and its backing files. imago realigns
    /// requests internally, so callers need not align; aligned requests avoid bounce buffers.
    pub direct: bool,
    /// Where unallocated clusters read from.
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
            Qcow2Backing::File { path, format } => {
                builder.backing_path(path, imago_format(*format))
            }
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
    use crate::Extent;

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
