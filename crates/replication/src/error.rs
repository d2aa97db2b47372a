//! Errors of the replication control operations (start, checkpoint, get_error, stop).
//!
//! Where QEMU has an error for the same situation, the message is QEMU's, verbatim: management
//! software (COLO scripts, libvirt-like tools) matches on these strings, and the QMP layer
//! passes them on as `desc`. I/O errors of the data paths are [`BlockError`]s instead.

use blockdev::BlockError;

/// Why a replication control operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicationError {
    /// `start` outside stage NONE (and not in FAILOVER/DONE, where it is ignored).
    #[error("Block replication is running or done")]
    RunningOrDone,
    /// `get_error` before start; `stop` when there is nothing to stop.
    #[error("Block replication is not running")]
    NotRunning,
    /// The sticky error: an I/O error happened (copy-before-write, failover merge). The
    /// detail is in [`crate::secondary::SecondaryNode::last_error`].
    #[error("I/O error occurred")]
    IoError,
    /// `start` with the other side's mode.
    #[error("The parameter mode's value is invalid, needs {needs}, but got {got}")]
    InvalidMode { needs: u32, got: u32 },
    /// `checkpoint` when copy-before-write is not armed (before start, after a failed
    /// failover). QEMU reports the missing backup job this way.
    #[error("Backup job was cancelled unexpectedly")]
    BackupCancelled,
    /// An overlay does not cover exactly the secondary disk.
    #[error("Active disk, hidden disk, secondary disk's length are not the same")]
    LengthMismatch,
    /// An overlay cannot be emptied (a device without discard).
    #[error("Active disk or hidden disk doesn't support make_empty")]
    MakeEmptyUnsupported,
    /// Emptying the active overlay failed.
    #[error("Cannot make active disk empty")]
    MakeActiveEmpty(#[source] BlockError),
    /// Emptying the hidden overlay failed.
    #[error("Cannot make hidden disk empty")]
    MakeHiddenEmpty(#[source] BlockError),
    /// Configuration: the copy-before-write cluster size is unusable.
    #[error("invalid cluster size {0}: must be a power of two from 512 bytes to 16 MiB")]
    InvalidClusterSize(u64),
    /// Configuration: the disk has more clusters than the overlay maps can index.
    #[error("a {len}-byte disk has too many {cluster_size}-byte clusters; use larger clusters")]
    TooManyClusters { len: u64, cluster_size: u64 },
    /// The internal overlay store could not be created.
    #[error("cannot create the overlay store")]
    Store(#[source] BlockError),
}

impl PartialEq for ReplicationError {
    /// Equal when of the same kind (sources are not compared): tests and callers match on
    /// the situation, not on the underlying I/O detail.
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}
