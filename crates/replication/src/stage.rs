//! The replication stage machine's vocabulary: stages and modes, with QEMU's numbering.
//!
//! The numbers matter: QEMU's error text "The parameter mode's value is invalid, needs 1, but
//! got 0" prints modes as integers, and `query-xen-replication-status`-style tooling reports
//! stages the same way.

use std::fmt;

/// Where a replication node is in its life (QEMU's `ReplicationStage`).
///
/// ```text
///   NONE --start--> RUNNING --stop(failover)--> FAILOVER --merge ok--> DONE
///     ^                |  \                        |   ^
///     '--failed start--'   '--stop(no failover)--> DONE  merge error   | stop(failover): retry
///                                                  v   |
///                                             FAILOVER_FAILED
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Stage {
    /// Not started: the top path refuses I/O, the replica path writes straight through.
    None = 0,
    /// Replicating: copy-before-write is armed, the speculative VM runs on the overlays.
    Running = 1,
    /// The overlays are being merged into the secondary disk (the node is taking over).
    Failover = 2,
    /// The merge failed; writes are routed as QEMU does and `stop(true)` retries.
    FailoverFailed = 3,
    /// Finished: the top path is the secondary disk itself.
    Done = 4,
}

impl Stage {
    /// QEMU's name for the stage.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::None => "none",
            Stage::Running => "running",
            Stage::Failover => "failover",
            Stage::FailoverFailed => "failover-failed",
            Stage::Done => "done",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which side a replication node plays (QEMU's `ReplicationMode`: primary 0, secondary 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Mode {
    /// Serves the VM and forwards its writes.
    Primary = 0,
    /// Keeps the primary's disk and runs the speculative VM's view.
    Secondary = 1,
}

impl Mode {
    /// The integer QEMU prints in its mode-mismatch error.
    pub fn number(self) -> u32 {
        self as u32
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Primary => "primary",
            Mode::Secondary => "secondary",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "primary" => Ok(Mode::Primary),
            "secondary" => Ok(Mode::Secondary),
            _ => Err("The option mode's value should be primary or secondary".to_string()),
        }
    }
}
