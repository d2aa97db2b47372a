//! The control socket's replies as types: the daemons serialise them, `coloblk ctl` reads them
//! back, so a field is named in one place (kebab-case on the wire, as QMP names things).

use serde::{Deserialize, Serialize};

/// `query-replication`, tagged by `role`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Status {
    /// A primary's disks.
    Primary(PrimaryStatus),
    /// A secondary's disks.
    Secondary(SecondaryStatus),
}

/// A primary's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PrimaryStatus {
    /// `async` or `sync`.
    pub mode: String,
    /// Every disk, in command-line order.
    pub disks: Vec<PrimaryDisk>,
    /// The last checkpoint that succeeded.
    pub last_checkpoint: Option<PrimaryCheckpoint>,
}

/// One disk of a primary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct PrimaryDisk {
    /// The disk's name (its NBD export).
    pub name: String,
    /// The replication stage (QEMU's names).
    pub stage: String,
    /// The sticky forwarding error.
    pub error: Option<String>,
    /// Running, link up, nothing dirty: a checkpoint would be accepted.
    pub protected: bool,
    /// How the first sync with a secondary compares the disks: `checksum`, `full` or `none`.
    pub sync: String,
    /// The link: `up`, `connecting` (with the last error), or `peer-promoted`.
    pub link: String,
    /// The secondary answered our commands (digests, epochs): what it holds is known, not
    /// assumed.
    pub peer_verified: bool,
    /// Why the link is not up, if it is not.
    pub link_error: Option<String>,
    /// The last checksum comparison with the secondary.
    pub compared: Option<Compared>,
    /// The current (or last) resync job.
    pub resync: Resync,
    /// The link to the secondary is usable.
    pub link_up: bool,
    /// Changes queued or in flight.
    pub queue_requests: u64,
    /// Payload bytes queued or in flight.
    pub queue_bytes: u64,
    /// Writes the secondary acknowledged.
    pub forwarded_writes: u64,
    /// Payload bytes the secondary acknowledged.
    pub forwarded_bytes: u64,
    /// Forwards that failed.
    pub forward_errors: u64,
    /// Clusters the secondary may lack.
    pub dirty_clusters: u64,
    /// Bytes the secondary may lack.
    pub dirty_bytes: u64,
}

/// What a checksum comparison found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Compared {
    /// Bytes compared (read on both sides).
    pub compared_bytes: u64,
    /// Bytes found different (then resynced).
    pub differing_bytes: u64,
}

/// A resync job's progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Resync {
    /// A job is copying now.
    pub active: bool,
    /// Bytes copied plus bytes still dirty.
    pub total_bytes: u64,
    /// Bytes whose copy the secondary acknowledged.
    pub done_bytes: u64,
    /// Payload bytes written to the secondary.
    pub sent_bytes: u64,
}

/// A primary's last checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PrimaryCheckpoint {
    /// When it ended, in milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// How long the drain took.
    pub drain_ms: f64,
    /// How long the secondary's checkpoint took (coordinated checkpoints only).
    pub secondary_ms: Option<f64>,
}

/// A secondary's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SecondaryStatus {
    /// The buffer the primary's writes go into now (see the coordinated checkpoint).
    #[serde(default)]
    pub epoch: u64,
    /// Random per daemon process: a primary that sees another one knows the secondary
    /// restarted.
    #[serde(default)]
    pub instance: u64,
    /// A failover was asked for (the secondary serves its disk itself, or will).
    #[serde(default)]
    pub failed_over: bool,
    /// Every disk, in command-line order.
    pub disks: Vec<SecondaryDisk>,
    /// The last checkpoint that succeeded.
    pub last_checkpoint: Option<SecondaryCheckpoint>,
}

/// One disk of a secondary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct SecondaryDisk {
    /// The disk's name (its NBD exports).
    pub name: String,
    /// The replication stage (QEMU's names).
    pub stage: String,
    /// The sticky error.
    pub error: Option<String>,
    /// Copy-before-write granularity.
    pub cluster_size: u64,
    /// Bytes the speculative VM wrote since the last checkpoint.
    pub active_bytes: u64,
    /// Bytes preserved by copy-before-write since the last checkpoint.
    pub hidden_bytes: u64,
    /// Clusters preserved by copy-before-write since the daemon started.
    pub cbw_copies: u64,
    /// The current (or last) failover merge.
    pub failover: Failover,
    /// The disk is a usable copy: false while a primary's sync runs, until the next
    /// checkpoint.
    pub consistent: bool,
    /// A primary is connected to the disk's replica export.
    pub primary_connected: bool,
}

/// A failover merge's progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Failover {
    /// Bytes merged so far.
    pub done_bytes: u64,
    /// Bytes to merge in all.
    pub total_bytes: u64,
    /// The merge was begun by a daemon that died, and this one resumed it.
    pub resumed: bool,
}

/// A secondary's last checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SecondaryCheckpoint {
    /// When it ended, in milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// How long it took.
    pub duration_ms: f64,
}

/// The reply to `replication-checkpoint`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckpointReply {
    /// Primary: how long the drain took.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub drain_ms: Option<f64>,
    /// Primary: how long the secondary's checkpoint took; null without `--peer-control`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub secondary_ms: Option<Option<f64>>,
    /// Primary: the secondary's epoch after its checkpoint.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub secondary_epoch: Option<u64>,
    /// Primary: secondaries checkpointed without an epoch check (QEMU's COLO secondary, which
    /// has none): their buffer is the one drained into only on the operator's word.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub unverified_secondaries: Vec<String>,
    /// Secondary: how long it took.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub duration_ms: Option<f64>,
    /// Secondary: the epoch the primary's writes go into from now on.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub epoch: Option<u64>,
    /// `force` was given (a sticky error was overridden).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub forced: bool,
}

/// The reply to a stop or failover: empty, or a note when there was nothing to do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopReply {
    /// Why nothing was done.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub note: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_primary_status_has_the_wire_names_and_reads_back() {
        let st = Status::Primary(PrimaryStatus {
            mode: "async".into(),
            disks: vec![PrimaryDisk {
                name: "vm0".into(),
                stage: "running".into(),
                link_up: true,
                dirty_bytes: 65536,
                ..Default::default()
            }],
            last_checkpoint: None,
        });
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["role"], "primary");
        assert_eq!(v["disks"][0]["link-up"], true);
        assert_eq!(v["disks"][0]["dirty-bytes"], 65536);
        assert_eq!(v["disks"][0]["resync"]["sent-bytes"], 0);
        assert_eq!(v["last-checkpoint"], json!(null));
        assert_eq!(serde_json::from_value::<Status>(v).unwrap(), st);
    }

    #[test]
    fn checkpoint_replies_carry_only_their_role_s_fields() {
        let primary = CheckpointReply {
            drain_ms: Some(1.5),
            secondary_ms: Some(None),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(primary).unwrap(),
            json!({"drain-ms": 1.5, "secondary-ms": null})
        );
        let secondary = CheckpointReply {
            duration_ms: Some(0.5),
            epoch: Some(7),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(secondary).unwrap(),
            json!({"duration-ms": 0.5, "epoch": 7})
        );
    }
}
