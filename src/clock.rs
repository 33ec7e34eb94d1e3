//! clock: the one source of time, and the one shutdown signal.
//!
//! A leaf: it imports nothing from the crate, and everything may import it.
//! No other module reads `SystemTime::now` (or `Instant::now` for anything
//! but measuring a duration): the domain takes a [`Clock`] as a parameter.
//!
//! # Time
//!
//! Records store wall time as milliseconds since the Unix epoch, as they
//! always have. A `Clock` reads the system's wall clock once, when it is
//! made, and from then on adds the time that tokio's clock says has passed.
//! Both the wall time ([`Clock::now_ms`]) and the sleeps ([`Clock::sleep_until_ms`])
//! are therefore driven by tokio's clock: a test that calls
//! `tokio::time::pause()` and `advance()` moves them together, so expiry,
//! grace periods and schedules are tested without sleeping.
//!
//! The price: a server's notion of wall time does not follow a step of the
//! system clock (an operator setting the date) until it restarts; it follows
//! the monotonic clock, which NTP slews along with the wall clock. Every
//! expiry keyward enforces is relative to when it issued something, so the
//! monotonic clock is the right one to measure it.
//!
//! # Shutdown
//!
//! In the manner of mini-redis: the server owns one [`ShutdownTrigger`];
//! every background task and long stream holds a cloned [`Shutdown`] and
//! selects on [`Shutdown::wait`]. The server then awaits its tasks with a
//! deadline (see `server`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;

/// Wall time in milliseconds since the Unix epoch, advanced by tokio's clock.
///
/// Cheap to clone: clones share one anchor, so they always agree.
#[derive(Clone, Debug)]
pub struct Clock {
    anchor: Arc<Anchor>,
}

#[derive(Debug)]
struct Anchor {
    wall_ms: u64,
    at: Instant,
}

impl Clock {
    /// A clock anchored at the system's wall time now.
    pub fn system() -> Self {
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self::starting_at(wall_ms)
    }

    /// A clock that reads `wall_ms` now (tests that need a fixed date).
    pub fn starting_at(wall_ms: u64) -> Self {
        Self {
            anchor: Arc::new(Anchor {
                wall_ms,
                at: Instant::now(),
            }),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        let passed = Instant::now().saturating_duration_since(self.anchor.at);
        self.anchor
            .wall_ms
            .saturating_add(passed.as_millis().min(u128::from(u64::MAX)) as u64)
    }

    /// Seconds since the Unix epoch (what JWT claims use).
    pub fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }

    /// How long until the wall time `at_ms`; zero if it has passed.
    pub fn until_ms(&self, at_ms: u64) -> Duration {
        Duration::from_millis(at_ms.saturating_sub(self.now_ms()))
    }

    /// The tokio instant at which this clock will read `at_ms`.
    pub fn instant_at_ms(&self, at_ms: u64) -> Instant {
        let now = Instant::now();
        now.checked_add(self.until_ms(at_ms))
            // Far enough away to be "never" (about 30 years).
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
    }

    /// Sleeps until this clock reads `at_ms` (at once if it has passed).
    pub fn sleep_until_ms(&self, at_ms: u64) -> tokio::time::Sleep {
        tokio::time::sleep_until(self.instant_at_ms(at_ms))
    }

    /// Sleeps for `d` on tokio's clock (the same clock `now_ms` follows).
    pub fn sleep(&self, d: Duration) -> tokio::time::Sleep {
        tokio::time::sleep(d)
    }
}

/// Starts a shutdown; owned by the server (or a test). Dropping it also
/// counts as a shutdown, so no task outlives its owner by accident.
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl ShutdownTrigger {
    pub fn new() -> Self {
        Self {
            tx: watch::channel(false).0,
        }
    }

    /// A handle for one task or stream.
    pub fn signal(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
            _never: None,
        }
    }

    /// Tells every holder of a [`Shutdown`] to stop. Idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }
}

impl Default for ShutdownTrigger {
    fn default() -> Self {
        Self::new()
    }
}

/// A task's view of the server's shutdown: select on [`Shutdown::wait`].
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
    /// Held by a [`Shutdown::never`] signal, whose sender nobody else owns.
    _never: Option<Arc<watch::Sender<bool>>>,
}

impl Shutdown {
    /// A signal that never fires (one-off tools and unit tests).
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(false);
        // The signal keeps its own sender: a dropped one reads as "shut down".
        Self {
            rx,
            _never: Some(Arc::new(tx)),
        }
    }

    /// Whether shutdown has begun.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown begins (or its trigger is dropped). Cancel-safe:
    /// use it in `select!` as often as needed.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|stopping| *stopping).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wall_time_and_sleeps_follow_the_paused_clock() {
        let clock = Clock::starting_at(1_000_000);
        assert_eq!(clock.now_ms(), 1_000_000);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now_ms(), 1_090_000);
        let other = clock.clone();
        let woke = tokio::spawn(async move {
            other.sleep_until_ms(1_150_000).await;
            other.now_ms()
        });
        tokio::time::advance(Duration::from_secs(61)).await;
        let at = woke.await.unwrap();
        assert!((1_150_000..=1_151_000).contains(&at), "woke at {at}");
        assert_eq!(clock.until_ms(1_000), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_far_deadline_does_not_overflow() {
        let clock = Clock::starting_at(0);
        let sleep = clock.sleep_until_ms(u64::MAX);
        tokio::select! {
            _ = sleep => panic!("a 'never' deadline fired"),
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }

    #[tokio::test]
    async fn shutdown_reaches_every_clone_and_a_dropped_trigger_counts() {
        let trigger = ShutdownTrigger::new();
        let a = trigger.signal();
        let b = a.clone();
        assert!(!a.is_triggered());
        trigger.trigger();
        a.wait().await;
        b.wait().await;
        assert!(b.is_triggered());

        let trigger = ShutdownTrigger::new();
        let c = trigger.signal();
        drop(trigger);
        c.wait().await;
    }
}
