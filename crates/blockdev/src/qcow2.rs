//! qcow2 images through imago (placeholder until the qcow2 driver lands).

use std::path::Path;

use crate::{BlockError, ErrorKind, IoPool, Op, Result};

/// How to open a qcow2 image.
#[derive(Debug, Clone, Default)]
pub struct Qcow2Options {
    pub read_only: bool,
}

/// A qcow2 image.
#[derive(Debug)]
pub struct Qcow2;

impl Qcow2 {
    pub fn open(path: impl AsRef<Path>, _opts: Qcow2Options, _pool: IoPool) -> Result<Self> {
        Err(BlockError::new(ErrorKind::NotSupported, Op::Open, 0)
            .context(format!("qcow2 not yet supported: {}", path.as_ref().display())))
    }
}
