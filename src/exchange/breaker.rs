//! A circuit breaker in front of the token endpoint.
//!
//! When the IdP is down, every cache miss would otherwise wait for a connect error or the full
//! `exchange.timeout`, and a recovering IdP would be hit by every client's retry at once. The
//! breaker counts consecutive failures: the IdP unavailable (transport errors, timeouts, 5xx,
//! 429), and the IdP refusing the proxy itself (`invalid_client`, any 401/403): a proxy with a
//! wrong secret must not send every request to the IdP (Keycloak locks such clients out).
//!
//! - **Closed**: calls go through. After [`DEFAULT_FAILURE_THRESHOLD`] consecutive failures
//!   the circuit opens.
//! - **Open**: no call is made for [`DEFAULT_COOL_DOWN`]; every exchange is answered
//!   `Unavailable` at once, with `Retry-After` = the remaining cool-down.
//! - **Half-open**: after the cool-down exactly one call (the probe) goes through; others are
//!   answered `Unavailable` with [`PROBE_RETRY_AFTER`] while it runs. A probe that reaches the
//!   IdP closes the circuit; a probe that fails reopens it for another cool-down.
//!
//! Any other answer from the IdP (a 200, or a 4xx refusing the subject token) proves the IdP
//! is up and the proxy welcome, and resets the count. An IdP that answers with `Retry-After`
//! holds the circuit open that long, whatever the count (RFC 9110 §10.2.3).
//!
//! Time is [`tokio::time::Instant`], so tests drive the breaker with a paused clock.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Consecutive availability failures that open the circuit: enough to ride out a single
/// dropped connection or a rolling restart of one IdP replica, few enough that a dead IdP
/// costs at most this many timeouts before requests fail fast.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
/// How long the circuit stays open before one probe is let through: long enough to take the
/// load off a struggling IdP, short enough that recovery is noticed within seconds.
pub const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(10);
/// `Retry-After` given while the half-open probe is in flight: it will be decided shortly.
pub const PROBE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What one call told about the IdP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// It answered, and not against the proxy.
    Up,
    /// It could not be reached, failed (5xx, 429), or refused the proxy's own credentials.
    Down,
    /// It asked not to be called for this long (`Retry-After`).
    Resting(Duration),
}

/// The breaker's thresholds. The defaults are the consts above; tests shorten them through
/// [`super::ExchangerOptions`] (there is deliberately no config key for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive availability failures that open the circuit (at least 1).
    pub failure_threshold: u32,
    /// Time the circuit stays open before the half-open probe.
    pub cool_down: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            cool_down: DEFAULT_COOL_DOWN,
        }
    }
}

/// The breaker's state, as seen from outside (for tests and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; `failures` consecutive availability failures so far.
    Closed { failures: u32 },
    /// No calls until `until`.
    Open { until: Instant },
    /// The cool-down has passed; `probing` while the single probe is in flight.
    HalfOpen { probing: bool },
}

/// The circuit breaker; shared by every exchange of one [`super::Exchanger`].
#[derive(Debug)]
pub(crate) struct Breaker {
    settings: BreakerSettings,
    state: Mutex<BreakerState>,
}

/// Permission to make one call; report its outcome with [`Permit::record`]. A permit dropped
/// without a record (the call was cancelled, or never reached the IdP) changes nothing,
/// except that a dropped probe lets the next caller probe instead.
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Breaker {
    pub(crate) fn new(settings: BreakerSettings) -> Self {
        let settings = BreakerSettings {
            failure_threshold: settings.failure_threshold.max(1),
            ..settings
        };
        Self {
            settings,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
        }
    }

    /// The current state.
    pub(crate) fn state(&self) -> BreakerState {
        *self.lock()
    }

    /// A permit to call the IdP now, or how long the caller should wait (`Retry-After`).
    pub(crate) fn try_acquire(&self, now: Instant) -> Result<Permit<'_>, Duration> {
        let mut state = self.lock();
        match *state {
            BreakerState::Closed { .. } => Ok(Permit {
                breaker: self,
                probe: false,
                recorded: false,
            }),
            BreakerState::Open { until } if now < until => Err(until - now),
            BreakerState::Open { .. } | BreakerState::HalfOpen { probing: false } => {
                *state = BreakerState::HalfOpen { probing: true };
                Ok(Permit {
                    breaker: self,
                    probe: true,
                    recorded: false,
                })
            }
            BreakerState::HalfOpen { probing: true } => Err(PROBE_RETRY_AFTER),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BreakerState> {
        // The state is a plain value, consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Permit<'_> {
    /// Whether the call may still be made at `now`, after a wait: a probe always may; any
    /// other call not once the circuit has opened meanwhile (then, how long until it may
    /// close). Calls queued behind a failing IdP thus fail fast too, rather than each spend
    /// the timeout on an IdP the breaker has already given up on.
    pub(crate) fn still_allowed(&self, now: Instant) -> Result<(), Duration> {
        if self.probe {
            return Ok(());
        }
        match *self.breaker.lock() {
            BreakerState::Closed { .. } => Ok(()),
            BreakerState::Open { until } => Err(until.saturating_duration_since(now)),
            BreakerState::HalfOpen { .. } => Err(PROBE_RETRY_AFTER),
        }
    }

    /// Records what the call told about the IdP.
    pub(crate) fn record(mut self, health: Health, now: Instant) {
        self.recorded = true;
        let settings = self.breaker.settings;
        let mut state = self.breaker.lock();
        *state = match (*state, health) {
            (_, Health::Up) => BreakerState::Closed { failures: 0 },
            (current, Health::Resting(rest)) => {
                let until = now + rest;
                match current {
                    BreakerState::Open { until: later } if later > until => current,
                    _ => BreakerState::Open { until },
                }
            }
            // A failed probe reopens the circuit for a full cool-down.
            (BreakerState::HalfOpen { .. }, Health::Down) => BreakerState::Open {
                until: now + settings.cool_down,
            },
            (BreakerState::Closed { failures }, Health::Down) => {
                let failures = failures.saturating_add(1);
                if failures >= settings.failure_threshold {
                    BreakerState::Open {
                        until: now + settings.cool_down,
                    }
                } else {
                    BreakerState::Closed { failures }
                }
            }
            // Opened meanwhile by concurrent calls (different keys): stay open.
            (open @ BreakerState::Open { .. }, Health::Down) => open,
        };
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            let mut state = self.breaker.lock();
            if *state == (BreakerState::HalfOpen { probing: true }) {
                *state = BreakerState::HalfOpen { probing: false };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: BreakerSettings = BreakerSettings {
        failure_threshold: 3,
        cool_down: Duration::from_secs(10),
    };

    fn fail(b: &Breaker, now: Instant) {
        b.try_acquire(now)
            .expect("permit")
            .record(Health::Down, now);
    }

    #[test]
    fn a_call_that_waited_while_the_circuit_opened_is_not_made() {
        let b = Breaker::new(SETTINGS);
        let t0 = Instant::now();
        let waiting = b.try_acquire(t0).expect("permit while closed");
        assert_eq!(waiting.still_allowed(t0), Ok(()));
        for _ in 0..SETTINGS.failure_threshold {
            fail(&b, t0);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(waiting.still_allowed(t1), Err(Duration::from_secs(9)));
        drop(waiting);
        assert!(
            matches!(b.state(), BreakerState::Open { .. }),
            "dropping it changes nothing"
        );
        // After the cool-down the probe goes; a call that waited meanwhile does not.
        let t2 = t0 + SETTINGS.cool_down;
        let probe = b.try_acquire(t2).expect("probe");
        assert_eq!(probe.still_allowed(t2), Ok(()));
    }

    #[test]
    fn retry_after_holds_the_circuit_open_that_long() {
        let b = Breaker::new(SETTINGS);
        let t0 = Instant::now();
        b.try_acquire(t0)
            .expect("permit")
            .record(Health::Resting(Duration::from_secs(120)), t0);
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t0 + Duration::from_secs(120)
            },
            "one answer with Retry-After is enough"
        );
        let wait = b
            .try_acquire(t0 + Duration::from_secs(100))
            .expect_err("still open past the cool-down");
        assert_eq!(wait, Duration::from_secs(20));
        assert!(
            b.try_acquire(t0 + Duration::from_secs(120)).is_ok(),
            "then a probe"
        );
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let b = Breaker::new(SETTINGS);
        let t0 = Instant::now();
        fail(&b, t0);
        fail(&b, t0);
        assert_eq!(b.state(), BreakerState::Closed { failures: 2 });
        fail(&b, t0);
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t0 + SETTINGS.cool_down
            }
        );
        let wait = b
            .try_acquire(t0 + Duration::from_secs(4))
            .expect_err("open");
        assert_eq!(wait, Duration::from_secs(6));
    }

    #[test]
    fn an_answer_from_the_idp_resets_the_count() {
        let b = Breaker::new(SETTINGS);
        let t0 = Instant::now();
        fail(&b, t0);
        fail(&b, t0);
        b.try_acquire(t0).expect("permit").record(Health::Up, t0);
        fail(&b, t0);
        fail(&b, t0);
        assert_eq!(b.state(), BreakerState::Closed { failures: 2 });
    }

    #[test]
    fn after_cool_down_exactly_one_probe_goes_through() {
        let b = Breaker::new(SETTINGS);
        let t0 = Instant::now();
        for _ in 0..3 {
            fail(&b, t0);
        }
        let later = t0 + SETTINGS.cool_down;
        let probe = b.try_acquire(later).expect("probe");
        assert_eq!(b.state(), BreakerState::HalfOpen { probing: true });
        assert_eq!(
            b.try_acquire(later).expect_err("probe in flight"),
            PROBE_RETRY_AFTER
        );
        probe.record(Health::Up, later);
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        assert!(b.try_acquire(later).is_ok());
    }

    #[test]
    fn a_failed_probe_reopens_for_a_full_cool_down() {
        let b = Breaker::new(SETTINGS);
        let t0 = Instant::now();
        for _ in 0..3 {
            fail(&b, t0);
        }
        let t1 = t0 + SETTINGS.cool_down + Duration::from_secs(1);
        b.try_acquire(t1).expect("probe").record(Health::Down, t1);
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t1 + SETTINGS.cool_down
            }
        );
        assert!(b.try_acquire(t1 + Duration::from_secs(9)).is_err());
        assert!(b.try_acquire(t1 + SETTINGS.cool_down).is_ok());
    }

    #[test]
    fn a_dropped_probe_lets_the_next_caller_probe() {
        let b = Breaker::new(SETTINGS);
        let t0 = Instant::now();
        for _ in 0..3 {
            fail(&b, t0);
        }
        let later = t0 + SETTINGS.cool_down;
        drop(b.try_acquire(later).expect("probe"));
        assert_eq!(b.state(), BreakerState::HalfOpen { probing: false });
        assert!(b.try_acquire(later).is_ok());
    }

    #[test]
    fn failures_while_open_do_not_extend_the_cool_down() {
        let b = Breaker::new(SETTINGS);
        let t0 = Instant::now();
        // Three calls in flight before the circuit opened; all fail.
        let permits: Vec<_> = (0..4).map(|_| b.try_acquire(t0).expect("closed")).collect();
        for p in permits {
            p.record(Health::Down, t0 + Duration::from_secs(1));
        }
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t0 + Duration::from_secs(1) + SETTINGS.cool_down
            }
        );
    }

    #[test]
    fn a_zero_threshold_is_treated_as_one() {
        let b = Breaker::new(BreakerSettings {
            failure_threshold: 0,
            ..SETTINGS
        });
        let t0 = Instant::now();
        fail(&b, t0);
        assert!(matches!(b.state(), BreakerState::Open { .. }));
    }
}
