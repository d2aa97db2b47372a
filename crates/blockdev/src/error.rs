//! One error type for the block layer: a stable kind plus the operation and offset it concerns.

use std::fmt;

/// Result of a block-layer operation.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

/// The operation an error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Open,
    Read,
    Write,
    Flush,
    WriteZeroes,
    Discard,
    BlockStatus,
    Create,
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

/// A block-layer error with context.
#[derive(Debug, Clone, thiserror::Error)]
pub struct BlockError {
    pub kind: ErrorKind,
    pub op: Op,
    pub offset: u64,
    pub context: Option<String>,
}

impl BlockError {
    pub fn new(kind: ErrorKind, op: Op, offset: u64) -> Self {
        BlockError {
            kind,
            op,
            offset,
            context: None,
        }
    }

    /// Adds a human-readable detail (file name, underlying error text).
    pub fn context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into());
        self
    }

    /// Wraps an OS error.
    pub fn from_io(err: std::io::Error, op: Op, offset: u64) -> Self {
        let kind = match err.raw_os_error() {
            Some(e) if e == rustix::io::Errno::NOSPC.raw_os_error() => ErrorKind::NoSpace,
            Some(e) if e == rustix::io::Errno::OPNOTSUPP.raw_os_error() => ErrorKind::NotSupported,
            e => ErrorKind::Io(e),
        };
        BlockError::new(kind, op, offset).context(err.to_string())
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ErrorKind::OutOfRange => "out of range".to_string(),
            ErrorKind::ReadOnly => "device is read-only".to_string(),
            ErrorKind::NotSupported => "not supported".to_string(),
            ErrorKind::NoSpace => "no space left".to_string(),
            ErrorKind::InvalidArgument => "invalid argument".to_string(),
            ErrorKind::Io(Some(e)) => format!("I/O error (errno {e})"),
            ErrorKind::Io(None) => "I/O error".to_string(),
            ErrorKind::Shutdown => "device is shut down".to_string(),
            ErrorKind::TimedOut => "timed out".to_string(),
        };
        write!(f, "{} at offset {}: {}", self.op, self.offset, what)?;
        if let Some(c) = &self.context {
            write!(f, " ({c})")?;
        }
        Ok(())
    }
}
