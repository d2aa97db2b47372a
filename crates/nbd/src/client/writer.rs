//! The writer task: whole frames in queue order, gathered into vectored sends.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::inflight::Outgoing;

/// The writer task: sends frames in queue order, gathering every frame queued meanwhile into
/// one vectored send, so that pipelined requests share system calls and payloads are not
/// copied on their way to the socket.
pub(super) async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
) -> io::Result<()> {
    let mut pieces: Vec<Bytes> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Outgoing::Request { frame, payload } => {
                    pieces.push(frame);
                    pieces.extend(payload);
                }
                Outgoing::Batch(frames) => {
                    for (frame, payload) in frames {
                        pieces.push(frame);
                        pieces.push(payload);
                    }
                }
                Outgoing::Close => {
                    send_pieces(&mut w, &mut pieces).await?;
                    w.flush().await?;
                    return w.shutdown().await;
                }
            }
            next = rx.try_recv().ok();
        }
        send_pieces(&mut w, &mut pieces).await?;
        // A socket has nothing to flush, but TLS may hold records the socket would not take
        // yet: without a flush they wait for the next request, which may never come.
        w.flush().await?;
    }
    w.flush().await
}

/// Most slices one vectored send takes (Linux's IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// Writes every piece in order with vectored sends, then empties the list. A stream without
/// vectored writes (an in-memory pipe given to [`NbdClient::from_stream`]) gets the pieces
/// copied into one buffer instead, so that frames still share a write.
async fn send_pieces<W: AsyncWrite + Unpin>(w: &mut W, pieces: &mut Vec<Bytes>) -> io::Result<()> {
    if !w.is_write_vectored() && pieces.len() > 1 {
        let mut joined = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
        pieces.iter().for_each(|p| joined.extend_from_slice(p));
        pieces.clear();
        pieces.push(joined.freeze());
    }
    let mut start = 0;
    loop {
        while start < pieces.len() && pieces[start].is_empty() {
            start += 1;
        }
        if start == pieces.len() {
            break;
        }
        let slices: Vec<io::IoSlice<'_>> = pieces[start..]
            .iter()
            .take(MAX_IOVECS)
            .map(|p| io::IoSlice::new(p))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let len = pieces[start].len().min(n);
            pieces[start].advance(len);
            n -= len;
            if pieces[start].is_empty() {
                start += 1;
            }
        }
    }
    pieces.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    /// A stream that, like TLS over a full socket, holds what it was given until flushed.
    #[derive(Default, Clone)]
    struct Holding {
        held: Arc<Mutex<Vec<u8>>>,
        sent: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncWrite for Holding {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.held.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            let held = std::mem::take(&mut *self.held.lock().unwrap());
            self.sent.lock().unwrap().extend(held);
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn every_batch_is_flushed_without_waiting_for_the_next() {
        let stream = Holding::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = stream.clone();
        let task = tokio::spawn(async move { write_frames(w, &mut rx).await });

        tx.send(Outgoing::Request {
            frame: Bytes::from_static(b"frame"),
            payload: Some(Bytes::from_static(b"data")),
        })
        .unwrap();
        let sent = async {
            while stream.sent.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
        };
        let flushed = tokio::time::timeout(std::time::Duration::from_secs(2), sent).await;

        assert!(flushed.is_ok(), "the request stayed in the stream's buffer");
        assert_eq!(&stream.sent.lock().unwrap()[..], b"framedata");
        drop(tx);
        task.await.unwrap().unwrap();
    }
}
