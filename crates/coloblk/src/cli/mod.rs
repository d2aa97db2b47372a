//! The commands that talk to daemons rather than being one: `ctl` and `demo`.

pub mod ctl;
pub mod demo;
