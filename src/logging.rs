//! Log set-up: JSON or text lines on stdout, filtered by `log.level`.
//!
//! Nothing the proxy logs contains a token, a secret, an `Authorization` or `Cookie` value or a
//! query string: the access line carries the path only, and errors are logged by kind.
//!
//! Lines are written to stdout in batches: every [`FLUSH_INTERVAL`], whenever
//! [`FLUSH_BYTES`] have gathered, and at shutdown ([`flush`]). One `write` per request would
//! cost a system call on the hot path; the batching bounds what a crash can lose to the last
//! fraction of a second (proxies such as Envoy flush their access logs once a second).

use std::io::Write;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{Log, LogFormat};

/// Longest time a log line waits in the buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A buffer this full is written at once.
pub const FLUSH_BYTES: usize = 64 * 1024;

/// Lines not yet written to stdout.
static PENDING: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

fn pending() -> &'static Mutex<Vec<u8>> {
    PENDING.get_or_init(|| Mutex::new(Vec::with_capacity(FLUSH_BYTES)))
}

/// Writes every buffered line to stdout. Called periodically, and by `main` before exiting.
pub fn flush() {
    let mut buf = pending().lock().unwrap_or_else(PoisonError::into_inner);
    write_out(&mut buf);
}

/// Writes `buf` to stdout and empties it. The caller holds the buffer's lock, which keeps the
/// lines in order.
fn write_out(buf: &mut Vec<u8>) {
    if buf.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    // Nowhere to report a failed log write; the lines are dropped rather than kept forever.
    let _ = out.write_all(buf);
    let _ = out.flush();
    buf.clear();
}

/// The [`MakeWriter`] handing the formatter a writer into the shared buffer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Batched;

/// Appends one formatted event to the buffer.
#[derive(Debug)]
pub struct BatchWriter;

impl Write for BatchWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut buf = pending().lock().unwrap_or_else(PoisonError::into_inner);
        buf.extend_from_slice(bytes);
        if buf.len() >= FLUSH_BYTES {
            write_out(&mut buf);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Batched {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        BatchWriter
    }
}

/// Installs the global subscriber and starts the flushing thread. Call once, from `main`.
pub fn init(config: &Log) {
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Batched);
    match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
    let spawned = std::thread::Builder::new()
        .name("log-flush".into())
        .spawn(|| {
            loop {
                std::thread::sleep(FLUSH_INTERVAL);
                flush();
            }
        });
    if spawned.is_err() {
        // Without the thread lines still go out when the buffer fills and at exit.
        eprintln!("cannot start the log flushing thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_gather_until_flushed() {
        let mut w = Batched.make_writer();
        w.write_all(b"{\"a\":1}\n").expect("write");
        assert!(pending().lock().expect("lock").ends_with(b"{\"a\":1}\n"));
        flush();
        assert!(pending().lock().expect("lock").is_empty());
    }
}
