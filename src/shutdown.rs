//! Signals and the drain sequence (README "Shutdown").
//!
//! SIGTERM or SIGINT → `/readyz` 503 → keep serving for `shutdown.drain_delay` → stop
//! accepting → in-flight requests (open SSE streams too) get up to `shutdown.timeout` → exit 0.

use tokio::sync::watch;

/// A one-shot trigger that many tasks can wait for.
#[derive(Clone, Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

impl Default for Trigger {
    fn default() -> Self {
        Self {
            tx: watch::channel(false).0,
        }
    }
}

impl Trigger {
    /// Fires the trigger (idempotent).
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }

    /// Resolves once the trigger has fired.
    pub async fn fired(&self) {
        let mut rx = self.tx.subscribe();
        // An error means the sender is gone, which cannot happen while `self` lives.
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
