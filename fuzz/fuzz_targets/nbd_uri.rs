//! The NBD URI parser (`nbd::uri::NbdUri`, `crates/nbd/src/uri.rs`) and the command-line address
//! parser (`nbd::addr::SocketAddr`, `crates/nbd/src/addr.rs`) on arbitrary text.
//!
//! Input: arbitrary bytes, taken as UTF-8 (invalid sequences become U+FFFD, so valid UTF-8 is
//! parsed as is).
//!
//! Asserts, for both parsers:
//!  * parsing never panics;
//!  * whatever parses displays (`to_string()`) as text that parses back to an equal value, and
//!    displaying that value again gives the same text (display is a fixed point);
//!  * a refused URI's error names the URI (`UriError::uri` is the input, and its message
//!    contains it).
//!
//! Finding F4 (README.md, "Findings", fixed): `Display` wrote a TCP host without
//! percent-encoding it; `regressions/nbd_uri/*` replays it.
#![no_main]

use std::fmt::Debug;
use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use nbd::addr::SocketAddr;
use nbd::uri::NbdUri;

/// `value`, parsed from `input`, displays as text that parses back to `value`.
fn round_trips<T>(input: &str, value: &T)
where
    T: FromStr + ToString + PartialEq + Debug,
    T::Err: Debug,
{
    let shown = value.to_string();
    let again = T::from_str(&shown).unwrap_or_else(|e| {
        panic!("{input:?} parses to {value:?}, which displays as {shown:?}, which does not parse: {e:?}")
    });
    assert_eq!(
        &again, value,
        "{input:?} parses to {value:?}, which displays as {shown:?}, which parses to {again:?}"
    );
    assert_eq!(again.to_string(), shown, "display is not a fixed point");
}

fn check(s: &str) {
    match s.parse::<NbdUri>() {
        Ok(uri) => round_trips(s, &uri),
        Err(e) => {
            assert_eq!(e.uri, s);
            assert!(e.to_string().contains(s), "{e} does not name {s:?}");
            assert!(!e.reason.is_empty());
        }
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        round_trips(s, &addr);
    }
}

fuzz_target!(|data: &[u8]| {
    check(&String::from_utf8_lossy(data));
});
