//! Opening an image file by its format: the one place that picks a driver, so that callers (the
//! daemons, a VMM embedding the engine) name a format and get a [`BlockDev`] without knowing
//! each driver's own options.

use std::path::Path;
use std::sync::Arc;

use crate::{
    BlockDev, BlockError, ErrorKind, IoPool, Op, Qcow2, Qcow2Backing, Qcow2Options, RawFile,
    RawOptions, Result,
};

/// The format of an image file, as the operator names it and as a qcow2 header records a
/// backing file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// The bytes of the file are the bytes of the disk.
    Raw,
    /// QEMU's copy-on-write format, with an optional backing image.
    Qcow2,
}

impl ImageFormat {
    /// The name QEMU uses for the format (`format=` on its command line, the backing-format
    /// extension of a qcow2 header).
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// The format QEMU calls `name`, if we open it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

/// How [`open`] opens an image: a builder, so that options a driver gains later do not break
/// callers.
///
/// ```no_run
/// # fn main() -> Result<(), blockdev::BlockError> {
/// use blockdev::{ImageFormat, IoPool, OpenOptions};
///
/// let pool = IoPool::default();
/// let disk = blockdev::open(
///     "/vm/disk.qcow2",
///     OpenOptions::new(ImageFormat::Qcow2, pool).read_only(true),
/// )?;
/// # drop(disk);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct OpenOptions {
    format: ImageFormat,
    read_only: bool,
    direct: bool,
    backing: Qcow2Backing,
    pool: IoPool,
}

impl OpenOptions {
    /// Writable, through the page cache, a qcow2 image with the backing chain its header
    /// names; the device runs its blocking calls on `pool` (share one pool between devices, so
    /// that their threads stay bounded together).
    pub fn new(format: ImageFormat, pool: IoPool) -> Self {
        OpenOptions {
            format,
            read_only: false,
            direct: false,
            backing: Qcow2Backing::FromHeader,
            pool,
        }
    }

    /// Refuse writes (and open the file read-only, so that a read-only file can be served).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Bypass the page cache (O_DIRECT). A raw image then needs 4 KiB aligned requests; qcow2
    /// realigns internally.
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// Which backing image a qcow2 image reads unallocated clusters from. A raw image has no
    /// backing image: [`Qcow2Backing::File`] is refused for one, the other choices change
    /// nothing.
    pub fn backing(mut self, backing: Qcow2Backing) -> Self {
        self.backing = backing;
        self
    }
}

/// Opens the image at `path` with the driver of its format.
///
/// Blocking (it opens files and reads a qcow2 image's metadata): call it at setup or from a
/// blocking context. Errors name the file and keep the OS error as their source.
pub fn open(path: impl AsRef<Path>, options: OpenOptions) -> Result<Arc<dyn BlockDev>> {
    let path = path.as_ref();
    let OpenOptions {
        format,
        read_only,
        direct,
        backing,
        pool,
    } = options;
    Ok(match format {
        ImageFormat::Raw => {
            if matches!(backing, Qcow2Backing::File { .. }) {
                return Err(BlockError::new(ErrorKind::InvalidArgument, Op::Open, 0)
                    .path(path)
                    .context("a raw image has no backing file"));
            }
            let opts = RawOptions { read_only, direct };
            Arc::new(RawFile::open(path, opts, pool)?)
        }
        ImageFormat::Qcow2 => {
            let opts = Qcow2Options {
                read_only,
                direct,
                backing,
            };
            Arc::new(Qcow2::open(path, opts, pool)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Qcow2CreateOptions, WriteFlags};
    use bytes::Bytes;

    #[test]
    fn format_names_round_trip() {
        for format in [ImageFormat::Raw, ImageFormat::Qcow2] {
            assert_eq!(ImageFormat::from_name(format.name()), Some(format));
        }
        assert_eq!(ImageFormat::from_name("vmdk"), None);
    }

    #[tokio::test]
    async fn opens_each_format_with_its_driver() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("d.raw");
        let qcow2 = dir.path().join("d.qcow2");
        RawFile::create(&raw, 1 << 20).unwrap();
        Qcow2::create(&qcow2, 1 << 20, Qcow2CreateOptions::default()).unwrap();
        let pool = IoPool::default();

        for (path, format) in [(&raw, ImageFormat::Raw), (&qcow2, ImageFormat::Qcow2)] {
            let dev = open(path, OpenOptions::new(format, pool.clone())).unwrap();
            dev.write(0, Bytes::from_static(b"abc"), WriteFlags::default())
                .await
                .unwrap();
            assert_eq!(&dev.read(0, 3).await.unwrap()[..], b"abc");
        }
        // A raw file is not a qcow2 image, and the error names it.
        let Err(e) = open(&raw, OpenOptions::new(ImageFormat::Qcow2, pool.clone())) else {
            panic!("a raw file opened as qcow2");
        };
        assert_eq!(e.file(), Some(raw.as_path()));
    }

    #[test]
    fn read_only_devices_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("d.raw");
        RawFile::create(&raw, 4096).unwrap();

        let dev = open(
            &raw,
            OpenOptions::new(ImageFormat::Raw, IoPool::default()).read_only(true),
        )
        .unwrap();

        assert!(dev.info().read_only);
    }

    #[test]
    fn a_raw_image_refuses_a_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("d.raw");
        RawFile::create(&raw, 4096).unwrap();
        let backing = Qcow2Backing::File {
            path: raw.clone(),
            format: ImageFormat::Raw,
        };

        let Err(e) = open(
            &raw,
            OpenOptions::new(ImageFormat::Raw, IoPool::default()).backing(backing),
        ) else {
            panic!("a raw image took a backing file");
        };

        assert_eq!(e.kind, ErrorKind::InvalidArgument);
    }
}
