//! The coloblk replication engine.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod events;
pub mod group;
pub mod primary;
pub mod secondary;
mod stage;
pub mod state;

pub use error::ReplicationError;
pub use events::ReplicationEvent;
pub use group::{GroupError, Replication, ReplicationGroup};
pub use secondary::{SecondaryConfig, SecondaryNode};
pub use stage::{Mode, Stage};
