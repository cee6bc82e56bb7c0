//! SIGTERM: readiness turns 503, in-flight requests finish, the process exits 0.

use std::time::{Duration, Instant};

use crate::support::{self, echo};

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let backend = echo().await;
    let trust = support::Trust::start().await;
    let mut proc = support::ProxyProcess::spawn(&trust.passthrough(
        &backend.url(),
        "",
        "",
        "shutdown: {drain_delay: 1s, timeout: 10s}\n",
    ));
    let admin = proc.admin_addr;
    support::wait_ready(admin).await;

    let url = format!("http://{}/delay?ms=2000", proc.addr);
    let token = trust.token.clone();
    let in_flight = tokio::spawn(async move {
        let resp = support::client()
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        (resp.status(), resp.text().await.expect("body"))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let terminated = Instant::now();
    proc.terminate();

    let (status, _, body) = support::get(&format!("http://{admin}/readyz")).await;
    assert_eq!(status, 503, "readyz during drain: {body}");
    assert!(body.contains("draining"), "{body}");
    // Still serving during the drain delay.
    let (status, _, _) =
        support::get_bearer(&format!("http://{}/x", proc.addr), &trust.token).await;
    assert_eq!(status, 200);

    let (status, body) = in_flight.await.expect("join");
    assert_eq!(status, 200);
    assert_eq!(body, "done");
    let code = tokio::task::spawn_blocking(move || proc.wait_exit(Duration::from_secs(15)))
        .await
        .expect("join");
    assert_eq!(code, Some(0));
    assert!(
        terminated.elapsed() >= Duration::from_millis(1000),
        "exited before the drain delay"
    );
}
