//! What `/readyz` reports: the start-up work still pending, and whether the proxy is draining.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared readiness state. Components register what they still wait for and clear it when done.
#[derive(Debug, Default)]
pub struct Readiness {
    pending: Mutex<BTreeSet<String>>,
    draining: AtomicBool,
}

impl Readiness {
    /// Marks `what` (e.g. `"jwks"`, or `"corp/jwks"` for a profile's) as not loaded yet.
    pub fn pending(&self, what: impl Into<String>) {
        self.lock().insert(what.into());
    }

    /// Marks `what` as loaded.
    pub fn done(&self, what: &str) {
        self.lock().remove(what);
    }

    /// From now on the proxy reports not ready (after SIGTERM).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// True after [`Readiness::drain`].
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// `Ok` when ready, else a short text naming what is pending.
    pub fn check(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining".into());
        }
        let pending = self.lock();
        if pending.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "pending: {}",
                pending
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_pending_and_reports_draining() {
        let r = Readiness::default();
        assert!(r.check().is_ok());
        r.pending("jwks");
        r.pending("discovery");
        assert_eq!(r.check(), Err("pending: discovery, jwks".into()));
        r.done("discovery");
        r.done("jwks");
        assert!(r.check().is_ok());
        r.drain();
        assert_eq!(r.check(), Err("draining".into()));
    }
}
