//! The parts of the `coloblk` binary that read operator input: `NAME=PATH,...` disk
//! specifications and `--config` files. A library target so that the fuzz targets
//! (`fuzz/fuzz_targets/cli_specs.rs`) can reach them; the daemon itself is in `main.rs`.

#![forbid(unsafe_code)]

pub mod config;
pub mod disk_spec;
pub mod export_addr;

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

/// An error and its causes on one line, as `{:#}` prints them, leaving out a cause whose text
/// the line already holds (an I/O error is often both a context's words and its source).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::from_raw_os_error(2);
        let e =
            anyhow::Error::new(io).context("open /x.raw: No such file or directory (os error 2)");
        let e = e.context("disk 'd': cannot open /x.raw");
        assert_eq!(
            super::error_chain(e.as_ref()),
            "disk 'd': cannot open /x.raw: open /x.raw: No such file or directory (os error 2)"
        );
    }
}
