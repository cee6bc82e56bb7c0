//! A backend that closes idle keep-alive connections the way uvicorn, gunicorn and aiohttp do,
//! written on raw sockets so that the moment of the close is exact.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the backend treats a connection that has been idle for its keep-alive timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closing {
    /// Closes it (FIN) when the timeout passes, as aiohttp's `keepalive_timeout` does.
    AtTimeout,
    /// Leaves the socket open but, when a request arrives after the timeout, closes the
    /// connection without answering: the request met a connection the backend was closing
    /// (the race of a close and a reuse, made certain).
    RacingTheReuse,
}

/// A running keep-alive backend.
#[derive(Clone, Debug)]
pub struct KeepAliveBackend {
    pub addr: SocketAddr,
    /// Requests answered.
    pub answered: Arc<AtomicUsize>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// Requests dropped unanswered (`RacingTheReuse`).
    pub dropped: Arc<AtomicUsize>,
}

impl KeepAliveBackend {
    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Starts the backend on 127.0.0.1:0: every request is answered `200 ok` on a keep-alive
/// connection idle for at most `keep_alive`.
pub async fn start(keep_alive: Duration, closing: Closing) -> KeepAliveBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = KeepAliveBackend {
        addr: listener.local_addr().expect("addr"),
        answered: Arc::default(),
        connections: Arc::default(),
        dropped: Arc::default(),
    };
    let b = backend.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            b.connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(connection(stream, keep_alive, closing, b.clone()));
        }
    });
    backend
}

async fn connection(
    mut stream: TcpStream,
    keep_alive: Duration,
    closing: Closing,
    b: KeepAliveBackend,
) {
    let mut buf = Vec::new();
    let mut first = true;
    loop {
        let idle_since = tokio::time::Instant::now();
        // Read one request head and its Content-Length body.
        let (head_end, body_len) = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (end + 4, len);
            }
            let mut chunk = [0u8; 4096];
            let read = if first || closing == Closing::RacingTheReuse {
                stream.read(&mut chunk).await
            } else {
                match tokio::time::timeout(keep_alive, stream.read(&mut chunk)).await {
                    Ok(r) => r,
                    Err(_) => return, // idle too long: close
                }
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        while buf.len() < head_end + body_len {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + body_len);
        if !first && closing == Closing::RacingTheReuse && idle_since.elapsed() >= keep_alive {
            b.dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        first = false;
        let reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
        if stream.write_all(reply).await.is_err() {
            return;
        }
        b.answered.fetch_add(1, Ordering::SeqCst);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
