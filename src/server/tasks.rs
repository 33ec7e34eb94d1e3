//! The server's background tasks: one set, each named and traced, awaited
//! together at shutdown with a deadline.
//!
//! Every task is handed the server's [`Shutdown`] when it is spawned and is
//! expected to return soon after it fires; [`Tasks::drain`] waits for all of
//! them and names any that did not stop in time (those are aborted).

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::clock::Shutdown;

/// The running background tasks of one server.
pub struct Tasks {
    shutdown: Shutdown,
    running: Vec<(&'static str, JoinHandle<()>)>,
}

impl Tasks {
    /// An empty set whose tasks stop on `shutdown`.
    pub fn new(shutdown: Shutdown) -> Self {
        Self {
            shutdown,
            running: Vec::new(),
        }
    }

    /// Spawns `task(shutdown)` as the task `name`, inside a span of that name.
    pub fn spawn<F>(&mut self, name: &'static str, task: impl FnOnce(Shutdown) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let span = tracing::info_span!("task", name);
        let handle = tokio::spawn(task(self.shutdown.clone()).instrument(span));
        tracing::debug!(task = name, "started");
        self.running.push((name, handle));
    }

    /// The names of the tasks, in the order they were started.
    pub fn names(&self) -> Vec<&'static str> {
        self.running.iter().map(|(name, _)| *name).collect()
    }

    /// Waits for every task to end, all within `deadline` (the caller has
    /// triggered the shutdown). Returns the names of those that did not stop
    /// in time; they are logged and aborted.
    pub async fn drain(self, deadline: Duration) -> Vec<&'static str> {
        let until = tokio::time::Instant::now() + deadline;
        let mut late = Vec::new();
        for (name, mut handle) in self.running {
            match tokio::time::timeout_at(until, &mut handle).await {
                Ok(Ok(())) => tracing::debug!(task = name, "stopped"),
                Ok(Err(e)) if e.is_panic() => tracing::error!(task = name, "task panicked"),
                Ok(Err(_)) => tracing::debug!(task = name, "cancelled"),
                Err(_) => {
                    tracing::warn!(
                        task = name,
                        "did not stop within the drain deadline; aborted"
                    );
                    handle.abort();
                    late.push(name);
                }
            }
        }
        late
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::clock::ShutdownTrigger;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_every_task_and_names_the_late_ones() {
        let trigger = ShutdownTrigger::new();
        let mut tasks = Tasks::new(trigger.signal());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        tasks.spawn("polite", |shutdown| async move {
            shutdown.wait().await;
            // Some clean-up work after the signal, within the deadline.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = done_tx.send(());
        });
        tasks.spawn("deaf", |_shutdown| async move {
            std::future::pending::<()>().await;
        });
        assert_eq!(tasks.names(), vec!["polite", "deaf"]);
        trigger.trigger();
        let late = tasks.drain(Duration::from_secs(10)).await;
        assert_eq!(late, vec!["deaf"]);
        done_rx.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_does_not_stop_the_drain() {
        let trigger = ShutdownTrigger::new();
        let mut tasks = Tasks::new(trigger.signal());
        tasks.spawn("broken", |_shutdown| async move {
            panic!("broken task");
        });
        tasks.spawn("fine", |shutdown| async move { shutdown.wait().await });
        trigger.trigger();
        assert!(tasks.drain(Duration::from_secs(1)).await.is_empty());
    }
}
