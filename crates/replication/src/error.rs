//! Errors of the replication control operations (start, checkpoint, get_error, stop), for
//! both roles.
//!
//! Where QEMU has an error for the same situation, the message is QEMU's, verbatim: management
//! software (COLO scripts, libvirt-like tools) matches on these strings, and the QMP layer
//! passes them on as `desc`. I/O errors of the data paths are [`BlockError`]s instead.

use blockdev::BlockError;

use crate::Stage;

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
    InvalidMode {
        /// The mode the node was opened with (QEMU's number).
        needs: u32,
        /// The mode asked for.
        got: u32,
    },
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
    TooManyClusters {
        /// The disk's length.
        len: u64,
        /// The cluster size asked for.
        cluster_size: u64,
    },
    /// A failover merge recorded by a process that died cannot be resumed.
    #[error("the failover merge recorded in {} cannot be resumed: {why}", dir.display())]
    CannotResume {
        /// The directory of the record (the disk's state directory).
        dir: std::path::PathBuf,
        /// Why not.
        why: String,
    },
    /// The internal overlay store could not be created.
    #[error("cannot create the overlay store")]
    Store(#[source] BlockError),
    /// Primary: the secondary's disk has another length.
    #[error("disk lengths differ: the primary disk has {local} bytes, the secondary {remote}")]
    DiskLengthMismatch {
        /// The primary disk's length.
        local: u64,
        /// The secondary disk's length.
        remote: u64,
    },
    /// Primary: a forward failed since start (the sticky error); `force` overrides it.
    #[error(
        "checkpoint refused: forwarding failed earlier ({0}); the secondary may be missing writes"
    )]
    DrainFailed(String),
    /// Primary: a checkpoint needs a running node (before start and after stop, writes are
    /// only recorded as dirty).
    #[error("checkpoint refused: replication is not running (stage {0}); start it first")]
    NotStarted(Stage),
    /// Primary: a checkpoint needs the secondary reachable.
    #[error("checkpoint refused: the secondary link is down; the secondary may be missing writes")]
    LinkDown,
    /// Primary: a checkpoint needs every write on the secondary.
    #[error(
        "checkpoint refused: {bytes} bytes are not yet on the secondary (the resync is copying them)"
    )]
    Unsynced {
        /// Bytes the resync has yet to copy.
        bytes: u64,
    },
    /// Primary: a checksum sync is still comparing the two disks.
    #[error(
        "checkpoint refused: the checksum sync has {bytes} bytes left to compare with the secondary"
    )]
    Comparing {
        /// Bytes not yet compared.
        bytes: u64,
    },
}

impl PartialEq for ReplicationError {
    /// Equal when of the same kind (sources are not compared): tests and callers match on
    /// the situation, not on the underlying I/O detail.
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}
