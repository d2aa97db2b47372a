//! The coloblk replication engine.

#![forbid(unsafe_code)]

pub mod primary;
