//! Making new qcow2 images with imago's creation code.

use std::fs::File as StdFile;
use std::io;
use std::path::Path;

use imago::file::File;
use imago::qcow2::Qcow2 as ImagoQcow2;
use imago::{FormatCreateBuilder, Storage, StorageCreateOptions};

use super::mapping::{aligned, io_error};
use super::{Qcow2, Qcow2CreateOptions};
use crate::{BlockError, ErrorKind, IoPool, Op, Result};

impl Qcow2 {
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
}
