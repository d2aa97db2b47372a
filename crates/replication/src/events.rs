//! What a replication node reports as it happens, for both roles: one stream per node, so a
//! daemon turns events into QMP events and log lines without polling.

/// Something an operator should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// Primary: a change could not be forwarded; its range is dirty.
    ForwardFailed {
        /// Start of the change.
        offset: u64,
        /// Length of the change.
        len: u64,
        /// Why.
        error: String,
    },
    /// Primary: the secondary is given up on; writes are recorded as dirty from now on.
    LinkLost {
        /// Why.
        reason: String,
    },
    /// Primary: a resync job began with this many dirty bytes.
    ResyncStarted {
        /// Dirty bytes when it began.
        bytes: u64,
    },
    /// Primary: the resync copied everything dirty.
    ResyncDone {
        /// Bytes copied.
        bytes: u64,
        /// Of them, bytes sent as payload (holes go as write-zeroes).
        sent: u64,
    },
    /// Primary: the resync cannot go on (a local read failed); it retries.
    ResyncFailed {
        /// Why.
        error: String,
    },
    /// Secondary: a sticky error was set (copy-before-write or a replica write failed).
    Error {
        /// The error.
        error: String,
    },
    /// Secondary: the failover merge got further.
    FailoverProgress {
        /// Bytes merged so far.
        done: u64,
        /// Bytes to merge in all.
        total: u64,
    },
    /// Secondary: the failover merge is done; the node serves its disk.
    FailoverDone {
        /// Bytes merged.
        merged: u64,
    },
    /// Secondary: the failover merge failed; `stop(true)` retries.
    FailoverFailed {
        /// Why.
        error: String,
    },
}
