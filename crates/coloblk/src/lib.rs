//! The parts of the `coloblk` binary that read operator input: `NAME=PATH,...` disk
//! specifications and `--config` files. A library target so that the fuzz targets
//! (`fuzz/fuzz_targets/cli_specs.rs`) can reach them; the daemon itself is in `main.rs`.

#![forbid(unsafe_code)]

pub mod config;
pub mod disk_spec;
