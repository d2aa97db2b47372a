//! Silent and idle control clients give their connection back: a session that does not finish
//! `qmp_capabilities` in time, or sends nothing for the idle timeout, is closed.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use qmp::{Args, Handler, QmpError, QmpServer};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};

struct NoCommands;

#[async_trait]
impl Handler for NoCommands {
    async fn execute(&self, name: &str, _args: Args) -> Result<Value, QmpError> {
        Err(QmpError::not_found(name))
    }

    fn commands(&self) -> Vec<&'static str> {
        Vec::new()
    }
}

/// A client end of a session served with the given timeouts, past the greeting.
async fn connect(negotiation: Duration, idle: Duration) -> BufReader<DuplexStream> {
    let server = QmpServer::with_timeouts(Arc::new(NoCommands), "test", negotiation, idle);
    let (client, server_end) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move { server.serve_stream(server_end).await });
    let mut client = BufReader::new(client);
    let greeting = next_line(&mut client).await.expect("no greeting");
    assert!(greeting.contains("\"QMP\""), "{greeting}");
    client
}

/// The next line from the server, or `None` once it has closed the session.
async fn next_line(c: &mut BufReader<DuplexStream>) -> Option<String> {
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(10), c.read_line(&mut line))
        .await
        .expect("the server neither answered nor closed")
        .unwrap();
    (n > 0).then_some(line)
}

async fn execute(c: &mut BufReader<DuplexStream>, cmd: &str) -> String {
    let msg = format!("{{\"execute\": \"{cmd}\"}}\r\n");
    c.get_mut().write_all(msg.as_bytes()).await.unwrap();
    next_line(c).await.expect("closed instead of answering")
}

#[tokio::test]
async fn a_client_that_never_negotiates_is_closed_after_the_negotiation_timeout() {
    let mut c = connect(Duration::from_millis(200), Duration::from_secs(60)).await;

    let started = tokio::time::Instant::now();
    let line = next_line(&mut c).await;

    assert_eq!(line, None);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn commands_before_negotiation_do_not_extend_the_negotiation_timeout() {
    let mut c = connect(Duration::from_millis(1000), Duration::from_secs(60)).await;

    for _ in 0..3 {
        let reply = execute(&mut c, "query-version").await;
        assert!(
            reply.contains("Expecting capabilities negotiation"),
            "{reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(next_line(&mut c).await, None);
}

#[tokio::test]
async fn a_negotiated_session_is_not_held_to_the_negotiation_timeout() {
    let mut c = connect(Duration::from_millis(100), Duration::from_secs(60)).await;
    assert!(execute(&mut c, "qmp_capabilities").await.contains("return"));

    tokio::time::sleep(Duration::from_millis(400)).await;

    assert!(execute(&mut c, "query-version").await.contains("return"));
}

#[tokio::test]
async fn an_idle_session_is_closed_after_the_idle_timeout_and_commands_keep_it_open() {
    let mut c = connect(Duration::from_secs(60), Duration::from_millis(1000)).await;
    assert!(execute(&mut c, "qmp_capabilities").await.contains("return"));
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(execute(&mut c, "query-version").await.contains("return"));
    }

    let started = tokio::time::Instant::now();
    let line = next_line(&mut c).await;

    assert_eq!(line, None);
    assert!(started.elapsed() >= Duration::from_millis(800));
}
