//! Generation identifiers: what two disks that were once a pair know of each other, and what a
//! connection between them must do.
//!
//! ```text
//!   primary P                                secondary S
//!   current: new at first start, and at      synced_at: the generation in which S's disk
//!     the first write served without a         was last known equal to P's (a coordinated
//!     link (P "served alone")                  checkpoint); none while a sync overwrites it
//!   base: the generation of the last         promoted_from: S failed over, from this
//!     coordinated checkpoint (both equal)      generation; it has served as a primary since
//! ```
//!
//! DRBD keeps current, bitmap and history UUIDs per disk and compares them at connect. COLO
//! knows more: a coordinated checkpoint is a moment when both disks are equal, so `base` moves
//! at every checkpoint and the primary's write log only has to cover writes since then.

use serde::{Deserialize, Serialize};

/// A generation: random, 64 bits, written as 16 hex digits (in files and on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gen(pub u64);

impl Serialize for Gen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Gen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Gen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match u64::from_str_radix(s, 16) {
            Ok(g) if s.len() <= 16 && !s.starts_with('+') => Ok(Gen(g)),
            _ => Err(format!("'{s}' is not a generation (16 hex digits)")),
        }
    }
}

impl Gen {
    /// A new generation, unlike any other with overwhelming likelihood.
    pub fn new() -> Self {
        let mut b = [0u8; 8];
        // Random enough: the time, the process and a hash of them; no two nodes pick the same.
        let seed = format!(
            "{:?} {} {:?}",
            std::time::SystemTime::now(),
            std::process::id(),
            std::thread::current().id()
        );
        b.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..8]);
        Gen(u64::from_le_bytes(b).max(1))
    }
}

impl Default for Gen {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for Gen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What a disk says of itself on the control channel (`replication-generations`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GenView {
    /// The protocol of this view.
    pub protocol: u32,
    /// The disk's current generation.
    pub current: Option<Gen>,
    /// As a primary: the generation of the last coordinated checkpoint.
    pub base: Option<Gen>,
    /// As a secondary: the generation its disk was last known equal to the primary's in.
    pub synced_at: Option<Gen>,
    /// As a secondary that failed over: the generation it failed over from.
    pub promoted_from: Option<Gen>,
    /// The operator said this disk's own changes are to be discarded (split-brain resolution).
    pub discard: bool,
    /// This disk served as a primary (it holds a primary's state).
    pub was_primary: bool,
    /// As a secondary: its host restarted since it was last synced, so writes it had
    /// acknowledged but not flushed may be gone (a process restart keeps the page cache).
    #[serde(default)]
    pub host_restarted: bool,
}

/// The protocol this build speaks.
pub const PROTOCOL: u32 = 1;

/// What a primary does when its link to a secondary comes up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The secondary's disk is the primary's as of the last checkpoint plus some later writes:
    /// copying the write log's ranges (and the in-memory dirty ones) makes them equal.
    Bitmap,
    /// Nothing proves a relation: the disk spec's `sync=` mode decides.
    Unrelated,
    /// An old primary comes back as a secondary on the disk it had when its peer (now this
    /// primary) failed over, and it served nothing alone since: its writes after the failover
    /// point are void; a checksum sync sends what differs.
    Rejoin,
    /// The secondary failed over from a generation this primary knows and serves a VM: it is
    /// newer, and must not be overwritten.
    PeerNewer(Gen),
    /// Both sides served as a primary after their last shared generation: refused until the
    /// operator names the side whose changes are discarded.
    SplitBrain(Gen),
}

/// The decision at connect, from the primary's view of itself and the secondary's answer.
pub fn decide(primary: &GenView, secondary: &GenView) -> Outcome {
    let knows = |g: Gen| primary.base == Some(g) || primary.current == Some(g);
    if let Some(g) = secondary.promoted_from.filter(|g| knows(*g)) {
        return Outcome::PeerNewer(g);
    }
    if secondary.was_primary {
        // The secondary is an old primary; this primary failed over from `from`.
        if let Some(from) = primary.promoted_from {
            let shared = secondary.base == Some(from) || secondary.current == Some(from);
            if shared && secondary.current == Some(from) {
                return Outcome::Rejoin;
            }
            if shared && !secondary.discard {
                return Outcome::SplitBrain(from);
            }
            if shared {
                return Outcome::Rejoin;
            }
        }
        return Outcome::Unrelated;
    }
    match (secondary.synced_at, primary.base) {
        (Some(s), Some(b)) if s == b => Outcome::Bitmap,
        _ => Outcome::Unrelated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(n: u64) -> Option<Gen> {
        Some(Gen(n))
    }

    #[test]
    fn each_outcome_from_its_critical_inputs() {
        let p = GenView {
            current: g(2),
            base: g(1),
            was_primary: true,
            ..Default::default()
        };
        let s = |synced: Option<Gen>| GenView {
            synced_at: synced,
            ..Default::default()
        };
        // Same generation as the last checkpoint: the log covers the difference.
        assert_eq!(decide(&p, &s(g(1))), Outcome::Bitmap);
        // A sync was under way (none), or another pair's disk: the sync mode decides.
        assert_eq!(decide(&p, &s(None)), Outcome::Unrelated);
        assert_eq!(decide(&p, &s(g(9))), Outcome::Unrelated);
        // The secondary failed over from our base: newer, never overwritten.
        let promoted = GenView {
            promoted_from: g(1),
            current: g(5),
            ..Default::default()
        };
        assert_eq!(decide(&p, &promoted), Outcome::PeerNewer(Gen(1)));
        // The promoted side (now primary, promoted from 1) meets the old primary.
        let new_p = GenView {
            current: g(5),
            promoted_from: g(1),
            was_primary: true,
            ..Default::default()
        };
        let old = |current: u64, discard: bool| GenView {
            current: g(current),
            base: g(1),
            was_primary: true,
            discard,
            ..Default::default()
        };
        // It served nothing alone since generation 1: a rejoin.
        assert_eq!(decide(&new_p, &old(1, false)), Outcome::Rejoin);
        // It served alone (generation 3) while the other failed over: split brain...
        assert_eq!(decide(&new_p, &old(3, false)), Outcome::SplitBrain(Gen(1)));
        // ...until the operator discards its changes.
        assert_eq!(decide(&new_p, &old(3, true)), Outcome::Rejoin);
        // An old primary of some other pair: unrelated.
        let stranger = GenView {
            current: g(8),
            base: g(7),
            was_primary: true,
            ..Default::default()
        };
        assert_eq!(decide(&new_p, &stranger), Outcome::Unrelated);
    }
}
