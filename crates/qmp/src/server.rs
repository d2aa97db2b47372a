//! The QMP server side: greeting, capabilities negotiation, dispatch to a [`Handler`],
//! replies with the request's `id`, and events broadcast to every negotiated client.
//!
//! A session that has not finished `qmp_capabilities` within the negotiation timeout, sends no
//! message for the idle timeout, or takes none of our output for the idle timeout is closed, so
//! that silent clients cannot keep the control socket's connection slots.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::framing::{Frame, Framer};
use crate::{Args, ErrorClass, QmpError};

/// A parsed command.
#[derive(Debug, Clone)]
pub struct Command {
    /// The `execute` member.
    pub name: String,
    /// The `arguments` member (empty when absent).
    pub args: Args,
    /// The client's `id`, echoed in the reply so it can match replies to requests.
    pub id: Option<Value>,
}

/// An asynchronous notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The `event` member (QEMU's names are upper case with underscores).
    pub name: String,
    /// The `data` member.
    pub data: Value,
}

/// What the application provides: its commands.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs `name`; an unknown name returns [`QmpError::not_found`].
    async fn execute(&self, name: &str, args: Args) -> Result<Value, QmpError>;
    /// Runs `name` for the client `peer` (its certificate's name, uid or address, for logs);
    /// by default the same as [`Handler::execute`].
    async fn execute_from(&self, peer: &str, name: &str, args: Args) -> Result<Value, QmpError> {
        let _ = peer;
        self.execute(name, args).await
    }
    /// The names [`Handler::execute`] knows (listed by `query-commands`).
    fn commands(&self) -> Vec<&'static str>;
}

/// Serves QMP sessions for one handler.
pub struct QmpServer {
    handler: Arc<dyn Handler>,
    events: broadcast::Sender<Event>,
    package: String,
    negotiation_timeout: Duration,
    idle_timeout: Duration,
}

impl QmpServer {
    /// A client must finish `qmp_capabilities` this soon after connecting: every QMP client
    /// negotiates at once, and one that does not is not a QMP client.
    pub const DEFAULT_NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);
    /// A session that sends no message for this long is closed. Ten minutes: far longer than
    /// any pause between an orchestrator's commands, short enough that abandoned sessions give
    /// their slots back. A client that only listens for events sends a command (such as
    /// `query-version`) now and then.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

    /// A server for `handler`, announcing `package` in its greeting, with the default timeouts.
    pub fn new(handler: Arc<dyn Handler>, package: impl Into<String>) -> Arc<Self> {
        Self::with_timeouts(
            handler,
            package,
            Self::DEFAULT_NEGOTIATION_TIMEOUT,
            Self::DEFAULT_IDLE_TIMEOUT,
        )
    }

    /// [`QmpServer::new`] with other timeouts: for negotiation, and for idle sessions (no
    /// message from the client, or none of our output taken, for that long).
    pub fn with_timeouts(
        handler: Arc<dyn Handler>,
        package: impl Into<String>,
        negotiation: Duration,
        idle: Duration,
    ) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(QmpServer {
            handler,
            events,
            package: package.into(),
            negotiation_timeout: negotiation,
            idle_timeout: idle,
        })
    }

    /// Sends an event to every client that has finished negotiation.
    pub fn emit(&self, name: &str, data: Value) {
        let _ = self.events.send(Event {
            name: name.to_string(),
            data,
        });
    }

    /// Serves one client until it disconnects.
    pub async fn serve_stream<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send,
    {
        self.serve_stream_from(stream, "stream").await
    }

    /// Serves one client, known as `peer` to the handler ([`Handler::execute_from`]), until it
    /// disconnects.
    pub async fn serve_stream_from<S>(&self, stream: S, peer: &str)
    where
        S: AsyncRead + AsyncWrite + Send,
    {
        let (mut r, mut w) = tokio::io::split(stream);
        if let Err(e) = self.session(&mut r, &mut w, peer).await {
            debug!(%peer, "QMP session ended: {e}");
        }
    }

    fn greeting(&self) -> Value {
        json!({"QMP": {
            "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": self.package},
            "capabilities": []
        }})
    }

    async fn session<R, W>(&self, r: &mut R, w: &mut W, peer: &str) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let negotiate_by = Instant::now() + self.negotiation_timeout;
        let mut idle_from = Instant::now();
        self.send(w, &self.greeting()).await?;
        let mut framer = Framer::new();
        let mut events: Option<broadcast::Receiver<Event>> = None;
        let mut buf = vec![0u8; 8192];
        loop {
            while let Some(frame) = framer.next_frame() {
                idle_from = Instant::now();
                let reply = match frame {
                    Frame::Malformed(msg) => Some(error_reply(&QmpError::generic(msg), None)),
                    Frame::Message(v) => self.dispatch(v, &mut events, peer).await,
                };
                if let Some(reply) = reply {
                    self.send(w, &reply).await?;
                }
            }
            let mut deadline = idle_from + self.idle_timeout;
            if events.is_none() {
                deadline = deadline.min(negotiate_by);
            }
            let n = tokio::select! {
                n = r.read(&mut buf) => n?,
                ev = next_event(&mut events) => {
                    if let Some(ev) = ev {
                        self.send(w, &event_json(&ev)).await?;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let why = if events.is_none() {
                        "did not finish capabilities negotiation"
                    } else {
                        "sent nothing"
                    };
                    info!("closing a QMP client that {why} in time");
                    return Ok(());
                }
            };
            if n == 0 {
                return Ok(());
            }
            if framer.push(&buf[..n]).is_err() {
                self.send(
                    w,
                    &error_reply(&QmpError::generic("QMP message too large"), None),
                )
                .await?;
                return Ok(());
            }
        }
    }

    /// Sends one message; a client that takes none of it for the idle timeout is gone.
    async fn send<W: AsyncWrite + Unpin>(&self, w: &mut W, v: &Value) -> io::Result<()> {
        tokio::time::timeout(self.idle_timeout, send(w, v))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    }

    async fn dispatch(
        &self,
        v: Value,
        events: &mut Option<broadcast::Receiver<Event>>,
        peer: &str,
    ) -> Option<Value> {
        let negotiated = events.is_some();
        let cmd = match parse_command(v) {
            Ok(c) => c,
            Err((e, id)) => return Some(error_reply(&e, id)),
        };
        let result = match (cmd.name.as_str(), negotiated) {
            ("qmp_capabilities", false) => match cmd.args.only(&["enable"]) {
                Ok(()) => {
                    *events = Some(self.events.subscribe());
                    Ok(json!({}))
                }
                Err(e) => Err(e),
            },
            ("qmp_capabilities", true) => Err(QmpError {
                class: ErrorClass::CommandNotFound,
                desc: "Capabilities negotiation is already complete, command ignored".into(),
            }),
            (_, false) => Err(QmpError {
                class: ErrorClass::CommandNotFound,
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            }),
            ("query-commands", true) => {
                let mut names = vec!["qmp_capabilities", "query-commands", "query-version"];
                names.extend(self.handler.commands());
                Ok(Value::Array(
                    names.into_iter().map(|n| json!({"name": n})).collect(),
                ))
            }
            ("query-version", true) => Ok(self.greeting()["QMP"]["version"].clone()),
            (name, true) => self.handler.execute_from(peer, name, cmd.args).await,
        };
        Some(match result {
            Ok(v) => with_id(json!({"return": v}), cmd.id),
            Err(e) => error_reply(&e, cmd.id),
        })
    }
}

async fn next_event(events: &mut Option<broadcast::Receiver<Event>>) -> Option<Event> {
    match events {
        None => std::future::pending().await,
        Some(rx) => loop {
            match rx.recv().await {
                Ok(ev) => return Some(ev),
                // A slow client misses events rather than stalling everyone.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
            }
        },
    }
}

/// Validates the envelope of a command, as QEMU's dispatcher does.
fn parse_command(v: Value) -> Result<Command, (QmpError, Option<Value>)> {
    let Value::Object(mut obj) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    let fail = |msg: String, id: &Option<Value>| Err((QmpError::generic(msg), id.clone()));
    let name = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return fail("QMP input member 'execute' must be a string".into(), &id),
        None => return fail("QMP input lacks member 'execute'".into(), &id),
    };
    let args = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into(), &id),
    };
    if let Some(k) = obj.keys().next() {
        return fail(format!("QMP input member '{k}' is unexpected"), &id);
    }
    Ok(Command {
        name,
        args: Args(args),
        id,
    })
}

fn with_id(mut v: Value, id: Option<Value>) -> Value {
    if let (Some(id), Value::Object(m)) = (id, &mut v) {
        m.insert("id".into(), id);
    }
    v
}

fn error_reply(e: &QmpError, id: Option<Value>) -> Value {
    with_id(json!({"error": e.to_json()}), id)
}

fn event_json(ev: &Event) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut v = json!({
        "event": ev.name,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()}
    });
    if !ev.data.is_null() {
        v["data"] = ev.data.clone();
    }
    v
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, v: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).expect("a Value always serialises");
    line.extend_from_slice(b"\r\n");
    w.write_all(&line).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_errors_use_qemu_texts_and_keep_the_id() {
        let cases = [
            (json!([1]), "QMP input must be a JSON object", None),
            (
                json!({"id": 7}),
                "QMP input lacks member 'execute'",
                Some(json!(7)),
            ),
            (
                json!({"execute": 1}),
                "QMP input member 'execute' must be a string",
                None,
            ),
            (
                json!({"execute": "x", "arguments": []}),
                "QMP input member 'arguments' must be an object",
                None,
            ),
            (
                json!({"execute": "x", "foo": 1, "id": "a"}),
                "QMP input member 'foo' is unexpected",
                Some(json!("a")),
            ),
        ];
        for (input, desc, id) in cases {
            let (e, got_id) = parse_command(input).unwrap_err();
            assert_eq!(e.desc, desc);
            assert_eq!(got_id, id);
        }
    }
}
