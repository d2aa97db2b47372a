//! A whole QMP server session (greeting, capabilities negotiation, dispatch, events) driven by
//! arbitrary client bytes over an in-memory stream, with a small handler:
//! `echo` returns its arguments, `emit` broadcasts a `FUZZ` event carrying its arguments,
//! `fail` returns a GenericError, anything else is CommandNotFound.
//!
//! Asserts:
//!  * no panic, and the session ends within 10 s once the client's bytes run out;
//!  * everything the server writes is `\r\n`-terminated JSON objects: first the greeting
//!    `{"QMP": {...}}`, then replies (`return` or `error` with `class`/`desc`, plus `id`) and
//!    events (`event` + `timestamp`);
//!  * when the server takes the input in one read (inputs up to 8 KiB, written in one go):
//!    exactly one reply per frame a reference [`Framer`] finds in the input, in order; each
//!    reply carries the request's `id` (and none for malformed or non-object input); nothing
//!    but `qmp_capabilities` succeeds before negotiation, `qmp_capabilities` succeeds at most
//!    once, and `echo` returns exactly its `arguments`.
#![no_main]

use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use libfuzzer_sys::fuzz_target;
use qmp::{Args, Frame, Framer, Handler, QmpError, QmpServer};
use serde_json::{Map, Value, json};

#[path = "common/duplex.rs"]
mod duplex;

/// The server reads the stream 8 KiB at a time; up to this size, it sees the input in one read.
const ONE_READ: usize = 8192;

struct FuzzHandler {
    server: OnceLock<Weak<QmpServer>>,
}

#[async_trait]
impl Handler for FuzzHandler {
    async fn execute(&self, name: &str, args: Args) -> Result<Value, QmpError> {
        match name {
            "echo" => Ok(Value::Object(args.0)),
            "emit" => {
                if let Some(server) = self.server.get().and_then(Weak::upgrade) {
                    server.emit("FUZZ", Value::Object(args.0));
                }
                Ok(json!({}))
            }
            "fail" => Err(QmpError::generic("asked to fail")),
            _ => Err(QmpError::not_found(name)),
        }
    }

    fn commands(&self) -> Vec<&'static str> {
        vec!["echo", "emit", "fail"]
    }
}

fn check_error(reply: &Map<String, Value>) -> &str {
    let err = reply["error"].as_object().expect("error is an object");
    assert_eq!(err.len(), 2, "error has class and desc only: {err:?}");
    assert!(err["desc"].is_string(), "desc is a string: {err:?}");
    err["class"].as_str().expect("class is a string")
}

/// `v` as the client sees it after the server serialised it: serde_json without its
/// `float_roundtrip` feature may parse a float it printed one ulp off, so a float `id` or
/// argument does not always come back bit-identical (that is serde_json's documented trade-off,
/// not a server bug).
fn over_the_wire(v: &Value) -> Value {
    serde_json::from_slice(&serde_json::to_vec(v).unwrap()).unwrap()
}

/// Checks the server's output against the client's input.
fn check_transcript(input: &[u8], output: &[u8]) {
    assert!(
        output.ends_with(b"\r\n"),
        "output does not end a line: {:?}",
        String::from_utf8_lossy(output)
    );
    let lines: Vec<Map<String, Value>> = output
        .split_inclusive(|&b| b == b'\n')
        .map(|l| {
            let l = l.strip_suffix(b"\r\n").expect("lines end with \\r\\n");
            match serde_json::from_slice(l) {
                Ok(Value::Object(m)) => m,
                other => panic!(
                    "server wrote a line that is not a JSON object: {:?} ({other:?})",
                    String::from_utf8_lossy(l)
                ),
            }
        })
        .collect();
    let (greeting, rest) = lines.split_first().expect("a greeting");
    assert!(
        greeting["QMP"]["capabilities"].is_array(),
        "greeting: {greeting:?}"
    );

    let mut replies = Vec::new();
    for m in rest {
        if m.contains_key("event") {
            assert_eq!(m["event"], "FUZZ", "{m:?}");
            assert!(m["timestamp"]["seconds"].is_u64(), "{m:?}");
            assert!(m["timestamp"]["microseconds"].is_u64(), "{m:?}");
            assert!(
                m.keys()
                    .all(|k| ["event", "timestamp", "data"].contains(&k.as_str()))
            );
            continue;
        }
        let kinds = ["return", "error"]
            .iter()
            .filter(|k| m.contains_key(**k))
            .count();
        assert_eq!(kinds, 1, "a reply is one of return/error: {m:?}");
        assert!(
            m.keys()
                .all(|k| ["return", "error", "id"].contains(&k.as_str())),
            "{m:?}"
        );
        if m.contains_key("error") {
            check_error(m);
        }
        replies.push(m);
    }

    if input.len() > ONE_READ {
        return;
    }
    let mut framer = Framer::new();
    framer.push(input).expect("small input");
    let frames: Vec<Frame> = std::iter::from_fn(|| framer.next_frame()).collect();
    assert_eq!(
        replies.len(),
        frames.len(),
        "one reply per frame; frames {frames:?}, replies {replies:?}"
    );
    let mut negotiated = false;
    for (frame, reply) in frames.iter().zip(&replies) {
        let msg = match frame {
            Frame::Malformed(_) => {
                assert_eq!(check_error(reply), "GenericError");
                assert!(!reply.contains_key("id"), "{reply:?}");
                continue;
            }
            Frame::Message(v) => v,
        };
        let obj = msg.as_object();
        assert_eq!(
            reply.get("id"),
            obj.and_then(|o| o.get("id")).map(over_the_wire).as_ref(),
            "reply {reply:?} to {msg}"
        );
        let name = obj.and_then(|o| o.get("execute")).and_then(Value::as_str);
        match reply.get("return") {
            Some(ret) => {
                let name = name.expect("only a named command succeeds");
                if name == "qmp_capabilities" {
                    assert!(!negotiated, "negotiated twice: {msg}");
                    negotiated = true;
                } else {
                    assert!(negotiated, "{name} succeeded before negotiation");
                }
                if name == "echo" {
                    let args = obj.and_then(|o| o.get("arguments")).cloned();
                    let args = over_the_wire(&args.unwrap_or(json!({})));
                    assert_eq!(*ret, args, "echo of {msg}");
                }
            }
            None => {
                let class = check_error(reply);
                if negotiated && name == Some("echo") {
                    // Only a bad envelope makes echo fail.
                    assert_eq!(class, "GenericError", "{reply:?} to {msg}");
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    duplex::run(async {
        let handler = Arc::new(FuzzHandler {
            server: OnceLock::new(),
        });
        let server = QmpServer::new(handler.clone(), "coloblk-fuzz");
        let _ = handler.server.set(Arc::downgrade(&server));

        let output = duplex::session(data, "QMP session", |server_end| async move {
            server.serve_stream(server_end).await
        })
        .await;
        check_transcript(data, &output);
    });
});
