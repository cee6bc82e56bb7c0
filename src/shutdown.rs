//! Signals and the drain sequence (README "Shutdown").
//!
//! SIGTERM or SIGINT → `/readyz` 503 → keep serving for `shutdown.drain_delay` → stop
//! accepting → in-flight requests get up to `shutdown.timeout`, and open event streams end at
//! their next event boundary → exit 0.

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
        self.wait().await;
    }

    /// [`Trigger::fired`] as a future that borrows nothing (to keep in a response body).
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            // An error means every sender is gone: nobody can fire it any more.
            let _ = rx.wait_for(|v| *v).await;
        }
    }

    /// Whether the trigger has fired.
    pub fn is_fired(&self) -> bool {
        *self.tx.borrow()
    }
}

/// The two moments of the drain sequence.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    /// Shutdown was requested (SIGTERM): not ready, still serving.
    pub requested: Trigger,
    /// The listener has closed: in-flight requests finish, and open event streams end at
    /// their next event boundary, so that their clients reconnect elsewhere.
    pub closing: Trigger,
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
