//! The NBD server's negotiation around STARTTLS on a listener that requires TLS, driven by
//! arbitrary client bytes over an in-memory stream (one 1 MiB export "disk"; credentials from a
//! test CA made once per process).
//!
//! Asserts:
//!  * no panic, and the session ends within 10 s once the client's bytes run out (the TLS
//!    handshake of a client that sends garbage or stops after STARTTLS is bounded too);
//!  * before TLS, the server's bytes are exactly what FORCEDTLS allows: the greeting; then for
//!    each complete option one reply: NBD_REP_ERR_TLS_REQD for every option but STARTTLS and
//!    ABORT; ABORT gets an ACK and nothing follows; NBD_OPT_EXPORT_NAME gets nothing and
//!    nothing follows (the session ends); STARTTLS with data gets NBD_REP_ERR_INVALID;
//!  * STARTTLS without data gets an ACK and, after it, nothing the client could take for NBD:
//!    only TLS records (content types 20-23) or nothing at all; never an export's size, an
//!    option reply or a transmission reply in the clear.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use blockdev::MemoryDev;
use libfuzzer_sys::fuzz_target;
use nbd::proto::*;
use nbd::server::{Export, ExportSet, Server, ServerConfig, TlsPolicy};

#[path = "common/cur.rs"]
mod cur;
#[path = "common/duplex.rs"]
mod duplex;
use cur::Cur;

/// One credentials directory for the whole run (making keys per input would be all the work).
fn tls() -> Arc<net::TlsServer> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("coloblk-fuzz-tls-{}", std::process::id()));
        testutil::tls::TestCa::new("fuzz CA").creds(&dir, "server", "client")
    });
    let creds = net::TlsCreds::load(dir).expect("test credentials");
    Arc::new(net::TlsServer::new(&creds, net::Authz::default()).expect("server config"))
}

fn assert_nothing_more(out: &Cur, why: &str) {
    assert!(
        out.is_empty(),
        "server sent {} bytes after {why}",
        out.0.len()
    );
}

/// Replays the client's input against the server's output.
fn check_transcript(input: &[u8], output: &[u8]) {
    let mut inp = Cur(input);
    let mut out = Cur(output);
    assert_eq!(out.u64(), Some(NBDMAGIC), "greeting");
    assert_eq!(out.u64(), Some(IHAVEOPT), "greeting");
    out.u16().expect("handshake flags");
    let Some(flags) = inp.u32() else {
        return assert_nothing_more(&out, "truncated client flags");
    };
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return assert_nothing_more(&out, "unknown client flags");
    }
    loop {
        let (Some(magic), Some(option), Some(len)) = (inp.u64(), inp.u32(), inp.u32()) else {
            return assert_nothing_more(&out, "a truncated option header");
        };
        if magic != IHAVEOPT || len > MAX_OPTION_LEN {
            return assert_nothing_more(&out, "a bad option header");
        }
        if inp.take(len as usize).is_none() {
            return assert_nothing_more(&out, "a truncated option");
        }
        if option == OPT_EXPORT_NAME {
            return assert_nothing_more(&out, "NBD_OPT_EXPORT_NAME before TLS");
        }
        assert_eq!(out.u64(), Some(OPT_REPLY_MAGIC), "option reply magic");
        assert_eq!(out.u32(), Some(option), "the reply names its option");
        let kind = out.u32().expect("reply type");
        let rlen = out.u32().expect("reply length");
        out.take(rlen as usize).expect("reply payload");
        match option {
            OPT_ABORT => {
                assert_eq!(kind, REP_ACK);
                return assert_nothing_more(&out, "ABORT");
            }
            OPT_STARTTLS if len == 0 => {
                assert_eq!((kind, rlen), (REP_ACK, 0), "STARTTLS");
                // From here on only TLS records: a record header is type, version 3.x, length.
                while let Some(ty) = out.take(1) {
                    assert!(
                        (20..=23).contains(&ty[0]),
                        "not a TLS record: type {}",
                        ty[0]
                    );
                    let (Some(_), Some(n)) = (out.u16(), out.u16()) else {
                        return;
                    };
                    if out.take(n as usize).is_none() {
                        return;
                    }
                }
                return;
            }
            OPT_STARTTLS => assert_eq!(kind, REP_ERR_INVALID, "STARTTLS with data"),
            _ => assert_eq!(kind, REP_ERR_TLS_REQD, "option {option} before TLS"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    duplex::run(async {
        let exports = ExportSet::new();
        exports.add(Export::new("disk", Arc::new(MemoryDev::new(1 << 20))));
        let config = ServerConfig {
            handshake_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        };
        let server = Server::new(exports, config);
        let output = duplex::session(data, "server session", |server_end| {
            server.serve_stream_with(server_end, TlsPolicy::Required(tls()))
        })
        .await;
        check_transcript(data, &output);
    });
});
