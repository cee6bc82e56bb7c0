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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// Written in milliseconds with three decimals (microsecond resolution).
    pub duration: Duration,
    pub bytes: u64,
    pub outcome: &'a str,
    pub cache: &'a str,
    pub sub: &'a str,
    pub body: &'a str,
}

/// Writes the access line for `r`: to stdout (batched) in the format chosen at [`init`],
/// or nowhere before [`init`].
pub fn access(r: &AccessRecord<'_>) {
    let Some(format) = FORMAT.get() else { return };
    let ts = Timestamp::now();
    let mut buf = pending().lock().unwrap_or_else(PoisonError::into_inner);
    format_access(*format, &ts, r, &mut buf);
    if buf.len() >= FLUSH_BYTES {
        write_out(&mut buf);
    }
}

/// One value of an access line.
enum Field<'a> {
    /// Written as it is in text lines (values the proxy chose, or parsed from the request line).
    Plain(&'a str),
    /// From a token: debug-quoted in text lines, so that it cannot forge a line break.
    Untrusted(&'a str),
    Uint(u64),
    Millis(Duration),
}

/// Appends the access line for `r`, stamped `ts`, to `line`. Numbers are written by hand:
/// this runs once per request, and `fmt` machinery costs several times more.
pub fn format_access(format: LogFormat, ts: &Timestamp, r: &AccessRecord<'_>, line: &mut Vec<u8>) {
    let fields = [
        ("method", Field::Plain(r.method)),
        ("path", Field::Plain(r.path)),
        ("status", Field::Uint(u64::from(r.status))),
        ("duration_ms", Field::Millis(r.duration)),
        ("bytes", Field::Uint(r.bytes)),
        ("outcome", Field::Plain(r.outcome)),
        ("cache", Field::Plain(r.cache)),
        ("sub", Field::Untrusted(r.sub)),
        ("body", Field::Plain(r.body)),
    ];
    match format {
        LogFormat::Json => {
            line.extend_from_slice(b"{\"timestamp\":\"");
            ts.write(line);
            line.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
            for (name, value) in &fields {
                line.extend_from_slice(b",\"");
                line.extend_from_slice(name.as_bytes());
                line.extend_from_slice(b"\":");
                match value {
                    Field::Plain(s) | Field::Untrusted(s) => json_str(line, s),
                    Field::Uint(n) => push_uint(line, *n),
                    Field::Millis(d) => push_millis(line, *d),
                }
            }
            line.extend_from_slice(b",\"target\":\"access\"}\n");
        }
        LogFormat::Text => {
            ts.write(line);
            line.extend_from_slice(b"  INFO access: request");
            for (name, value) in &fields {
                line.push(b' ');
                line.extend_from_slice(name.as_bytes());
                line.push(b'=');
                match value {
                    Field::Plain(s) => line.extend_from_slice(s.as_bytes()),
                    Field::Untrusted(s) => {
                        let _ = write!(line, "{s:?}");
                    }
                    Field::Uint(n) => push_uint(line, *n),
                    Field::Millis(d) => push_millis(line, *d),
                }
            }
            line.push(b'\n');
        }
    }
}

/// A JSON string literal.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Most values (methods, outcomes, paths, subjects) need no escaping: copied as they are.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Serialising a `&str` into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// `n` in decimal.
fn push_uint(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// `n` in decimal, zero-padded to `width` digits.
fn push_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    let mut rest = n;
    while len < width || rest > 0 {
        digits[len] = b'0' + (rest % 10) as u8;
        rest /= 10;
        len += 1;
        if len == digits.len() {
            break;
        }
    }
    out.extend(digits[..len].iter().rev());
}

/// `d` in milliseconds with three decimals, rounded to the nearest microsecond.
fn push_millis(out: &mut Vec<u8>, d: Duration) {
    let micros = u64::try_from(d.as_nanos().saturating_add(500) / 1000).unwrap_or(u64::MAX);
    push_uint(out, micros / 1000);
    out.push(b'.');
    push_padded(out, micros % 1000, 3);
}

/// A UTC time, written as RFC 3339 with microseconds (e.g. `2026-11-27T08:17:00.123456Z`) by
/// humantime. Its formatter costs about 0.1 µs per line (`access_log/timestamp` in
/// `benches/hot_path.rs`; within noise of the hand-written one it replaced), well under 1 % of
/// a cache hit.
#[derive(Debug, Clone, Copy)]
pub struct Timestamp(SystemTime);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// Appends the timestamp to `out`; nothing for a time past the year 9999, which RFC 3339
    /// cannot express.
    pub fn write(&self, out: &mut Vec<u8>) {
        let _ = write!(out, "{}", humantime::format_rfc3339_micros(self.0));
    }
}

impl From<SystemTime> for Timestamp {
    /// `time`, or the Unix epoch for a time before it (humantime formats none earlier).
    fn from(time: SystemTime) -> Self {
        Self(time.max(UNIX_EPOCH))
    }
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

    /// The timestamp written for `secs` and `nanos` after the Unix epoch.
    fn stamp(secs: u64, nanos: u32) -> String {
        let mut out = Vec::new();
        Timestamp::from(UNIX_EPOCH + Duration::new(secs, nanos)).write(&mut out);
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        assert_eq!(stamp(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            stamp(951_782_400, 999_999_999),
            "2000-02-29T00:00:00.999999Z"
        );
        assert_eq!(stamp(1_798_761_600, 0), "2027-01-01T00:00:00.000000Z");
        assert_eq!(
            stamp(1_795_737_600 + 3_723, 42_000),
            "2026-11-27T01:02:03.000042Z"
        );
        let mut out = Vec::new();
        Timestamp::from(UNIX_EPOCH - Duration::from_secs(1)).write(&mut out);
        assert_eq!(out, b"1970-01-01T00:00:00.000000Z", "a clock before 1970");
    }

    #[test]
    fn numbers_are_written_as_fmt_would() {
        for n in [0u64, 7, 10, 999, 1000, 65_535, u64::MAX] {
            let mut out = Vec::new();
            push_uint(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
            for width in [1, 3, 6] {
                let mut out = Vec::new();
                push_padded(&mut out, n, width);
                assert_eq!(out, format!("{n:0width$}").as_bytes());
            }
        }
        for (nanos, text) in [
            (0u64, "0.000"),
            (499, "0.000"),
            (500, "0.001"),
            (1_234_567, "1.235"),
            (12_000_000_000, "12000.000"),
        ] {
            let mut out = Vec::new();
            push_millis(&mut out, Duration::from_nanos(nanos));
            assert_eq!(String::from_utf8(out).expect("utf8"), text, "{nanos} ns");
        }
    }

    fn record() -> AccessRecord<'static> {
        AccessRecord {
            method: "POST",
            path: "/mcp",
            status: 200,
            duration: Duration::from_micros(1_500),
            bytes: 42,
            outcome: "forwarded",
            cache: "hit",
            sub: "alice\nINFO forged",
            body: "complete",
        }
    }

    /// The line for [`record`] at 2026-11-27T00:00:00.000005Z.
    fn line(format: LogFormat) -> Vec<u8> {
        let ts = Timestamp::from(UNIX_EPOCH + Duration::new(1_795_737_600, 5_000));
        let mut out = Vec::new();
        format_access(format, &ts, &record(), &mut out);
        out
    }

    #[test]
    fn json_access_lines_are_json_with_every_field() {
        let out = line(LogFormat::Json);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["timestamp"], "2026-11-27T00:00:00.000005Z");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["bytes"], 42);
        assert_eq!(v["sub"], "alice\nINFO forged");
        assert_eq!(v["cache"], "hit");
        assert_eq!(v["target"], "access");
    }

    #[test]
    fn text_access_lines_stay_on_one_line() {
        let text = String::from_utf8(line(LogFormat::Text)).expect("utf8");
        assert_eq!(
            text,
            "2026-11-27T00:00:00.000005Z  INFO access: request method=POST path=/mcp status=200 duration_ms=1.500 bytes=42 outcome=forwarded cache=hit sub=\"alice\\nINFO forged\" body=complete\n"
        );
    }

    #[test]
    fn json_strings_are_escaped() {
        for s in [
            "a\"b\nc",
            "plain",
            "/mcp/ünï",
            "tab\there",
            "back\\slash",
            "\u{7f}",
            "",
        ] {
            let mut out = Vec::new();
            json_str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).expect("json"), "{s:?}");
        }
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
