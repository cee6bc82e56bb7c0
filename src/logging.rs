//! Log set-up: JSON or text lines on stdout, filtered by `log.level`.
//!
//! Nothing the proxy logs contains a token, a secret, an `Authorization` or `Cookie` value or a
//! query string: the access line carries the path only, and errors are logged by kind.
//!
//! The access line (one per request, target `access`) is formatted here directly rather than
//! by the generic tracing formatter: it is written on every request, and the generic path
//! costs several times more. It has the same fields and layout as the other lines, and obeys
//! the same `log.level` filter.
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

/// The format chosen at [`init`]; unset until then (no access lines are written).
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

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

/// The fields of one access line.
#[derive(Debug)]
pub struct AccessRecord<'a> {
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    pub status: u16,
    pub duration_ms: f64,
    pub bytes: u64,
    pub outcome: &'a str,
    pub cache: &'a str,
    pub sub: &'a str,
    pub body: &'a str,
}

/// Writes one access line in the configured format (nothing before [`init`]).
pub fn access(r: &AccessRecord<'_>) {
    let Some(format) = FORMAT.get() else { return };
    let mut line = Vec::with_capacity(320);
    let ts = Timestamp::now();
    match format {
        LogFormat::Json => {
            line.extend_from_slice(b"{\"timestamp\":\"");
            ts.write(&mut line);
            line.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\",\"method\":");
            json_str(&mut line, r.method);
            line.extend_from_slice(b",\"path\":");
            json_str(&mut line, r.path);
            let _ = write!(
                line,
                ",\"status\":{},\"duration_ms\":{:.3},\"bytes\":{},\"outcome\":",
                r.status, r.duration_ms, r.bytes
            );
            json_str(&mut line, r.outcome);
            line.extend_from_slice(b",\"cache\":");
            json_str(&mut line, r.cache);
            line.extend_from_slice(b",\"sub\":");
            json_str(&mut line, r.sub);
            line.extend_from_slice(b",\"body\":");
            json_str(&mut line, r.body);
            line.extend_from_slice(b",\"target\":\"access\"}\n");
        }
        LogFormat::Text => {
            ts.write(&mut line);
            // `sub` comes from a token: debug-quoted so that it cannot forge a line break.
            let _ = writeln!(
                line,
                "  INFO access: request method={} path={} status={} duration_ms={:.3} bytes={} outcome={} cache={} sub={:?} body={}",
                r.method,
                r.path,
                r.status,
                r.duration_ms,
                r.bytes,
                r.outcome,
                r.cache,
                r.sub,
                r.body
            );
        }
    }
    let _ = BatchWriter.write_all(&line);
}

/// A JSON string literal.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Serialising a `&str` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A UTC time as RFC 3339 with microseconds, e.g. `2026-11-27T08:17:00.123456Z`.
struct Timestamp {
    secs: u64,
    micros: u32,
}

impl Timestamp {
    fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            secs: d.as_secs(),
            micros: d.subsec_micros(),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        let days = self.secs / 86_400;
        let rem = self.secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        let _ = write!(
            out,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            self.micros
        );
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), by the well-known
/// era/day-of-era decomposition (400-year cycles of 146,097 days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Installs the global subscriber and starts the flushing thread. Call once, from `main`.
pub fn init(config: &Log) {
    let _ = FORMAT.set(config.format);
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
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_819), (2027, 1, 1));
        let mut out = Vec::new();
        Timestamp {
            secs: 1_795_737_600 + 3_723,
            micros: 42,
        }
        .write(&mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "2026-11-27T01:02:03.000042Z"
        );
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut out = Vec::new();
        json_str(&mut out, "a\"b\nc");
        assert_eq!(out, br#""a\"b\nc""#);
    }

    #[test]
    fn lines_gather_until_flushed() {
        let mut w = Batched.make_writer();
        w.write_all(b"{\"a\":1}\n").expect("write");
        assert!(pending().lock().expect("lock").ends_with(b"{\"a\":1}\n"));
        flush();
        assert!(pending().lock().expect("lock").is_empty());
    }
}
