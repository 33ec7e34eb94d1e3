//! Group commit: many async writers, one flush.
//!
//! A flush makes durable every write made before it *began*. A caller of
//! [`GroupCommit::durable`] therefore needs a flush that starts after its call:
//!
//! - if no flush is running, it starts round `r = started + 1` itself;
//! - if round `r` is running, its write may have missed it, so it asks for
//!   round `r + 1`, which the runner starts as soon as `r` ends.
//!
//! Every caller that arrives while round `r` runs shares round `r + 1`: under
//! load there are at most two rounds in play whatever the number of callers.
//!
//! A round chained right behind another (callers were already waiting) first
//! lingers for `LINGER` before it begins, so that more writers join it; a
//! caller arriving during the linger joins that round. Under load this means
//! fewer, larger flushes (in sled each one seals a log buffer and writes and
//! syncs it through its thread pool, whatever its size) for at most `LINGER`
//! more latency; a lone caller never lingers.
//!
//! The flush itself is blocking disk I/O and runs in `spawn_blocking`. The loop
//! that chains rounds runs in its own task, so a caller that gives up (its
//! future is dropped) never strands the callers waiting on the same round.
//! The round bookkeeping sits under a std `Mutex` that is never held across an
//! `.await`.
//!
//! The runner is spawned on the runtime the group commit was made on when
//! that is a multi-thread runtime (a server's shared one), so that a busy
//! caller's runtime (a lane, `server::lanes`) does not hold up the rounds of
//! every other caller; otherwise on the caller's. (A current-thread runtime
//! is no home: a test blocked in a synchronous call would hold up every
//! round, and on tokio's paused clock a round on a thread outside the
//! runtime would let the clock jump ahead.) If the runner's runtime ends
//! under it, its guard fails the callers still waiting rather than leave
//! them waiting for ever, and a home found gone is not used again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use super::{Backend, StorageError};

/// How long a chained round waits for more writers before it begins. Chosen
/// by measurement (README, Benchmarks): at 64 logins in flight, 1 ms gave the
/// most logins and Puts per second; 0.3 ms was between; 3 ms was slower.
pub const LINGER: Duration = Duration::from_millis(1);

/// Shares `Backend::flush` between concurrent async callers.
pub struct GroupCommit {
    inner: Arc<Inner>,
    /// The runtime the runner is spawned on: the multi-thread runtime this
    /// group commit was made on (see the module's doc). `None`: the caller's.
    home: Option<tokio::runtime::Handle>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    linger: Duration,
    rounds: Mutex<Rounds>,
    /// The last finished round and its outcome.
    done: watch::Sender<Finished>,
    flushes: AtomicU64,
    /// The home runtime dropped a runner unrun: callers' runtimes from now on.
    home_gone: AtomicBool,
}

/// Round numbers start at 1; 0 means "none yet".
struct Rounds {
    /// The round running now, or the last one that ran.
    started: u64,
    /// The highest round any caller waits for.
    requested: u64,
    /// Whether a runner task is alive (it then owns starting the next round).
    running: bool,
}

#[derive(Clone)]
struct Finished {
    round: u64,
    result: Result<(), StorageError>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("flushes", &self.flush_count())
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self::with_linger(backend, LINGER)
    }

    /// A group commit whose chained rounds linger `linger` (zero: never).
    pub fn with_linger(backend: Arc<dyn Backend>, linger: Duration) -> Self {
        let (done, _) = watch::channel(Finished {
            round: 0,
            result: Ok(()),
        });
        Self {
            inner: Arc::new(Inner {
                backend,
                linger,
                rounds: Mutex::new(Rounds {
                    started: 0,
                    requested: 0,
                    running: false,
                }),
                done,
                flushes: AtomicU64::new(0),
                home_gone: AtomicBool::new(false),
            }),
            home: tokio::runtime::Handle::try_current().ok().filter(|handle| {
                handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            }),
        }
    }

    /// Returns once every write made before this call is on disk, or the
    /// error of the flush that should have made it so.
    ///
    /// Must be called from within a tokio runtime.
    pub async fn durable(&self) -> Result<(), StorageError> {
        let mut done = self.inner.done.subscribe();
        let (target, runner) = {
            let mut rounds = self.inner.rounds();
            // The running round (if any) may have begun before our write.
            let target = rounds.started + 1;
            rounds.requested = rounds.requested.max(target);
            let mut runner = None;
            if !rounds.running {
                rounds.running = true;
                rounds.started = target;
                runner = Some(self.runner());
            }
            (target, runner)
        };
        // Spawned with the lock released: a runtime that has ended drops
        // the runner at once, and its guard takes the lock.
        if let Some((runner, on_home)) = runner {
            match on_home {
                Some(home) => drop(home.spawn(runner)),
                None => drop(tokio::spawn(runner)),
            }
        }
        let finished = done
            .wait_for(|finished| finished.round >= target)
            .await
            .map_err(|_| StorageError::Io("flush: group commit stopped".into()))?;
        // A later round also began after our write: its outcome is ours.
        finished.result.clone()
    }

    /// A runner for the round just marked started, and the home runtime to
    /// spawn it on (`None`: the caller's). Its guard exists before it first
    /// runs, so a runner dropped unpolled fails its callers too.
    fn runner(
        &self,
    ) -> (
        impl std::future::Future<Output = ()> + Send + 'static,
        Option<&tokio::runtime::Handle>,
    ) {
        let home = self
            .home
            .as_ref()
            .filter(|_| !self.inner.home_gone.load(Ordering::Relaxed));
        let guard = Stranded {
            inner: Some(Arc::clone(&self.inner)),
            polled: false,
            on_home: home.is_some(),
        };
        (Inner::run(Arc::clone(&self.inner), guard), home)
    }

    /// How many flushes this group commit has run (failed ones included).
    pub fn flush_count(&self) -> u64 {
        self.inner.flushes.load(Ordering::Relaxed)
    }
}

impl Inner {
    /// The round bookkeeping (never held across an `.await`).
    fn rounds(&self) -> std::sync::MutexGuard<'_, Rounds> {
        self.rounds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs rounds back to back while callers wait for one not yet started.
    /// The first round was marked started by the caller that spawned this
    /// runner; a chained one is marked after its linger, when it begins.
    ///
    /// `stranded` fires if the runner is dropped before the last round is
    /// told (its runtime ended under it): the callers waiting get an error
    /// and the next caller starts a new runner, instead of every later
    /// caller waiting for a runner that is gone.
    async fn run(self: Arc<Self>, mut stranded: Stranded) {
        stranded.polled = true;
        let mut chained = false;
        loop {
            if chained {
                if !self.linger.is_zero() {
                    // On a blocking thread: the timer wheel would round 1 ms
                    // up to 2. Failing to sleep is no reason not to flush.
                    let linger = self.linger;
                    let _ = tokio::task::spawn_blocking(move || std::thread::sleep(linger)).await;
                }
                self.rounds().started += 1;
            }
            let backend = Arc::clone(&self.backend);
            // A flush task that cannot run (the runtime is shutting down)
            // fails this round for its callers, like a failed flush.
            let result = tokio::task::spawn_blocking(move || backend.flush())
                .await
                .unwrap_or_else(|_| Err(StorageError::Io("flush: the flush task failed".into())));
            self.flushes.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = &result {
                tracing::error!(%error, "storage flush failed");
            }

            let mut rounds = self.rounds();
            self.done.send_replace(Finished {
                round: rounds.started,
                result,
            });
            if rounds.requested > rounds.started {
                chained = true;
            } else {
                rounds.running = false;
                stranded.inner = None;
                return;
            }
        }
    }
}

/// The runner's guard: see [`Inner::run`].
struct Stranded {
    inner: Option<Arc<Inner>>,
    /// The runner ran at least once.
    polled: bool,
    /// It was spawned on the home runtime.
    on_home: bool,
}

impl Drop for Stranded {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        if self.on_home && !self.polled {
            // The home runtime dropped it unrun: it has ended.
            inner.home_gone.store(true, Ordering::Relaxed);
        }
        let mut rounds = inner.rounds();
        rounds.running = false;
        // Every caller waiting fails: none of their rounds will run. A
        // later caller's round comes after these.
        rounds.started = rounds.started.max(rounds.requested);
        inner.done.send_replace(Finished {
            round: rounds.started,
            result: Err(StorageError::Io("flush: the flush task was stopped".into())),
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::storage::{BatchOp, CasOutcome, KeyValues, SledBackend};

    #[tokio::test]
    async fn concurrent_callers_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(SledBackend::open(dir.path()).unwrap());
        let commit = Arc::new(GroupCommit::new(Arc::clone(&backend)));

        const CALLERS: u64 = 64;
        let mut tasks = Vec::new();
        for i in 0..CALLERS {
            let backend = Arc::clone(&backend);
            let commit = Arc::clone(&commit);
            tasks.push(tokio::spawn(async move {
                backend.put(format!("k{i}").as_bytes(), b"v").unwrap();
                commit.durable().await
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let flushes = commit.flush_count();
        assert!(flushes >= 1);
        assert!(
            flushes < CALLERS / 4,
            "{CALLERS} callers ran {flushes} flushes"
        );

        // A lone caller still gets its own flush.
        commit.durable().await.unwrap();
        assert_eq!(commit.flush_count(), flushes + 1);
    }

    /// A backend whose flush announces itself and then waits to be released.
    struct GatedBackend {
        entered: Mutex<mpsc::Sender<()>>,
        release: Mutex<mpsc::Receiver<()>>,
        fail: AtomicBool,
    }

    impl Backend for GatedBackend {
        fn get(&self, _: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
            Ok(None)
        }
        fn put(&self, _: &[u8], _: &[u8]) -> Result<(), StorageError> {
            Ok(())
        }
        fn delete(&self, _: &[u8]) -> Result<(), StorageError> {
            Ok(())
        }
        fn scan_prefix(&self, _: &[u8]) -> Result<KeyValues, StorageError> {
            Ok(Vec::new())
        }
        fn scan_range(&self, _: &[u8], _: &[u8], _: usize) -> Result<KeyValues, StorageError> {
            Ok(Vec::new())
        }
        fn compare_and_swap(
            &self,
            _: &[u8],
            _: Option<&[u8]>,
            _: Option<&[u8]>,
        ) -> Result<CasOutcome, StorageError> {
            Ok(CasOutcome::Swapped)
        }
        fn batch(&self, _: Vec<BatchOp>) -> Result<(), StorageError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), StorageError> {
            self.entered.lock().unwrap().send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
            if self.fail.load(Ordering::SeqCst) {
                Err(StorageError::Io("flush: disk on fire".into()))
            } else {
                Ok(())
            }
        }
    }

    /// A runtime of the kind a lane runs (`server::lanes`).
    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A multi-thread runtime (a server's shared one), with one worker.
    fn multi_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A caller waiting for `commit` to be durable, on the current runtime.
    fn spawn_durable(
        commit: &Arc<GroupCommit>,
    ) -> tokio::task::JoinHandle<Result<(), StorageError>> {
        let commit = Arc::clone(commit);
        tokio::spawn(async move { commit.durable().await })
    }

    struct Gate {
        backend: Arc<GatedBackend>,
        entered: Arc<Mutex<mpsc::Receiver<()>>>,
        release: mpsc::Sender<()>,
    }

    fn gate() -> Gate {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        Gate {
            backend: Arc::new(GatedBackend {
                entered: Mutex::new(entered_tx),
                release: Mutex::new(release_rx),
                fail: AtomicBool::new(false),
            }),
            entered: Arc::new(Mutex::new(entered_rx)),
            release: release_tx,
        }
    }

    impl Gate {
        /// Waits until a flush has begun; fails the test after a long while.
        async fn flush_began(&self) {
            let entered = Arc::clone(&self.entered);
            tokio::task::spawn_blocking(move || {
                entered
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30))
                    .expect("a flush should have begun")
            })
            .await
            .unwrap();
        }
    }

    #[tokio::test]
    async fn a_caller_arriving_during_a_flush_waits_for_the_next_one() {
        let gate = gate();
        let commit = Arc::new(GroupCommit::new(gate.backend.clone()));

        let first = spawn_durable(&commit);
        gate.flush_began().await;

        // Round 1 is running: these callers' writes may have missed it.
        let late: Vec<_> = (0..8).map(|_| spawn_durable(&commit)).collect();
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }

        gate.release.send(()).unwrap();
        first.await.unwrap().unwrap();
        // Round 2 starts for the late callers, and they are still waiting.
        gate.flush_began().await;
        assert!(late.iter().all(|task| !task.is_finished()));

        gate.release.send(()).unwrap();
        for task in late {
            task.await.unwrap().unwrap();
        }
        assert_eq!(commit.flush_count(), 2);
    }

    #[tokio::test]
    async fn callers_arriving_during_a_linger_join_that_round() {
        let gate = gate();
        // A linger far longer than the test's own steps take on a loaded
        // machine: the callers below must arrive while it lasts.
        let commit = Arc::new(GroupCommit::with_linger(
            gate.backend.clone(),
            Duration::from_secs(5),
        ));
        let first = spawn_durable(&commit);
        gate.flush_began().await;
        // Arrives during round 1: needs round 2, which is chained and lingers.
        let second = spawn_durable(&commit);
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        gate.release.send(()).unwrap();
        first.await.unwrap().unwrap();

        // Round 2 is lingering, not flushing: these join it.
        let during: Vec<_> = (0..8).map(|_| spawn_durable(&commit)).collect();
        gate.flush_began().await;
        gate.release.send(()).unwrap();
        second.await.unwrap().unwrap();
        for task in during {
            task.await.unwrap().unwrap();
        }
        assert_eq!(commit.flush_count(), 2, "the late callers shared round 2");
    }

    /// A group commit made outside a multi-thread runtime runs its runner on
    /// the runtime of the caller that starts a round. If that runtime ends
    /// mid-round, the callers waiting elsewhere fail instead of waiting for
    /// ever, and the next caller starts a runner of its own.
    #[test]
    fn a_runner_stopped_with_its_runtime_fails_its_callers_and_the_next_starts_anew() {
        let gate = gate();
        let commit = Arc::new(GroupCommit::with_linger(
            gate.backend.clone(),
            Duration::ZERO,
        ));
        let lane = current_thread();
        lane.block_on(async {
            spawn_durable(&commit);
            gate.flush_began().await;
        });
        let other = current_thread();
        other.block_on(async {
            let waiting = spawn_durable(&commit);
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            assert!(!waiting.is_finished());
            // The runner's runtime ends while its flush hangs.
            lane.shutdown_background();
            let failed = tokio::time::timeout(Duration::from_secs(30), waiting)
                .await
                .expect("a caller waiting on a stopped runner should fail, not hang")
                .unwrap();
            assert!(failed.unwrap_err().to_string().contains("stopped"));
            // One release for the stranded flush, one for the next round.
            gate.release.send(()).unwrap();
            gate.release.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(30), commit.durable())
                .await
                .expect("the next caller starts a runner")
                .unwrap();
        });
    }

    /// Made on a runtime (a server's shared one), a group commit runs its
    /// rounds there, whatever runtime the caller that starts one is on: a
    /// caller's lane ending mid-round does not stop the round.
    #[test]
    fn the_runner_lives_on_the_runtime_the_group_commit_was_made_on() {
        let gate = gate();
        let home = multi_thread();
        let commit = home.block_on(async {
            Arc::new(GroupCommit::with_linger(
                gate.backend.clone(),
                Duration::ZERO,
            ))
        });
        let lane = current_thread();
        lane.block_on(async {
            spawn_durable(&commit);
            gate.flush_began().await;
        });
        home.block_on(async {
            // A caller on the home runtime asks for round 2 while round 1
            // hangs, then the lane that started round 1 ends.
            let mut waiting = std::pin::pin!(commit.durable());
            let first = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(std::future::Future::poll(waiting.as_mut(), cx))
            })
            .await;
            assert!(first.is_pending());
            lane.shutdown_background();
            // Round 1 ends normally, and round 2 (the waiting caller's) too.
            gate.release.send(()).unwrap();
            gate.release.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(30), waiting)
                .await
                .expect("the waiting caller's round should run")
                .expect("the round should not fail: its runner is not on the lane");
        });
    }

    /// A group commit outliving the multi-thread runtime it was made on:
    /// the first round spawned there is dropped unrun, its caller is told
    /// so (no deadlock on the round lock), and later rounds run on the
    /// callers' runtime.
    #[test]
    fn a_home_runtime_that_has_ended_is_not_used_again() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(SledBackend::open(dir.path()).unwrap());
        let home = multi_thread();
        let commit = home.block_on(async { Arc::new(GroupCommit::new(backend)) });
        assert!(commit.home.is_some());
        drop(home);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let outcomes = current_thread().block_on(async {
                let first = commit.durable().await;
                let second = commit.durable().await;
                (first, second)
            });
            let _ = tx.send(outcomes);
        });
        let (first, second) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the callers should be answered, not stuck");
        assert!(first.unwrap_err().to_string().contains("stopped"));
        second.unwrap();
    }

    #[tokio::test]
    async fn a_failed_flush_is_reported_to_its_callers() {
        let gate = gate();
        let commit = Arc::new(GroupCommit::new(gate.backend.clone()));
        gate.backend.fail.store(true, Ordering::SeqCst);
        let failing = spawn_durable(&commit);
        gate.flush_began().await;
        gate.release.send(()).unwrap();
        let error = failing.await.unwrap().unwrap_err();
        assert!(error.to_string().contains("disk on fire"), "{error}");

        gate.backend.fail.store(false, Ordering::SeqCst);
        let working = spawn_durable(&commit);
        gate.flush_began().await;
        gate.release.send(()).unwrap();
        working.await.unwrap().unwrap();
        assert_eq!(commit.flush_count(), 2);
    }
}
