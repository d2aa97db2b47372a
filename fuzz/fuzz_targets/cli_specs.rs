//! The daemon's operator-input parsers on arbitrary text: `NAME=PATH[,key=value|flag...]` disk
//! specifications (`coloblk::disk_spec::DiskSpec`, `crates/coloblk/src/disk_spec.rs`) and
//! `--config` TOML files (`coloblk::config::toml_args`, `crates/coloblk/src/config.rs`).
//!
//! Input: arbitrary bytes, taken as UTF-8 (invalid sequences become U+FFFD). The whole input
//! is tried as a config file and as one disk specification, and each line as a specification.
//!
//! Asserts:
//!  * neither parser panics;
//!  * a specification that parses has the name before the first `=` (1 to 4096 bytes), a
//!    non-empty path after it, and every `key=value` it did not know kept, in order, as
//!    `extra`; a refused one gets an error that quotes the input;
//!  * a config file that parses gives options that start with `--key`.
#![no_main]

use coloblk::config::toml_args;
use coloblk::disk_spec::DiskSpec;
use libfuzzer_sys::fuzz_target;

fn check_spec(s: &str) {
    match s.parse::<DiskSpec>() {
        Ok(spec) => {
            let (name, rest) = s.split_once('=').expect("a parsed spec has '='");
            assert_eq!(spec.name, name);
            assert!(!name.is_empty() && name.len() <= 4096);
            let path = rest.split(',').next().unwrap();
            assert!(!path.is_empty());
            assert_eq!(spec.path, std::path::PathBuf::from(path));
            let unknown: Vec<(String, String)> = rest
                .split(',')
                .skip(1)
                .filter_map(|p| p.split_once('='))
                .filter(|(k, _)| *k != "format")
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(spec.extra, unknown, "{s:?}");
        }
        Err(e) => assert!(e.contains(&format!("'{s}'")), "{e} does not quote {s:?}"),
    }
}

fn check_config(text: &str) {
    if let Ok(args) = toml_args(text, "fuzz.toml") {
        // Options come first, each as `--key`; values follow them.
        if let Some(first) = args.first() {
            assert!(first.to_string_lossy().starts_with("--"), "{args:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check_config(&text);
    check_spec(&text);
    for line in text.lines() {
        check_spec(line);
    }
});
