//! A connection's memory is given back when the connection ends, not when the next one is
//! accepted (README "Reliability"): after a peak of connections the listener may accept
//! nothing for hours, and what the ended ones held must not wait for that.
//!
//! A test binary of its own, on jemalloc: it reads the heap bytes that the thread running the
//! server has allocated and not given back (jemalloc's per-thread counters), and the server
//! runs on that one thread (a current-thread runtime; the client's connections are made on
//! another).

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use tikv_jemalloc_ctl::thread::{allocatedp, deallocatedp};
use token_exchange_proxy::config::Shutdown;
use token_exchange_proxy::metrics::Metrics;
use token_exchange_proxy::readiness::Readiness;
use token_exchange_proxy::server::serve;
use token_exchange_proxy::shutdown::Drain;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes this thread has allocated and not freed (wrapping: a block may be freed by another).
fn live() -> i64 {
    let allocated = allocatedp::read().expect("thread.allocatedp").get();
    let freed = deallocatedp::read().expect("thread.deallocatedp").get();
    allocated.wrapping_sub(freed) as i64
}

fn signed(n: usize) -> i64 {
    i64::try_from(n).expect("small")
}

const CONNECTIONS: usize = 200;
const PATIENCE: Duration = Duration::from_secs(10);

/// Opens `n` connections to `addr`, each answered once, holds them all open, then closes them.
fn peak_of_connections(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(PATIENCE)).expect("read timeout");
            s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .expect("send");
            let mut answer = Vec::new();
            let mut buf = [0u8; 512];
            while !answer.ends_with(b"ok") {
                let n = s.read(&mut buf).expect("answer");
                assert!(n > 0, "connection closed before the answer");
                answer.extend_from_slice(&buf[..n]);
            }
            assert!(answer.starts_with(b"HTTP/1.1 200"), "answer: {answer:?}");
            s
        })
        .collect()
}

/// Waits until `check` holds, for up to [`PATIENCE`].
async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < PATIENCE {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

#[tokio::test]
async fn an_ended_connection_gives_its_memory_back_before_the_next_is_accepted() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let metrics = Arc::new(Metrics::with_profiles(&[]));
    let drain = Drain::default();
    let service = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let server = tokio::spawn(serve(
        listener,
        move |_peer| service,
        None,
        Arc::new(Readiness::default()),
        drain.clone(),
        Shutdown {
            drain_delay: Duration::ZERO,
            timeout: Duration::from_secs(1),
        },
        metrics.clone(),
    ));
    let open = || metrics.open_connections.load(Ordering::Relaxed);

    // A first round: whatever is made once and kept (timer levels, the date cache, the task
    // set's own room) is in the baseline, not in what is compared with it. Then one
    // connection more, whose accept would have released the first round's tasks if nothing
    // else had.
    for n in [CONNECTIONS, 1] {
        let round = tokio::task::spawn_blocking(move || peak_of_connections(addr, n));
        drop(round.await.expect("warm-up"));
        assert!(eventually(|| open() == 0).await, "{} still open", open());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = live();

    let held = tokio::task::spawn_blocking(move || peak_of_connections(addr, CONNECTIONS))
        .await
        .expect("connections");
    let peak = live();
    assert_eq!(open(), CONNECTIONS as u64);
    let per_connection = (peak - baseline) / signed(CONNECTIONS);
    assert!(
        per_connection > 1024,
        "an open connection holds {per_connection} bytes: the counter sees nothing"
    );
    drop(held);
    assert!(eventually(|| open() == 0).await, "{} still open", open());

    // No connection is accepted from here on: only the end of each one can give back what
    // it held.
    let back = eventually(|| live() - baseline < signed(CONNECTIONS) * 64).await;
    let kept = (live() - baseline) / signed(CONNECTIONS);
    assert!(
        back,
        "each ended connection still holds {kept} bytes (open: {per_connection} bytes each)"
    );

    drain.requested.fire();
    tokio::time::timeout(PATIENCE, server)
        .await
        .expect("the listener stops")
        .expect("server task");
}
