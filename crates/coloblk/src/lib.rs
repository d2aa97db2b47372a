//! The parts of the `coloblk` binary that read operator input: `NAME=PATH,...` disk
//! specifications and `--config` files. A library target so that the fuzz targets
//! (`fuzz/fuzz_targets/cli_specs.rs`) can reach them; the daemon itself is in `main.rs`.

#![forbid(unsafe_code)]

pub mod config;
pub mod disk_spec;

/// A mistake on the command line found after parsing (a disk named twice): the binary exits
/// with 2, as for the mistakes the parser finds itself.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}
