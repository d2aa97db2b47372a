//! Replication groups: several disks replicated as one (a VM with more than one disk).
//!
//! QEMU's `replication_*_all` walk the nodes newest-first and stop at the first error with no
//! rollback (docs/qemu-replication.md §6.3.8), so a failed start or checkpoint leaves some disks changed and others
//! not. A group here is all-or-nothing where that is possible:
//!
//! - `start`: every member is validated first (stage, mode, lengths, emptiable overlays);
//!   nothing is changed unless all pass. If a member then fails to start, the members this
//!   call started are returned to NONE (overlays discarded) before the error is returned.
//! - `checkpoint`: every member is validated first (secondary: stage, sticky error; primary:
//!   running, link up, nothing dirty); nothing is emptied or drained unless all pass. After
//!   that a secondary member's checkpoint can only fail to give space back (its view has been
//!   reset by then) and a primary's drain can fail (a forward failing meanwhile), so every
//!   member is still checkpointed and the first error is returned: the group's checkpoint then
//!   failed, and says which member.
//! - `get_error`: every member is asked; the first error is returned.
//! - `stop`: every member is stopped even if one fails (a failover must reach every disk);
//!   the first error is returned.
//!
//! Members are visited in the order they were added.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::primary::PrimaryNode;
use crate::secondary::SecondaryNode;
use crate::{Mode, ReplicationError, ReplicationEvent, Stage};

/// The control surface of one replication node of either role (QEMU's `ReplicationOps`), plus
/// the validation steps a group needs for all-or-nothing operations.
#[async_trait]
pub trait Replication: Send + Sync {
    /// Where the node is in the stage machine.
    fn stage(&self) -> Stage;
    /// Checks that `start(mode)` would pass its checks, changing nothing.
    fn validate_start(&self, mode: Mode) -> Result<(), ReplicationError>;
    /// QEMU's `replication_start`.
    async fn start(&self, mode: Mode) -> Result<(), ReplicationError>;
    /// Returns a node this group just started to NONE.
    async fn undo_start(&self) -> Result<(), ReplicationError>;
    /// Checks that `checkpoint(force)` would pass its checks, changing nothing.
    fn validate_checkpoint(&self, force: bool) -> Result<(), ReplicationError>;
    /// QEMU's `replication_do_checkpoint`; `force` overrides a sticky error, nothing else.
    async fn checkpoint(&self, force: bool) -> Result<(), ReplicationError>;
    /// QEMU's `replication_get_error`.
    fn get_error(&self) -> Result<(), ReplicationError>;
    /// QEMU's `replication_stop`.
    async fn stop(&self, failover: bool) -> Result<(), ReplicationError>;
    /// The node's events.
    fn events(&self) -> broadcast::Receiver<ReplicationEvent>;
}

#[async_trait]
impl Replication for SecondaryNode {
    fn stage(&self) -> Stage {
        SecondaryNode::stage(self)
    }
    fn validate_start(&self, mode: Mode) -> Result<(), ReplicationError> {
        SecondaryNode::validate_start(self, mode)
    }
    async fn start(&self, mode: Mode) -> Result<(), ReplicationError> {
        SecondaryNode::start(self, mode).await
    }
    async fn undo_start(&self) -> Result<(), ReplicationError> {
        SecondaryNode::undo_start(self).await
    }
    fn validate_checkpoint(&self, force: bool) -> Result<(), ReplicationError> {
        match SecondaryNode::validate_checkpoint(self) {
            // Only the sticky error gives way to force.
            Err(ReplicationError::IoError) if force && self.stage() == Stage::Running => Ok(()),
            r => r,
        }
    }
    async fn checkpoint(&self, force: bool) -> Result<(), ReplicationError> {
        if force {
            self.clear_error();
        }
        SecondaryNode::checkpoint(self).await
    }
    fn get_error(&self) -> Result<(), ReplicationError> {
        SecondaryNode::get_error(self)
    }
    async fn stop(&self, failover: bool) -> Result<(), ReplicationError> {
        SecondaryNode::stop(self, failover).await
    }
    fn events(&self) -> broadcast::Receiver<ReplicationEvent> {
        SecondaryNode::events(self)
    }
}

#[async_trait]
impl Replication for PrimaryNode {
    fn stage(&self) -> Stage {
        PrimaryNode::stage(self)
    }
    fn validate_start(&self, mode: Mode) -> Result<(), ReplicationError> {
        PrimaryNode::validate_start(self, mode)
    }
    async fn start(&self, mode: Mode) -> Result<(), ReplicationError> {
        PrimaryNode::start(self, mode)
    }
    async fn undo_start(&self) -> Result<(), ReplicationError> {
        self.reset_to_none();
        Ok(())
    }
    fn validate_checkpoint(&self, _force: bool) -> Result<(), ReplicationError> {
        self.protected()
    }
    async fn checkpoint(&self, force: bool) -> Result<(), ReplicationError> {
        PrimaryNode::checkpoint(self, force).await
    }
    fn get_error(&self) -> Result<(), ReplicationError> {
        PrimaryNode::get_error(self)
    }
    async fn stop(&self, failover: bool) -> Result<(), ReplicationError> {
        PrimaryNode::stop(self, failover).await
    }
    fn events(&self) -> broadcast::Receiver<ReplicationEvent> {
        PrimaryNode::events(self)
    }
}

/// A group operation's failure: which member, and its error. Displays as the member's error
/// alone, so QEMU-compatible front ends can pass the text on unchanged.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}")]
pub struct GroupError {
    /// Name of the member that failed.
    pub member: String,
    /// The member's error.
    #[source]
    pub error: ReplicationError,
}

/// Named replication nodes operated together.
#[derive(Default, Clone)]
pub struct ReplicationGroup {
    members: Vec<(String, Arc<dyn Replication>)>,
}

impl ReplicationGroup {
    /// An empty group.
    pub fn new() -> Self {
        ReplicationGroup::default()
    }

    /// Adds a member (visited after the ones already there).
    pub fn add(&mut self, name: impl Into<String>, node: Arc<dyn Replication>) {
        self.members.push((name.into(), node));
    }

    /// Removes a member by name; returns whether it was there.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.members.len();
        self.members.retain(|(n, _)| n != name);
        self.members.len() != before
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the group has no member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member names, in visiting order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|(n, _)| n.as_str())
    }

    fn fail(name: &str, error: ReplicationError) -> GroupError {
        GroupError {
            member: name.to_string(),
            error,
        }
    }

    /// Starts every member, or none (see the module docs).
    pub async fn start(&self, mode: Mode) -> Result<(), GroupError> {
        for (name, m) in &self.members {
            m.validate_start(mode).map_err(|e| Self::fail(name, e))?;
        }
        let mut started: Vec<&(String, Arc<dyn Replication>)> = Vec::new();
        for member in &self.members {
            let (name, m) = member;
            let was_none = m.stage() == Stage::None;
            match m.start(mode).await {
                Ok(()) => {
                    if was_none && m.stage() == Stage::Running {
                        started.push(member);
                    }
                }
                Err(e) => {
                    for (done_name, done) in started.into_iter().rev() {
                        if let Err(ue) = done.undo_start().await {
                            tracing::warn!(member = %done_name, error = %ue, "rolling back start");
                        }
                    }
                    return Err(Self::fail(name, e));
                }
            }
        }
        Ok(())
    }

    /// Checkpoints every member, or none (see the module docs).
    pub async fn checkpoint(&self, force: bool) -> Result<(), GroupError> {
        self.validate_checkpoint(force)?;
        let mut first = None;
        for (name, m) in &self.members {
            if let Err(e) = m.checkpoint(force).await {
                first.get_or_insert_with(|| Self::fail(name, e));
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Checks that [`checkpoint`](Self::checkpoint) would pass every member's checks.
    pub fn validate_checkpoint(&self, force: bool) -> Result<(), GroupError> {
        for (name, m) in &self.members {
            m.validate_checkpoint(force)
                .map_err(|e| Self::fail(name, e))?;
        }
        Ok(())
    }

    /// Every member's stage, in visiting order.
    pub fn stages(&self) -> impl Iterator<Item = (&str, Stage)> {
        self.members.iter().map(|(n, m)| (n.as_str(), m.stage()))
    }

    /// The first member error, if any.
    pub fn get_error(&self) -> Result<(), GroupError> {
        for (name, m) in &self.members {
            m.get_error().map_err(|e| Self::fail(name, e))?;
        }
        Ok(())
    }

    /// Stops every member; returns the first error.
    pub async fn stop(&self, failover: bool) -> Result<(), GroupError> {
        let mut first = None;
        for (name, m) in &self.members {
            if let Err(e) = m.stop(failover).await {
                first.get_or_insert_with(|| Self::fail(name, e));
            }
        }
        first.map_or(Ok(()), Err)
    }
}
