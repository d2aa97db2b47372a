//! A QMP client, for `coloblk ctl` and for a primary that checkpoints its secondary.

use std::collections::VecDeque;
use std::fmt;
use std::future::IntoFuture;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::framing::{Frame, Framer};
use crate::{ErrorClass, QmpError};

/// Why a command did not return.
#[derive(Debug, thiserror::Error)]
pub enum QmpClientError {
    /// The server answered with an error.
    #[error("{0}")]
    Qmp(QmpError),
    /// Reading or writing the connection failed.
    #[error("control connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something that is not QMP, or closed the connection.
    #[error("control protocol: {0}")]
    Protocol(String),
    /// [`QmpClient::execute_timeout`] gave up waiting.
    #[error("no reply within {0:?}")]
    TimedOut(Duration),
    /// Connecting failed outright (refused, no such socket, ...).
    #[error("cannot connect to {peer}: {source}")]
    Connect {
        /// The address as the user gave it.
        peer: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// [`QmpClient::connect`] ran out of time; `step` is what it was waiting for.
    #[error("{step} {peer} within {timeout:?}")]
    HandshakeTimedOut {
        /// The address as the user gave it.
        peer: String,
        /// What did not happen in time.
        step: HandshakeStep,
        /// The time allowed for the whole handshake.
        timeout: Duration,
    },
}

/// The parts of opening a session, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeStep {
    /// Connecting the socket.
    Connect,
    /// Waiting for the server's `{"QMP": ...}` greeting.
    Greeting,
    /// Waiting for the reply to `qmp_capabilities`.
    Capabilities,
}

impl fmt::Display for HandshakeStep {
    /// Reads as the start of "`<step>` unix:/x within 5s".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandshakeStep::Connect => "no connection to",
            HandshakeStep::Greeting => "no QMP greeting from",
            HandshakeStep::Capabilities => "no reply to qmp_capabilities from",
        })
    }
}

/// A negotiated QMP session over any byte stream.
pub struct QmpClient<S> {
    r: ReadHalf<S>,
    w: WriteHalf<S>,
    framer: Framer,
    events: VecDeque<Value>,
    next_id: u64,
}

impl<S: AsyncRead + AsyncWrite> QmpClient<S> {
    /// Reads the greeting and negotiates capabilities, waiting as long as the server takes
    /// (see [`QmpClient::connect`] for a bounded one).
    pub async fn handshake(stream: S) -> Result<Self, QmpClientError> {
        let mut c = Self::new(stream);
        c.greeting().await?;
        c.execute("qmp_capabilities", json!({})).await?;
        Ok(c)
    }

    /// Connects with `connect` (e.g. `addr.connect()`), reads the greeting and negotiates
    /// capabilities, all within `timeout`. `peer` names the server in errors.
    pub async fn connect<F>(
        peer: impl fmt::Display,
        connect: F,
        timeout: Duration,
    ) -> Result<Self, QmpClientError>
    where
        F: IntoFuture<Output = std::io::Result<S>>,
    {
        let peer = peer.to_string();
        // One deadline for all steps: a server that trickles each step just in time must not
        // get three times the budget.
        let deadline = tokio::time::Instant::now() + timeout;
        let late = |step| QmpClientError::HandshakeTimedOut {
            peer: peer.clone(),
            step,
            timeout,
        };
        let stream = tokio::time::timeout_at(deadline, connect)
            .await
            .map_err(|_| late(HandshakeStep::Connect))?
            .map_err(|source| QmpClientError::Connect {
                peer: peer.clone(),
                source,
            })?;
        let mut c = Self::new(stream);
        tokio::time::timeout_at(deadline, c.greeting())
            .await
            .map_err(|_| late(HandshakeStep::Greeting))??;
        tokio::time::timeout_at(deadline, c.execute("qmp_capabilities", json!({})))
            .await
            .map_err(|_| late(HandshakeStep::Capabilities))??;
        Ok(c)
    }

    fn new(stream: S) -> Self {
        let (r, w) = tokio::io::split(stream);
        QmpClient {
            r,
            w,
            framer: Framer::new(),
            events: VecDeque::new(),
            next_id: 1,
        }
    }

    async fn greeting(&mut self) -> Result<(), QmpClientError> {
        let greeting = self.next_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpClientError::Protocol(format!(
                "not a QMP greeting: {greeting}"
            )));
        }
        Ok(())
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&mut self, name: &str, args: Value) -> Result<Value, QmpClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = serde_json::to_vec(&json!({"execute": name, "arguments": args, "id": id}))
            .expect("a Value always serialises");
        msg.push(b'\n');
        self.w.write_all(&msg).await?;
        self.w.flush().await?;
        loop {
            let v = self.next_message().await?;
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            if v.get("id") != Some(&json!(id)) {
                return Err(QmpClientError::Protocol(format!(
                    "reply for another request: {v}"
                )));
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            let err = &v["error"];
            let class = match err["class"].as_str() {
                Some("CommandNotFound") => ErrorClass::CommandNotFound,
                Some("DeviceNotActive") => ErrorClass::DeviceNotActive,
                Some("DeviceNotFound") => ErrorClass::DeviceNotFound,
                _ => ErrorClass::GenericError,
            };
            let desc = err["desc"]
                .as_str()
                .unwrap_or("(no description)")
                .to_string();
            return Err(QmpClientError::Qmp(QmpError { class, desc }));
        }
    }

    /// Like [`QmpClient::execute`], bounded in time.
    pub async fn execute_timeout(
        &mut self,
        name: &str,
        args: Value,
        t: Duration,
    ) -> Result<Value, QmpClientError> {
        tokio::time::timeout(t, self.execute(name, args))
            .await
            .map_err(|_| QmpClientError::TimedOut(t))?
    }

    /// The next event (buffered ones first).
    pub async fn next_event(&mut self) -> Result<Value, QmpClientError> {
        if let Some(v) = self.events.pop_front() {
            return Ok(v);
        }
        loop {
            let v = self.next_message().await?;
            if v.get("event").is_some() {
                return Ok(v);
            }
        }
    }

    async fn next_message(&mut self) -> Result<Value, QmpClientError> {
        let mut buf = [0u8; 8192];
        loop {
            match self.framer.next_frame() {
                Some(Frame::Message(v)) => return Ok(v),
                Some(Frame::Malformed(m)) => return Err(QmpClientError::Protocol(m)),
                None => {}
            }
            let n = self.r.read(&mut buf).await?;
            if n == 0 {
                return Err(QmpClientError::Protocol(
                    "the server closed the connection".into(),
                ));
            }
            self.framer
                .push(&buf[..n])
                .map_err(|e| QmpClientError::Protocol(e.to_string()))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use async_trait::async_trait;
    use tokio::io::DuplexStream;

    use super::*;
    use crate::{Args, Handler, QmpServer};

    const GREETING: &[u8] = b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n";

    fn ready(s: DuplexStream) -> std::future::Ready<std::io::Result<DuplexStream>> {
        std::future::ready(Ok(s))
    }

    fn step_of(e: QmpClientError) -> HandshakeStep {
        match e {
            QmpClientError::HandshakeTimedOut { step, .. } => step,
            other => panic!("expected a handshake timeout, got: {other}"),
        }
    }

    #[tokio::test]
    async fn connect_gives_up_on_a_socket_that_accepts_and_never_greets() {
        // No tempfile dependency for one socket: a per-process directory, removed at the end.
        let dir = std::env::temp_dir().join(format!("qmp-client-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("silent.qmp");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // Accept and hold the connection open without writing a byte.
        let _held = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
            drop(s);
        });
        let peer = format!("unix:{}", path.display());
        let t = Instant::now();
        let e = QmpClient::connect(
            &peer,
            tokio::net::UnixStream::connect(&path),
            Duration::from_secs(1),
        )
        .await
        .err()
        .expect("a silent socket must not yield a session");
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "took {:?}",
            t.elapsed()
        );
        assert_eq!(
            e.to_string(),
            format!("no QMP greeting from {peer} within 1s")
        );
        assert_eq!(step_of(e), HandshakeStep::Greeting);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn connect_gives_up_when_qmp_capabilities_gets_no_reply() {
        let (client, mut server) = tokio::io::duplex(4096);
        server.write_all(GREETING).await.unwrap();
        let e = QmpClient::connect("test", ready(client), Duration::from_millis(200))
            .await
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "no reply to qmp_capabilities from test within 200ms"
        );
        assert_eq!(step_of(e), HandshakeStep::Capabilities);
    }

    #[tokio::test]
    async fn connect_gives_up_when_the_connection_never_completes() {
        let never = std::future::pending::<std::io::Result<DuplexStream>>();
        let e = QmpClient::connect("tcp:10.0.0.2:4445", never, Duration::from_millis(100))
            .await
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "no connection to tcp:10.0.0.2:4445 within 100ms"
        );
    }

    #[tokio::test]
    async fn connect_names_the_peer_when_connecting_fails() {
        let refused = std::future::ready(Err::<DuplexStream, _>(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        let e = QmpClient::connect("unix:/x", refused, Duration::from_secs(1))
            .await
            .err()
            .unwrap();
        assert!(
            e.to_string().starts_with("cannot connect to unix:/x: "),
            "{e}"
        );
    }

    #[tokio::test]
    async fn connect_refuses_a_server_that_is_not_qmp() {
        let (client, mut server) = tokio::io::duplex(4096);
        server.write_all(b"{\"hello\": 1}\n").await.unwrap();
        let e = QmpClient::connect("test", ready(client), Duration::from_secs(1))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, QmpClientError::Protocol(_)), "{e}");
    }

    struct Echo;

    #[async_trait]
    impl Handler for Echo {
        async fn execute(&self, _name: &str, args: Args) -> Result<Value, QmpError> {
            Ok(Value::Object(args.0))
        }

        fn commands(&self) -> Vec<&'static str> {
            vec!["echo"]
        }
    }

    #[tokio::test]
    async fn connect_negotiates_with_our_server_and_runs_commands() {
        let (client, server) = tokio::io::duplex(4096);
        let srv = QmpServer::new(Arc::new(Echo), "test");
        tokio::spawn(async move { srv.serve_stream(server).await });
        let mut c = QmpClient::connect("test", ready(client), Duration::from_secs(5))
            .await
            .unwrap();
        let r = c.execute("echo", json!({"a": 1})).await.unwrap();
        assert_eq!(r, json!({"a": 1}));
    }

    #[test]
    fn connect_over_a_unix_socket_can_run_on_any_worker() {
        fn send<T: Send>(_: &T) {}
        let f = QmpClient::connect(
            "unix:/x",
            tokio::net::UnixStream::connect("/x"),
            Duration::from_secs(1),
        );
        send(&f);
    }
}
