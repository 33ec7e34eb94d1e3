//! Work that reads a whole table or prefix (a governance report, a list of
//! secrets, leases or identities, a scan match), run on tokio's blocking
//! pool instead of the thread that serves the caller's connection.
//!
//! On a lane (`server::lanes`) one thread serves every call of the
//! connections handed to it. A report over a million token records would
//! hold all of them up for as long as it reads; on the shared runtime it
//! would hold one of its few workers. Run through [`Offload::run`], it holds
//! a thread of the blocking pool instead, and the connection's thread goes
//! on serving the other calls.
//!
//! So that a flood of such calls cannot fill the blocking pools with
//! threads, an [`Offload`] lets at most `at_once` works run at once on a
//! node, and `per_caller` of them for one caller. A call
//! waits for its turn on the runtime, holding no thread, and is refused
//! ([`FailureKind::Exhausted`]) once it has waited `wait`. A call whose
//! client leaves before its work has started does no work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::call::{Failure, FailureKind};

/// Listings ([`Work::Listing`]) that may run at once on a node.
pub const LISTINGS_AT_ONCE: usize = 8;
/// Of those, how many one caller may run at once: a flood from one
/// caller queues behind its own turns and leaves the others to the rest.
pub const LISTINGS_PER_CALLER: usize = 2;
/// Reports ([`Work::Report`]) that may run at once on a node; they have
/// turns of their own, so no flood of listings delays one.
pub const REPORTS_AT_ONCE: usize = 2;
/// Of those, how many one caller may run at once.
pub const REPORTS_PER_CALLER: usize = 1;
/// How long a listing or report waits for its turn before it is refused.
pub const LISTING_WAIT: Duration = Duration::from_secs(10);
/// Scan matches (`Scan/Match`) that may run at once on a node, each on the
/// blocking pool. They have turns of their own.
pub const MATCHES_AT_ONCE: usize = 4;
/// Of those, how many one caller may run at once.
pub const MATCHES_PER_CALLER: usize = 2;
/// How long a match waits for its turn before it is refused.
pub const MATCH_WAIT: Duration = Duration::from_secs(10);

/// Which turns a work takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A listing: a prefix (secrets, leases) or a table (identities,
    /// certificates, attestations), and the CRL. A caller with list on a
    /// prefix of its own can make these, and any token can ask for the CRL.
    Listing,
    /// The governance report and the dashboard's overview: they need read
    /// on `sys/governance`, an operator's right.
    Report,
    /// A scan match (`Scan/Match`): on etcd it may read the whole store's
    /// metadata for the node's fingerprint index.
    Match,
}

/// The node's turns of each [`Work`] (`Core::offload`).
pub struct Offloads {
    pub listings: Offload,
    pub reports: Offload,
    pub matches: Offload,
}

impl Offloads {
    pub fn new() -> Self {
        Self {
            listings: Offload::new(
                LISTINGS_AT_ONCE,
                LISTINGS_PER_CALLER,
                LISTING_WAIT,
                "listings",
            ),
            reports: Offload::new(REPORTS_AT_ONCE, REPORTS_PER_CALLER, LISTING_WAIT, "reports"),
            matches: Offload::new(
                MATCHES_AT_ONCE,
                MATCHES_PER_CALLER,
                MATCH_WAIT,
                "scan matches",
            ),
        }
    }

    pub fn of(&self, work: Work) -> &Offload {
        match work {
            Work::Listing => &self.listings,
            Work::Report => &self.reports,
            Work::Match => &self.matches,
        }
    }
}

impl Default for Offloads {
    fn default() -> Self {
        Self::new()
    }
}

/// Callers with a turn or waiting for one, past which the table drops the
/// entries nobody holds (a caller that gave up waiting leaves its entry).
const CALLERS_KEPT: usize = 1024;

type Callers = Arc<Mutex<HashMap<String, Arc<Semaphore>>>>;

/// The turns of one kind of long work on the blocking pool.
pub struct Offload {
    slots: Arc<Semaphore>,
    per_caller: usize,
    callers: Callers,
    wait: Duration,
    /// What the work is, plural, for the refusal: "listings".
    what: &'static str,
    /// Calls waiting for a turn now.
    waiting: AtomicUsize,
}

/// A turn: one of the caller's own and one of the node's. Given back when
/// dropped (when the work has returned).
pub struct Turn {
    _shared: OwnedSemaphorePermit,
    own: Option<OwnedSemaphorePermit>,
    caller: String,
    callers: Callers,
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.own.take());
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        // Only the table holds it: nobody has a turn or waits for one.
        if callers
            .get(&self.caller)
            .is_some_and(|own| Arc::strong_count(own) == 1)
        {
            callers.remove(&self.caller);
        }
    }
}

impl Offload {
    /// `at_once` works on the node, of which `per_caller` for one caller.
    pub fn new(at_once: usize, per_caller: usize, wait: Duration, what: &'static str) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(at_once.max(1))),
            per_caller: per_caller.max(1),
            callers: Arc::default(),
            wait,
            what,
            waiting: AtomicUsize::new(0),
        }
    }

    /// How many calls are waiting for a turn now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// The semaphore of `caller`'s own turns.
    fn own_slots(&self, caller: &str) -> Arc<Semaphore> {
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        if callers.len() >= CALLERS_KEPT && !callers.contains_key(caller) {
            callers.retain(|_, own| Arc::strong_count(own) > 1);
        }
        Arc::clone(
            callers
                .entry(caller.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_caller))),
        )
    }

    /// A turn for `caller` (first one of its own, then one of the node's),
    /// or `None` once `wait` has passed without one.
    pub async fn turn(&self, caller: &str) -> Option<Turn> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waited = Waited(&self.waiting);
        let own = self.own_slots(caller);
        let take = async {
            let own = own.acquire_owned().await.ok()?;
            let shared = Arc::clone(&self.slots).acquire_owned().await.ok()?;
            Some(Turn {
                _shared: shared,
                own: Some(own),
                caller: caller.to_owned(),
                callers: Arc::clone(&self.callers),
            })
        };
        tokio::time::timeout(self.wait, take).await.ok()?
    }

    /// Runs `work` on the blocking pool once `caller` has a turn, and gives
    /// its result. The turn is held until `work` returns, also if the caller
    /// has left meanwhile: the bound counts threads, not callers.
    pub async fn run<T, F>(&self, caller: &str, work: F) -> Result<T, Failure>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let Some(turn) = self.turn(caller).await else {
            return Err(Failure::new(
                FailureKind::Exhausted,
                format!(
                    "too many {} are running on this node; try again later",
                    self.what
                ),
            ));
        };
        let left = Arc::new(AtomicBool::new(false));
        let _left = Left(Arc::clone(&left));
        let joined = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            if left.load(Ordering::Acquire) {
                return None;
            }
            Some(work())
        })
        .await;
        match joined {
            Ok(Some(done)) => Ok(done),
            // `None` only reaches a caller that has left, which reads nothing.
            Ok(None) | Err(_) => Err(Failure::internal(format!(
                "a work of {} stopped unexpectedly",
                self.what
            ))),
        }
    }
}

/// Counts a wait for a turn off when it ends (a turn, a timeout, or the
/// caller gone).
struct Waited<'a>(&'a AtomicUsize);

impl Drop for Waited<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Set when the caller's future is dropped (its client left): work not
/// started by then is not done.
struct Left(Arc<AtomicBool>);

impl Drop for Left {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_another_thread_and_gives_its_result() {
        let offload = Offload::new(2, 2, Duration::from_secs(10), "tests");
        let here = std::thread::current().id();
        let (there, sum) = offload
            .run("a", || (std::thread::current().id(), 2 + 3))
            .await
            .unwrap();
        assert_ne!(there, here, "the work ran on the caller's thread");
        assert_eq!(sum, 5);
    }

    /// At most `at_once` turns are out; another waits for one to be given
    /// back, and past the wait gets none.
    #[tokio::test(start_paused = true)]
    async fn turns_are_bounded_and_a_turn_given_back_is_taken_by_a_waiter() {
        let offload = Arc::new(Offload::new(2, 2, Duration::from_secs(10), "tests"));
        let first = offload.turn("a").await.unwrap();
        let _second = offload.turn("b").await.unwrap();
        // Paused clock: the wait runs out at once, no real time passes.
        assert!(offload.turn("c").await.is_none());
        let third = tokio::spawn({
            let offload = Arc::clone(&offload);
            async move { offload.turn("c").await.is_some() }
        });
        tokio::task::yield_now().await;
        drop(first);
        assert!(third.await.unwrap());
    }

    /// One caller holds at most `per_caller` turns: its next calls wait
    /// behind its own, and another caller gets one of the node's turns that
    /// are left at once, however many of the first one's calls wait.
    #[tokio::test(start_paused = true)]
    async fn one_caller_cannot_take_the_turns_of_the_others() {
        let offload = Arc::new(Offload::new(4, 2, Duration::from_secs(10), "tests"));
        let first = offload.turn("flood").await.unwrap();
        let second = offload.turn("flood").await.unwrap();
        // Sixteen more calls of the flood, each holding its turn, once it
        // has one, until its sender is dropped.
        let mut releases = Vec::new();
        let waiting: Vec<_> = (0..16)
            .map(|_| {
                let offload = Arc::clone(&offload);
                let (release, released) = tokio::sync::oneshot::channel::<()>();
                releases.push(release);
                tokio::spawn(async move {
                    let turn = offload.turn("flood").await;
                    let _ = released.await;
                    turn.is_some()
                })
            })
            .collect();
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        // Paused clock: a turn that is not free at once would come only
        // after the wait, when the flood's calls have run out of theirs.
        let other = offload.turn("operator").await;
        assert!(other.is_some(), "the flood took the other caller's turns");
        let other_again = offload.turn("operator").await;
        assert!(other_again.is_some());
        drop((first, second, other, other_again));
        drop(releases);
        let mut served = 0;
        for waiter in waiting {
            served += usize::from(waiter.await.unwrap());
        }
        assert_eq!(served, 16, "each call of the flood had its turn in time");
    }

    /// The table of callers keeps no entry that nobody holds.
    #[tokio::test]
    async fn a_caller_that_has_given_its_turns_back_is_forgotten() {
        let offload = Offload::new(2, 2, Duration::from_secs(10), "tests");
        let turn = offload.turn("a").await.unwrap();
        assert_eq!(offload.callers.lock().unwrap().len(), 1);
        drop(turn);
        assert!(offload.callers.lock().unwrap().is_empty());
        assert_eq!(offload.run("b", || 1).await.unwrap(), 1);
        assert!(offload.callers.lock().unwrap().is_empty());
    }

    // Real time: tokio's paused clock does not move while a blocking task
    // runs, and the first work blocks until the end. The refusal comes
    // after the wait whatever the machine's speed: the only turn is held.
    #[tokio::test]
    async fn works_take_turns_and_a_call_that_waits_too_long_is_refused() {
        let offload = Arc::new(Offload::new(1, 1, Duration::from_millis(200), "tests"));
        let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let first = {
            let offload = Arc::clone(&offload);
            tokio::spawn(async move {
                offload
                    .run("a", move || {
                        entered_tx.send(()).unwrap();
                        released.recv().unwrap();
                        "first"
                    })
                    .await
            })
        };
        // The first work holds the only turn until it is released.
        tokio::task::spawn_blocking(move || entered.recv().unwrap())
            .await
            .unwrap();
        let refused = offload.run("b", || "second").await.unwrap_err();
        assert_eq!(refused.kind(), FailureKind::Exhausted);
        assert!(
            refused.message().contains("too many tests"),
            "{}",
            refused.message()
        );
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), "first");
        // Its turn is back.
        assert_eq!(offload.run("b", || "third").await.unwrap(), "third");
    }

    #[tokio::test]
    async fn a_work_that_panics_is_an_internal_failure_and_gives_its_turn_back() {
        let offload = Offload::new(1, 1, Duration::from_secs(10), "tests");
        let failed = offload
            .run("a", || -> u32 { panic!("a bug in the work") })
            .await
            .unwrap_err();
        assert_eq!(failed.kind(), FailureKind::Internal);
        assert!(
            !failed.message().contains("a bug in the work"),
            "{}",
            failed.message()
        );
        assert_eq!(offload.run("a", || 7).await.unwrap(), 7);
    }
}
