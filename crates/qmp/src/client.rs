//! A QMP client, for `coloblk ctl` and for a primary that checkpoints its secondary.

use std::collections::VecDeque;
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
    #[error("control connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("control protocol: {0}")]
    Protocol(String),
    #[error("no reply within {0:?}")]
    TimedOut(Duration),
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
    /// Reads the greeting and negotiates capabilities.
    pub async fn handshake(stream: S) -> Result<Self, QmpClientError> {
        let (r, w) = tokio::io::split(stream);
        let mut c = QmpClient {
            r,
            w,
            framer: Framer::new(),
            events: VecDeque::new(),
            next_id: 1,
        };
        let greeting = c.next_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpClientError::Protocol(format!(
                "not a QMP greeting: {greeting}"
            )));
        }
        c.execute("qmp_capabilities", json!({})).await?;
        Ok(c)
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
