//! The coloblk replication engine.

#![forbid(unsafe_code)]

pub mod error;
pub mod group;
pub mod primary;
pub mod secondary;
pub mod stage;

pub use error::ReplicationError;
pub use group::{GroupError, Replication, ReplicationGroup};
pub use secondary::{SecondaryConfig, SecondaryNode};
pub use stage::{Mode, Stage};
