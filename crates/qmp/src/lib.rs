//! A QMP-compatible control protocol: the JSON framing QEMU's monitor speaks, so that QEMU's
//! tooling (python's `qemu.qmp`, `socat`, orchestrators written for QEMU) can drive coloblk.
//!
//! ```text
//!  server: {"QMP": {"version": ..., "capabilities": []}}
//!  client: {"execute": "qmp_capabilities"}          server: {"return": {}}
//!  client: {"execute": "cmd", "arguments": {..}, "id": 1}
//!  server: {"return": ..., "id": 1}  or  {"error": {"class": "GenericError", "desc": ".."}, "id": 1}
//!  server: {"event": "NAME", "data": {..}, "timestamp": {"seconds": s, "microseconds": us}}
//! ```
//!
//! The crate is transport-agnostic: it serves and drives any byte stream.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod framing;
mod server;

pub use client::{HandshakeStep, QmpClient, QmpClientError};
pub use framing::{Frame, FrameError, Framer};
pub use server::{Command, Event, Handler, QmpServer};

use serde_json::{Map, Value, json};

/// QMP error classes (QEMU's `QapiErrorClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Every error without a class of its own (QEMU sends almost all errors as this).
    GenericError,
    /// The command does not exist; clients probe for commands with it.
    CommandNotFound,
    /// The device exists but is not in a state to do this.
    DeviceNotActive,
    /// No device of that name.
    DeviceNotFound,
}

impl ErrorClass {
    /// The name on the wire (`"class"` of an error reply).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// What clients match on.
    pub class: ErrorClass,
    /// What humans read.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`, the class of nearly every failure.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// QEMU's reply to a command it does not know, word for word.
    pub fn not_found(command: &str) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {command} has not been found"),
        }
    }

    fn to_json(&self) -> Value {
        json!({ "class": self.class.as_str(), "desc": self.desc })
    }
}

/// Arguments of a command, with typed accessors that produce QEMU's error texts.
#[derive(Debug, Clone, Default)]
pub struct Args(pub Map<String, Value>);

impl Args {
    /// A required boolean member.
    pub fn bool(&self, name: &str) -> Result<bool, QmpError> {
        self.opt_bool(name)?
            .ok_or_else(|| QmpError::generic(format!("Parameter '{name}' is missing")))
    }

    /// An optional boolean member.
    pub fn opt_bool(&self, name: &str) -> Result<Option<bool>, QmpError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{name}', expected: boolean"
            ))),
        }
    }

    /// An optional unsigned integer member.
    pub fn opt_u64(&self, name: &str) -> Result<Option<u64>, QmpError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                QmpError::generic(format!(
                    "Invalid parameter type for '{name}', expected: integer"
                ))
            }),
        }
    }

    /// An optional string member.
    pub fn opt_str(&self, name: &str) -> Result<Option<&str>, QmpError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{name}', expected: string"
            ))),
        }
    }

    /// Refuses members outside `known`, as QEMU does.
    pub fn only(&self, known: &[&str]) -> Result<(), QmpError> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }
}
