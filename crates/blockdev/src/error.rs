//! One error type for the block layer: a stable kind, the operation, file and offset it
//! concerns, and the OS error underneath when there is one.
//!
//! ```text
//!   BlockError { kind, op, offset, path?, context?, io? }
//!   Display:  "<op>[ <path>][ at offset <n>]: <io error text | kind text>[ (<context>)]"
//!             "open /vm/disk.raw: No such file or directory (os error 2)"
//!             "write /vm/disk.raw at offset 4096: Read-only file system (os error 30)"
//!             "write at offset 0: device is read-only"
//!   source(): the io::Error, so callers can look at it (`raw_os_error`, `kind`).
//! ```

use std::error::Error;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// Result of a block-layer operation.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

/// The operation an error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Opening an image (no offset).
    Open,
    /// [`BlockDev::read`](crate::BlockDev::read).
    Read,
    /// [`BlockDev::write`](crate::BlockDev::write).
    Write,
    /// [`BlockDev::flush`](crate::BlockDev::flush).
    Flush,
    /// [`BlockDev::write_zeroes`](crate::BlockDev::write_zeroes).
    WriteZeroes,
    /// [`BlockDev::discard`](crate::BlockDev::discard).
    Discard,
    /// [`BlockDev::block_status`](crate::BlockDev::block_status).
    BlockStatus,
    /// Creating an image (no offset).
    Create,
}

impl Op {
    /// Whether the offset means something (open and create have none).
    fn has_offset(self) -> bool {
        !matches!(self, Op::Open | Op::Create)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::WriteZeroes => "write-zeroes",
            Op::Discard => "discard",
            Op::BlockStatus => "block-status",
            Op::Create => "create",
        })
    }
}

/// What went wrong, stable enough to map onto NBD and errno values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The range is outside the device.
    OutOfRange,
    /// The device is read-only.
    ReadOnly,
    /// The device cannot do this (or cannot do it fast, for fast-zero requests).
    NotSupported,
    /// No space left.
    NoSpace,
    /// A malformed request (bad length, bad alignment).
    InvalidArgument,
    /// An I/O error from below, with its errno when there is one.
    Io(Option<i32>),
    /// The device is shut down or disconnected.
    Shutdown,
    /// The request took too long.
    TimedOut,
}

impl ErrorKind {
    /// The errno value closest to this kind (what NBD replies carry).
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::OutOfRange => rustix::io::Errno::INVAL.raw_os_error(),
            ErrorKind::ReadOnly => rustix::io::Errno::PERM.raw_os_error(),
            ErrorKind::NotSupported => rustix::io::Errno::NOTSUP.raw_os_error(),
            ErrorKind::NoSpace => rustix::io::Errno::NOSPC.raw_os_error(),
            ErrorKind::InvalidArgument => rustix::io::Errno::INVAL.raw_os_error(),
            ErrorKind::Io(Some(e)) => e,
            ErrorKind::Io(None) => rustix::io::Errno::IO.raw_os_error(),
            ErrorKind::Shutdown => rustix::io::Errno::SHUTDOWN.raw_os_error(),
            ErrorKind::TimedOut => rustix::io::Errno::TIMEDOUT.raw_os_error(),
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::OutOfRange => f.write_str("out of range"),
            ErrorKind::ReadOnly => f.write_str("device is read-only"),
            ErrorKind::NotSupported => f.write_str("not supported"),
            ErrorKind::NoSpace => f.write_str("no space left"),
            ErrorKind::InvalidArgument => f.write_str("invalid argument"),
            // An errno without an io::Error comes from a peer (an NBD reply), not from our OS.
            ErrorKind::Io(Some(e)) => write!(f, "I/O error (errno {e})"),
            ErrorKind::Io(None) => f.write_str("I/O error"),
            ErrorKind::Shutdown => f.write_str("device is shut down"),
            ErrorKind::TimedOut => f.write_str("timed out"),
        }
    }
}

/// A block-layer error with context.
///
/// Cheap to clone: the io::Error underneath is shared, because one failure may be reported to
/// several waiters (every request of a batch, a sticky replication error).
#[derive(Debug, Clone)]
pub struct BlockError {
    /// What went wrong: what callers match on (NBD replies, retry decisions).
    pub kind: ErrorKind,
    /// The operation that failed.
    pub op: Op,
    /// Where in the device it failed (0 for open and create).
    pub offset: u64,
    /// A human-readable detail, shown in parentheses after the cause.
    pub context: Option<String>,
    path: Option<Arc<Path>>,
    io: Option<Arc<io::Error>>,
}

impl BlockError {
    /// An error without a cause underneath (a check of ours failed, or a peer said so); add
    /// detail with [`BlockError::path`] and [`BlockError::context`].
    pub fn new(kind: ErrorKind, op: Op, offset: u64) -> Self {
        BlockError {
            kind,
            op,
            offset,
            context: None,
            path: None,
            io: None,
        }
    }

    /// Adds a human-readable detail (replacing an earlier one).
    pub fn context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into());
        self
    }

    /// Names the file the operation was on.
    pub fn path(mut self, path: impl AsRef<Path>) -> Self {
        self.path = Some(Arc::from(path.as_ref()));
        self
    }

    /// Keeps `err` as the cause: the message shows its text and [`Error::source`] returns it.
    /// The kind is left as it is.
    pub fn with_io(mut self, err: io::Error) -> Self {
        self.io = Some(Arc::new(err));
        self
    }

    /// Wraps an OS error, choosing the kind from its errno.
    pub fn from_io(err: io::Error, op: Op, offset: u64) -> Self {
        let kind = match err.raw_os_error() {
            Some(e) if e == rustix::io::Errno::NOSPC.raw_os_error() => ErrorKind::NoSpace,
            Some(e) if e == rustix::io::Errno::OPNOTSUPP.raw_os_error() => ErrorKind::NotSupported,
            e => ErrorKind::Io(e),
        };
        BlockError::new(kind, op, offset).with_io(err)
    }

    /// The file the operation was on, when known.
    pub fn file(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The OS (or image library) error underneath, when there is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        self.io.as_deref()
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.op)?;
        if let Some(path) = &self.path {
            write!(f, " {}", path.display())?;
        }
        if self.op.has_offset() || self.offset != 0 {
            write!(f, " at offset {}", self.offset)?;
        }
        // The OS text ("No such file or directory") says more than the kind ("I/O error").
        match &self.io {
            Some(err) => write!(f, ": {err}")?,
            None => write!(f, ": {}", self.kind)?,
        }
        if let Some(c) = &self.context {
            write!(f, " ({c})")?;
        }
        Ok(())
    }
}

impl Error for BlockError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.io.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENOENT: i32 = 2;
    const ENOSPC: i32 = 28;
    const EROFS: i32 = 30;

    #[test]
    fn an_os_error_shows_its_text_and_the_file() {
        let e = BlockError::from_io(io::Error::from_raw_os_error(EROFS), Op::Write, 4096)
            .path("/vm/disk.raw");

        assert_eq!(
            e.to_string(),
            "write /vm/disk.raw at offset 4096: Read-only file system (os error 30)"
        );
    }

    #[test]
    fn open_and_create_errors_have_no_offset() {
        let e = BlockError::from_io(io::Error::from_raw_os_error(ENOENT), Op::Open, 0)
            .path("/vm/x.raw");

        assert_eq!(
            e.to_string(),
            "open /vm/x.raw: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn errors_without_an_io_cause_show_their_kind_and_context() {
        let e = BlockError::new(ErrorKind::Io(Some(5)), Op::Read, 0)
            .context("peer: server replied EIO");

        assert_eq!(
            e.to_string(),
            "read at offset 0: I/O error (errno 5) (peer: server replied EIO)"
        );
    }

    #[test]
    fn the_io_error_is_the_source_and_survives_a_clone() {
        let e = BlockError::from_io(io::Error::from_raw_os_error(ENOENT), Op::Open, 0).clone();

        let source = e.source().expect("a source");
        let io = source.downcast_ref::<io::Error>().expect("an io::Error");
        assert_eq!(io.raw_os_error(), Some(ENOENT));
        assert_eq!(e.io_error().unwrap().raw_os_error(), Some(ENOENT));
    }

    #[test]
    fn kinds_from_os_errors_are_unchanged() {
        let kind =
            |errno| BlockError::from_io(io::Error::from_raw_os_error(errno), Op::Write, 0).kind;

        assert_eq!(kind(ENOENT), ErrorKind::Io(Some(ENOENT)));
        assert_eq!(kind(EROFS), ErrorKind::Io(Some(EROFS)));
        assert_eq!(kind(ENOSPC), ErrorKind::NoSpace);
    }
}
