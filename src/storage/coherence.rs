//! Keeping in-memory caches right on a store that other nodes write (etcd).
//!
//! A cache owner (the verified-token cache, the compiled-policy cache)
//! registers the key prefix its entries come from with [`Coherence::track`],
//! with two callbacks: one told of every changed key under that prefix, one
//! told to forget everything. The backend feeds this struct from a watch on
//! the store (`deliver`, `reset`) and bumps a change marker (the *epoch*) in
//! the same transaction as every write under a tracked prefix.
//!
//! A request may use those caches only after [`Coherence::fence`] said yes:
//!
//! 1. one linearizable read of the epoch key, shared by concurrent requests,
//!    gives `M`, the revision of the last write under a tracked prefix. A
//!    request only takes the result of a read that was *issued after it
//!    started* (it waits for the next one when one is already in flight), so
//!    `M` covers every tracked write acknowledged before the request began;
//! 2. then it waits until the watch has delivered every event up to `M`
//!    (their callbacks have run). After that, no cache entry stands for a
//!    record that an acknowledged write changed: the write's event removed
//!    it, and an entry read before that write cannot be inserted afterwards
//!    (the owners insert under a generation that every removal bumps).
//!
//! The async fence of a request (`fence_async`, the one the request seam
//! takes) sends its shared reads at least an *interval* apart
//! (`storage.etcd.fence_interval_us`, 2 ms by default): a read is still
//! issued only after the request began, so the rule above holds; a busy
//! node waits up to one interval longer per request and sends at most one
//! read per interval. The number that counts a read as issued is taken
//! when it is sent, after that pause, so every request that arrived during
//! the pause is served by it.
//!
//! While the watch is down (error, compaction, restart) the fence says no
//! and requests read the store. A new watch starts at a revision read
//! *before* the caches are emptied, so nothing read afterwards can miss an
//! event. If the watch has not caught up within [`FENCE_WAIT`] the fence also
//! says no: slower, never wrong.

use std::future::Future;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::members::{Entry, Roll};
use super::StorageError;

/// The longest a request waits for the watch (or for a shared read) before
/// it reads the store instead.
pub const FENCE_WAIT: Duration = Duration::from_secs(2);

/// Told of one changed key (the barrier's key, under the tracked prefix).
pub type OnChange = Arc<dyn Fn(&str) + Send + Sync>;
/// Told of one changed key (the barrier's key) and the revision of the
/// change (its etcd `mod_revision`).
pub type OnRevision = Arc<dyn Fn(&[u8], i64) + Send + Sync>;
/// Told to forget everything.
pub type OnReset = Arc<dyn Fn() + Send + Sync>;

enum Change {
    Key(OnChange),
    Revision(OnRevision),
}

struct Listener {
    prefix: String,
    on_change: Change,
    on_reset: OnReset,
}

/// One delivery: the revision reached, each changed key with the revision
/// of its change, each changed key of the read-lease roll (`members`), and
/// the highest revision of the change marker in it (0: none).
type Delivery = (i64, Vec<(Vec<u8>, i64)>, Vec<(String, Option<Entry>)>, i64);

/// What the watch has delivered.
#[derive(Default)]
struct Progress {
    /// A watch is running and every event up to `delivered` was handed out.
    live: bool,
    delivered: i64,
    /// Deliveries kept back by [`Coherence::hold`] (tests).
    held: Option<Vec<Delivery>>,
}

/// The most epoch reads out at once. A request that starts while reads are
/// out needs one issued after it began; it need not wait for those to
/// finish before that one is sent (see [`Coherence::with_interval`]).
pub const READS_IN_FLIGHT: usize = 4;

/// The shared epoch reads.
#[derive(Default)]
struct Reads {
    /// Reads numbered so far: a read's number is taken when it is sent.
    issued: u64,
    /// The highest number of a read that has finished.
    finished: u64,
    /// The numbers of the reads out now (at most [`READS_IN_FLIGHT`]).
    in_flight: Vec<u64>,
    /// An async read is waiting for its turn (the interval) to be sent.
    scheduled: bool,
    /// The result of read number `finished`.
    last: Option<Result<i64, String>>,
    /// When the last async read was sent (see `interval`).
    last_issued: Option<tokio::time::Instant>,
}

impl Reads {
    /// The result for a caller that holds `ticket` (one more than the
    /// reads issued when it began), once a read issued after it began has
    /// finished: the latest finished read's, whose number is at least the
    /// ticket.
    fn served(&self, ticket: u64) -> Option<Option<i64>> {
        (self.finished >= ticket).then(|| self.last.clone().and_then(Result::ok))
    }

    /// Whether a read that can serve `ticket` is out.
    fn covered(&self, ticket: u64) -> bool {
        self.in_flight.iter().any(|&n| n >= ticket)
    }

    /// Whether another read may be sent: the reads out and an async turn
    /// waiting to send one stay within [`READS_IN_FLIGHT`].
    fn room(&self) -> bool {
        self.in_flight.len() + usize::from(self.scheduled) < READS_IN_FLIGHT
    }

    /// Numbers and records a read as sent.
    fn send(&mut self) -> u64 {
        self.issued += 1;
        self.in_flight.push(self.issued);
        self.issued
    }

    /// Read `number` ended with `out` (or was abandoned: `None`).
    fn end(&mut self, number: u64, out: Option<Result<i64, String>>) {
        self.in_flight.retain(|&n| n != number);
        if let Some(out) = out {
            if number > self.finished {
                self.finished = number;
                self.last = Some(out);
            }
        }
    }
}

/// See the module doc.
#[derive(Default)]
pub struct Coherence {
    listeners: RwLock<Vec<Listener>>,
    progress: Mutex<Progress>,
    progressed: Condvar,
    reads: Mutex<Reads>,
    read_done: Condvar,
    /// The async fence's wake-ups, told whenever the condvars are.
    progressed_async: Notify,
    read_done_async: Notify,
    /// The least time between two async epoch reads (see
    /// [`Coherence::with_interval`]).
    interval: Duration,
    /// The read-lease roll (see `storage::members`), told on every change.
    roll: Mutex<Roll>,
    roll_changed: Condvar,
    /// Told when this node may owe the roll an acknowledgement.
    ack_due: Notify,
}

impl std::fmt::Debug for Coherence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coherence").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics under these locks; the state is whole whatever happened.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps deliveries back until dropped (see [`Coherence::hold`]).
#[must_use = "deliveries go on when this is dropped"]
pub struct Hold<'a> {
    coherence: &'a Coherence,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        // Hand out what was held while still holding, so that nothing the
        // watch delivers meanwhile overtakes it; stop holding once empty.
        loop {
            let pending = {
                let mut progress = lock(&self.coherence.progress);
                let held = progress.held.get_or_insert_with(Vec::new);
                if held.is_empty() {
                    progress.held = None;
                    return;
                }
                std::mem::take(held)
            };
            for (revision, keys, nodes, marker) in pending {
                self.coherence.hand_out(revision, keys, nodes, marker);
            }
        }
    }
}

impl Coherence {
    pub fn new() -> Self {
        Self::default()
    }

    /// A coherence whose async fence sends its shared epoch reads at least
    /// `interval` apart (`storage.etcd.fence_interval_us`). A request that
    /// arrives within `interval` of the last read waits for the next one a
    /// little longer (at most `interval`); in exchange a busy node sends at
    /// most one read per `interval` to etcd's leader, however many requests
    /// it serves (each read is a linearizable read: a heartbeat round of the
    /// etcd members). A request after a quiet spell reads at once.
    pub fn with_interval(interval: Duration) -> Self {
        Self {
            interval,
            ..Self::default()
        }
    }

    /// Registers a cache fed from `prefix` (a barrier key prefix such as
    /// `tokens/accessor/`). From now on this node's writes under it bump the
    /// epoch, and the watch's events under it reach `on_change`.
    pub fn track(&self, prefix: &str, on_change: OnChange, on_reset: OnReset) {
        self.listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Listener {
                prefix: prefix.to_owned(),
                on_change: Change::Key(on_change),
                on_reset,
            });
    }

    /// As [`Coherence::track`], for a cache that also wants each change's
    /// revision (`read_cache`).
    pub fn track_revisions(&self, prefix: &str, on_change: OnRevision, on_reset: OnReset) {
        self.listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Listener {
                prefix: prefix.to_owned(),
                on_change: Change::Revision(on_change),
                on_reset,
            });
    }

    /// Whether a write of `key` (a barrier key) must bump the epoch.
    pub fn tracks(&self, key: &[u8]) -> bool {
        self.listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|l| key.starts_with(l.prefix.as_bytes()))
    }

    /// The watch delivered every event up to `revision`; `keys` are the
    /// barrier keys they changed, each with the revision of its change.
    /// Callbacks run before `revision` counts as delivered.
    pub fn deliver(&self, revision: i64, keys: Vec<(Vec<u8>, i64)>) {
        self.deliver_all(revision, keys, Vec::new(), 0);
    }

    /// [`Coherence::deliver`], with the changes of the read-lease roll
    /// (`PREFIX m/node/` keys) in the same events, and `marker`, the highest
    /// revision of the change marker among them (a tracked write always
    /// writes it, even when its only operation deleted a missing key, which
    /// makes no event of its own). The roll is told after the caches'
    /// callbacks ran: an acknowledgement seen on the roll then never runs
    /// ahead of the changes delivered before it.
    pub fn deliver_all(
        &self,
        revision: i64,
        keys: Vec<(Vec<u8>, i64)>,
        nodes: Vec<(String, Option<Entry>)>,
        marker: i64,
    ) {
        {
            let mut progress = lock(&self.progress);
            if let Some(held) = progress.held.as_mut() {
                held.push((revision, keys, nodes, marker));
                return;
            }
        }
        self.hand_out(revision, keys, nodes, marker);
    }

    /// [`Coherence::deliver_all`] past the hold.
    fn hand_out(
        &self,
        revision: i64,
        keys: Vec<(Vec<u8>, i64)>,
        nodes: Vec<(String, Option<Entry>)>,
        marker: i64,
    ) {
        let tracked = self.tell(&keys).max(marker);
        let mut progress = lock(&self.progress);
        if revision > progress.delivered {
            progress.delivered = revision;
        }
        drop(progress);
        if tracked > 0 || !nodes.is_empty() {
            let mut roll = lock(&self.roll);
            roll.changed(tracked);
            for (name, entry) in nodes {
                roll.update(&name, entry);
            }
            drop(roll);
            self.roll_changed.notify_all();
            self.ack_due.notify_one();
        }
        self.told_progress();
    }

    /// Runs the callbacks of the listeners of `keys`; the highest revision
    /// of a tracked key among them (0 if none).
    fn tell(&self, keys: &[(Vec<u8>, i64)]) -> i64 {
        let mut tracked = 0;
        if keys.is_empty() {
            return tracked;
        }
        let listeners = self
            .listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        for (key, changed_at) in keys {
            for listener in listeners.iter() {
                if key.starts_with(listener.prefix.as_bytes()) {
                    tracked = tracked.max(*changed_at);
                    match &listener.on_change {
                        Change::Key(f) => f(&String::from_utf8_lossy(key)),
                        Change::Revision(f) => f(key, *changed_at),
                    }
                }
            }
        }
        tracked
    }

    /// The watch stopped: fences say no until the next [`Coherence::reset`].
    pub fn down(&self) {
        lock(&self.progress).live = false;
        self.told_progress();
    }

    fn told_progress(&self) {
        self.progressed.notify_all();
        self.progressed_async.notify_waiters();
    }

    fn told_read(&self) {
        self.read_done.notify_all();
        self.read_done_async.notify_waiters();
    }

    /// A new watch runs from just after `revision` (read before this call):
    /// every cache forgets everything, and the watch counts as live.
    pub fn reset(&self, revision: i64) {
        self.reset_with(revision, None);
    }

    /// [`Coherence::reset`], with the read-lease roll as read at `revision`.
    pub fn reset_with(
        &self,
        revision: i64,
        roll: Option<std::collections::HashMap<String, Entry>>,
    ) {
        let listeners = self
            .listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        for listener in listeners.iter() {
            (listener.on_reset)();
        }
        drop(listeners);
        let mut progress = lock(&self.progress);
        if let Some(held) = progress.held.as_mut() {
            // Everything before the reset is covered by it.
            held.clear();
        }
        progress.delivered = revision;
        progress.live = true;
        drop(progress);
        if let Some(nodes) = roll {
            lock(&self.roll).reset(revision, nodes);
            self.roll_changed.notify_all();
            self.ack_due.notify_one();
        }
        self.told_progress();
    }

    /// Whether a request that starts now may use the caches with no fence
    /// read: this node holds a read lease that every other node on the
    /// roll has acknowledged, and its watch is live (see
    /// `storage::members`).
    pub fn leased(&self) -> bool {
        let (live, delivered) = {
            let progress = lock(&self.progress);
            (progress.live, progress.delivered)
        };
        live && lock(&self.roll).serving(Instant::now(), delivered)
    }

    /// Whether the watch is live, and what it has delivered.
    pub fn delivered(&self) -> (bool, i64) {
        let progress = lock(&self.progress);
        (progress.live, progress.delivered)
    }

    /// This node's own write of `keys` (barrier keys) was applied at
    /// `revision`: its caches take it at once (as the watch would later).
    /// Then this waits, until `deadline`, for this node's watch to deliver
    /// `revision`, so that the roll it knows holds every node registered
    /// before the write, and then for every other node on the roll to
    /// acknowledge `revision` or leave the roll. `Err` says which wait ran
    /// out.
    pub fn settle(
        &self,
        revision: i64,
        keys: Vec<Vec<u8>>,
        deadline: Instant,
    ) -> Result<(), String> {
        let keys: Vec<(Vec<u8>, i64)> = keys.into_iter().map(|k| (k, revision)).collect();
        self.tell(&keys);
        let mut progress = lock(&self.progress);
        while !(progress.live && progress.delivered >= revision) {
            let now = Instant::now();
            if now >= deadline {
                return Err("this node's etcd watch did not deliver it".into());
            }
            progress = self
                .progressed
                .wait_timeout(progress, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(progress);
        let mut roll = lock(&self.roll);
        loop {
            let pending = roll.pending(revision);
            if pending == 0 {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "{pending} other keyward node(s) holding a read lease did not confirm it"
                ));
            }
            roll = self
                .roll_changed
                .wait_timeout(roll, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// This node registered on the roll as `name` at revision `created`,
    /// its lease holding until `valid_until` (less margin).
    pub fn registered(&self, name: String, created: i64, valid_until: Instant) {
        lock(&self.roll).registered(name, created, valid_until);
        self.ack_due.notify_one();
    }

    /// A keep-alive of this node's lease was answered.
    pub fn renewed(&self, valid_until: Instant) {
        lock(&self.roll).renewed(valid_until);
    }

    /// Whether this node's own count of its read lease has not run out.
    pub fn lease_held(&self) -> bool {
        lock(&self.roll).holds(Instant::now())
    }

    /// This node stops using its read lease (before giving it up).
    pub fn left(&self) {
        lock(&self.roll).left();
    }

    /// Waits until an acknowledgement is due and returns it: the revision
    /// the watch has delivered, taken as sent (see `Roll::due`).
    pub async fn next_ack(&self) -> i64 {
        loop {
            let told = self.ack_due.notified();
            let (_, delivered) = self.delivered();
            if let Some(ack) = lock(&self.roll).due(delivered) {
                return ack;
            }
            told.await;
        }
    }

    /// How many nodes are on the read-lease roll, this one included.
    pub fn roll_len(&self) -> usize {
        lock(&self.roll).len()
    }

    /// Whether the watch is live (status and tests).
    pub fn is_live(&self) -> bool {
        lock(&self.progress).live
    }

    /// Keeps the watch's deliveries back until the guard is dropped: a watch
    /// that lags, on demand (tests show the fence waits for it).
    #[doc(hidden)]
    pub fn hold(&self) -> Hold<'_> {
        let mut progress = lock(&self.progress);
        if progress.held.is_none() {
            progress.held = Some(Vec::new());
        }
        Hold { coherence: self }
    }

    /// Whether caches fed from tracked prefixes may serve a request that
    /// starts now (see the module doc). `read_epoch` is one linearizable
    /// read of the epoch: the revision of the last tracked write.
    pub fn fence(&self, read_epoch: &dyn Fn() -> Result<i64, StorageError>) -> bool {
        let deadline = Instant::now() + FENCE_WAIT;
        let Some(needed) = self.shared_read(read_epoch, deadline) else {
            return false;
        };
        let mut progress = lock(&self.progress);
        loop {
            if progress.live && progress.delivered >= needed {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            progress = self
                .progressed
                .wait_timeout(progress, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The result of an epoch read issued after this call began: the one
    /// this caller issues, or the next one another caller issues.
    fn shared_read(
        &self,
        read_epoch: &dyn Fn() -> Result<i64, StorageError>,
        deadline: Instant,
    ) -> Option<i64> {
        let mut reads = lock(&self.reads);
        // A read in flight now was issued before this call: not good enough.
        let ticket = reads.issued + 1;
        loop {
            if let Some(out) = reads.served(ticket) {
                return out;
            }
            if !reads.covered(ticket) && reads.room() {
                let mine = reads.send();
                drop(reads);
                let out = read_epoch().map_err(|e| e.to_string());
                reads = lock(&self.reads);
                reads.end(mine, Some(out.clone()));
                drop(reads);
                self.told_read();
                // Its own read (issued after it began): not a later one
                // that finished meanwhile.
                return out.ok();
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            reads = self
                .read_done
                .wait_timeout(reads, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Coherence {
    /// [`Coherence::fence`] for async callers: the same rule, waiting
    /// without holding a thread (a request on a runtime worker would
    /// otherwise park that thread for the round trip; 64 requests in flight
    /// were 64 parked threads). `read_epoch` is called at most once, when
    /// this caller is the one to issue the shared read.
    pub async fn fence_async<F, Fut>(&self, read_epoch: F) -> bool
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<i64, StorageError>>,
    {
        let deadline = tokio::time::Instant::now() + FENCE_WAIT;
        let Some(needed) = self.shared_read_async(read_epoch, deadline).await else {
            return false;
        };
        loop {
            let told = self.progressed_async.notified();
            tokio::pin!(told);
            // Registered before the check, so a delivery between the check
            // and the wait still wakes it.
            told.as_mut().enable();
            {
                let progress = lock(&self.progress);
                if progress.live && progress.delivered >= needed {
                    return true;
                }
            }
            if tokio::time::timeout_at(deadline, told).await.is_err() {
                return false;
            }
        }
    }

    /// [`Coherence::shared_read`] for async callers; the two share one
    /// count of reads, so a read either issues serves both.
    async fn shared_read_async<F, Fut>(
        &self,
        read_epoch: F,
        deadline: tokio::time::Instant,
    ) -> Option<i64>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<i64, StorageError>>,
    {
        let ticket = lock(&self.reads).issued + 1;
        let mut read_epoch = Some(read_epoch);
        loop {
            let told = self.read_done_async.notified();
            tokio::pin!(told);
            told.as_mut().enable();
            let mine = {
                let mut reads = lock(&self.reads);
                if let Some(out) = reads.served(ticket) {
                    return out;
                }
                let turn = !reads.covered(ticket) && !reads.scheduled && reads.room();
                match (turn, read_epoch.take()) {
                    (true, Some(read)) => {
                        reads.scheduled = true;
                        Some((reads.last_issued.map(|at| at + self.interval), read))
                    }
                    (_, read) => {
                        read_epoch = read;
                        None
                    }
                }
            };
            if let Some((not_before, read)) = mine {
                match self.read_in_turn(ticket, not_before, read).await {
                    InTurn::Read(out) => return out,
                    // Served or covered meanwhile (by a blocking read):
                    // wait as the others do.
                    InTurn::NotNeeded(read) => read_epoch = Some(read),
                }
                continue;
            }
            if tokio::time::timeout_at(deadline, told).await.is_err() {
                return None;
            }
        }
    }

    /// Sends the shared read scheduled by this caller once `not_before` has
    /// passed, and returns its result. Every request that began before it is
    /// sent is served by it (or by a later one).
    async fn read_in_turn<F, Fut>(
        &self,
        ticket: u64,
        not_before: Option<tokio::time::Instant>,
        read: F,
    ) -> InTurn<F>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<i64, StorageError>>,
    {
        // Undone however this ends, so that a cancelled request does not
        // leave the others waiting for a read nobody makes.
        let mut turn = Turn {
            coherence: self,
            state: TurnState::Scheduled,
        };
        if let Some(at) = not_before {
            tokio::time::sleep_until(at).await;
        }
        let mine = {
            let mut reads = lock(&self.reads);
            reads.scheduled = false;
            if reads.served(ticket).is_some() || reads.covered(ticket) || !reads.room() {
                // A blocking read sent meanwhile serves this caller, or took
                // the last place: this read is not needed, or must wait.
                turn.state = TurnState::Ended;
                drop(reads);
                self.told_read();
                return InTurn::NotNeeded(read);
            }
            reads.last_issued = Some(tokio::time::Instant::now());
            reads.send()
        };
        // Whoever began before this send is served by it; whoever begins
        // after it finds `scheduled` false and may schedule the next at once.
        turn.state = TurnState::Sent(mine);
        let out = read().await.map_err(|e| e.to_string());
        turn.state = TurnState::Ended;
        lock(&self.reads).end(mine, Some(out.clone()));
        self.told_read();
        InTurn::Read(out.ok())
    }
}

/// What a caller's turn to send the shared read came to.
enum InTurn<F> {
    /// It sent the read: its result.
    Read(Option<i64>),
    /// No read was needed or there was no room when its time came: the
    /// read is handed back.
    NotNeeded(F),
}

/// Undoes an async read's turn when it is dropped before its read ended:
/// not yet sent, the turn passes to another caller; sent, the read no
/// longer counts as out, so its waiters send another.
struct Turn<'a> {
    coherence: &'a Coherence,
    state: TurnState,
}

enum TurnState {
    /// Waiting for the interval (`Reads::scheduled` is this turn's).
    Scheduled,
    /// Out, with this number.
    Sent(u64),
    Ended,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut reads = lock(&self.coherence.reads);
        match self.state {
            TurnState::Scheduled => reads.scheduled = false,
            TurnState::Sent(number) => reads.end(number, None),
            TurnState::Ended => return,
        }
        drop(reads);
        self.coherence.told_read();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    #[test]
    fn the_fence_waits_for_the_epoch_to_be_delivered() {
        let c = Coherence::new();
        let epoch = AtomicI64::new(0);
        let read = || Ok(epoch.load(Ordering::SeqCst));
        // No watch yet: no.
        assert!(!c.fence(&read));
        c.reset(5);
        assert!(c.fence(&read));
        epoch.store(7, Ordering::SeqCst);
        // The watch has delivered 5 only: no (after the bound).
        assert!(!c.fence(&read));
        c.deliver(7, Vec::new());
        assert!(c.fence(&read));
        c.down();
        assert!(!c.fence(&read));
    }

    fn node(created: i64, acked: i64) -> Option<Entry> {
        Some(Entry { created, acked })
    }

    #[test]
    fn a_read_lease_serves_once_registered_and_writes_wait_for_the_others() {
        let c = Arc::new(Coherence::new());
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let s = seen.clone();
        c.track(
            "tokens/",
            Arc::new(move |k| s.lock().unwrap().push(k.to_owned())),
            Arc::new(|| {}),
        );
        c.reset_with(
            10,
            Some(std::collections::HashMap::from([(
                "b".to_owned(),
                Entry {
                    created: 5,
                    acked: 10,
                },
            )])),
        );
        c.registered("a".into(), 11, Instant::now() + Duration::from_secs(60));
        assert!(!c.leased(), "its registration is not delivered yet");
        c.deliver_all(11, Vec::new(), vec![("a".into(), node(11, 0))], 0);
        assert!(c.leased());

        // This node's write at 13: its own caches take it at once; its
        // caller waits for its watch to deliver 13, then for b.
        let settle = |revision: i64, key: &'static [u8]| {
            let c = c.clone();
            std::thread::spawn(move || {
                c.settle(
                    revision,
                    vec![key.to_vec()],
                    Instant::now() + Duration::from_secs(30),
                )
            })
        };
        let writer = settle(13, b"tokens/x");
        while !seen.lock().unwrap().contains(&"tokens/x".to_owned()) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(!writer.is_finished(), "answered before its watch had it");
        c.deliver_all(13, Vec::new(), Vec::new(), 13);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!writer.is_finished(), "answered before b acknowledged");
        c.deliver_all(14, Vec::new(), vec![("b".into(), node(5, 13))], 0);
        assert_eq!(writer.join().unwrap(), Ok(()));

        // A node that registered before the write, and that this node's
        // watch had not shown yet when the write was applied, is waited for:
        // with nobody else on its roll, the writer still waits for its own
        // watch to deliver the write first.
        c.deliver_all(15, Vec::new(), vec![("b".into(), None)], 0);
        let writer = settle(20, b"tokens/y");
        std::thread::sleep(Duration::from_millis(50));
        assert!(!writer.is_finished(), "answered before its watch had it");
        c.deliver_all(16, Vec::new(), vec![("c".into(), node(16, 12))], 0);
        c.deliver_all(20, Vec::new(), Vec::new(), 20);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!writer.is_finished(), "answered before c acknowledged");
        c.deliver_all(21, Vec::new(), vec![("c".into(), node(16, 20))], 0);
        assert_eq!(writer.join().unwrap(), Ok(()));

        // Two other lease holders: the writer waits for both, whichever
        // acknowledges first.
        c.deliver_all(22, Vec::new(), vec![("b".into(), node(22, 21))], 0);
        let writer = settle(24, b"tokens/w");
        c.deliver_all(24, Vec::new(), Vec::new(), 24);
        c.deliver_all(25, Vec::new(), vec![("b".into(), node(22, 24))], 0);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!writer.is_finished(), "answered before c acknowledged");
        c.deliver_all(26, Vec::new(), vec![("c".into(), node(16, 24))], 0);
        assert_eq!(writer.join().unwrap(), Ok(()));

        // A node that leaves the roll is no longer waited for; one that
        // neither acknowledges nor leaves holds the writer to its deadline.
        let soon = || Instant::now() + Duration::from_millis(20);
        c.deliver_all(32, Vec::new(), Vec::new(), 32);
        let late = c.settle(32, vec![b"tokens/z".to_vec()], soon());
        assert!(late.unwrap_err().contains("2 other keyward node(s)"));
        c.deliver_all(33, Vec::new(), vec![("c".into(), None)], 0);
        c.deliver_all(34, Vec::new(), vec![("b".into(), node(22, 32))], 0);
        assert_eq!(c.settle(32, vec![b"tokens/z".to_vec()], soon()), Ok(()));
        // A write its watch never delivers: the deadline, named.
        let undelivered = c.settle(40, vec![b"tokens/z".to_vec()], soon());
        assert!(undelivered.unwrap_err().contains("watch did not deliver"));

        // The watch down, the lease counted out, or its key deleted: no.
        c.down();
        assert!(!c.leased());
        c.reset_with(45, None);
        assert!(c.leased());
        c.deliver_all(46, Vec::new(), vec![("a".into(), None)], 0);
        assert!(!c.leased());
        c.registered("a2".into(), 47, Instant::now() + Duration::from_secs(60));
        c.deliver_all(47, Vec::new(), vec![("a2".into(), node(47, 0))], 0);
        assert!(c.leased());
        c.left();
        assert!(!c.leased());
    }

    #[tokio::test]
    async fn acknowledgements_are_due_after_tracked_changes() {
        let c = Coherence::new();
        c.track("tokens/", Arc::new(|_| {}), Arc::new(|| {}));
        c.reset_with(10, Some(std::collections::HashMap::new()));
        c.registered("a".into(), 11, Instant::now() + Duration::from_secs(60));
        c.deliver_all(11, Vec::new(), vec![("a".into(), node(11, 0))], 0);
        // What the new session covered is acknowledged first.
        assert_eq!(c.next_ack().await, 11);
        // An untracked change asks for nothing; a tracked one does, and so
        // does the marker alone (a tracked write that changed no key).
        c.deliver(13, vec![(b"other/k".to_vec(), 13)]);
        let next = tokio::time::timeout(Duration::from_millis(50), c.next_ack()).await;
        assert!(next.is_err(), "no acknowledgement without a tracked change");
        c.deliver(14, vec![(b"tokens/k".to_vec(), 14)]);
        assert_eq!(c.next_ack().await, 14);
        c.deliver_all(15, Vec::new(), Vec::new(), 15);
        assert_eq!(c.next_ack().await, 15);
    }

    #[test]
    fn changes_reach_the_listeners_of_their_prefix_and_held_ones_wait() {
        let c = Coherence::new();
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let resets = Arc::new(AtomicUsize::new(0));
        let (s, r) = (seen.clone(), resets.clone());
        c.track(
            "tokens/accessor/",
            Arc::new(move |k| s.lock().unwrap().push(k.to_owned())),
            Arc::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert!(c.tracks(b"tokens/accessor/kwa_x"));
        assert!(!c.tracks(b"secret/x"));
        c.reset(1);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        c.deliver(
            2,
            vec![
                (b"tokens/accessor/kwa_x".to_vec(), 2),
                (b"secret/y".to_vec(), 2),
            ],
        );
        assert_eq!(*seen.lock().unwrap(), vec!["tokens/accessor/kwa_x"]);
        let hold = c.hold();
        c.deliver(3, vec![(b"tokens/accessor/kwa_z".to_vec(), 3)]);
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert!(!c.fence(&|| Ok(3)));
        drop(hold);
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert!(c.fence(&|| Ok(3)));
    }

    #[test]
    fn a_read_in_flight_at_the_start_is_not_used() {
        // Thread A's read blocks until B is done; B must not take A's
        // answer but a read of its own, sent while A's is still out.
        let c = Arc::new(Coherence::new());
        c.reset(100);
        let calls = Arc::new(AtomicI64::new(0));
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let gate_rx = Mutex::new(gate_rx);
        let read = {
            let calls = calls.clone();
            move || -> Result<i64, StorageError> {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 {
                    gate_rx.lock().unwrap().recv().unwrap();
                }
                Ok(n)
            }
        };
        let read = Arc::new(read);
        let (c1, r1) = (c.clone(), read.clone());
        let a = std::thread::spawn(move || c1.shared_read(&*r1, Instant::now() + FENCE_WAIT * 5));
        while calls.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let (c2, r2) = (c.clone(), read.clone());
        let b = std::thread::spawn(move || c2.shared_read(&*r2, Instant::now() + FENCE_WAIT * 5));
        assert_eq!(b.join().unwrap(), Some(2), "its own read, A's still out");
        gate_tx.send(()).unwrap();
        assert_eq!(a.join().unwrap(), Some(1));
        // A's read ended after B's: the latest finished read stays B's.
        assert_eq!(lock(&c.reads).finished, 2);
    }

    fn epoch_reader(
        epoch: &Arc<AtomicI64>,
    ) -> impl FnOnce() -> std::future::Ready<Result<i64, StorageError>> {
        let value = epoch.load(Ordering::SeqCst);
        move || std::future::ready(Ok(value))
    }

    /// The async fence says yes and no exactly where the blocking one does
    /// (paused time: its bound passes at once when nothing else can happen).
    #[tokio::test(start_paused = true)]
    async fn the_async_fence_keeps_the_blocking_ones_rule() {
        let c = Coherence::new();
        let epoch = Arc::new(AtomicI64::new(0));
        assert!(!c.fence_async(epoch_reader(&epoch)).await, "no watch yet");
        c.reset(5);
        assert!(c.fence_async(epoch_reader(&epoch)).await);
        epoch.store(7, Ordering::SeqCst);
        assert!(
            !c.fence_async(epoch_reader(&epoch)).await,
            "only 5 delivered"
        );
        c.deliver(7, Vec::new());
        assert!(c.fence_async(epoch_reader(&epoch)).await);
        c.down();
        assert!(!c.fence_async(epoch_reader(&epoch)).await);
    }

    /// A delivery that comes while a request waits for it wakes the request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_async_fence_wakes_when_the_watch_catches_up() {
        let c = Arc::new(Coherence::new());
        c.reset(5);
        let epoch = Arc::new(AtomicI64::new(9));
        let waiting = {
            let (c, epoch) = (c.clone(), epoch.clone());
            tokio::spawn(async move { c.fence_async(epoch_reader(&epoch)).await })
        };
        // Delivered only once the request has read the epoch (its read is
        // counted as finished).
        while lock(&c.reads).finished == 0 {
            tokio::task::yield_now().await;
        }
        c.deliver(9, Vec::new());
        assert!(waiting.await.unwrap());
    }

    /// A request that reads the epoch through the async shared read,
    /// answering `value` if it is the one to read.
    fn async_read(c: &Arc<Coherence>, value: i64) -> tokio::task::JoinHandle<Option<i64>> {
        let c = c.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + FENCE_WAIT * 5;
            c.shared_read_async(|| std::future::ready(Ok(value)), deadline)
                .await
        })
    }

    /// A request whose shared read, if it sends one, answers `value` only
    /// once `released` is told (a read held out as long as a test wants).
    fn held_read(
        c: &Arc<Coherence>,
        value: i64,
        released: tokio::sync::oneshot::Receiver<()>,
    ) -> tokio::task::JoinHandle<Option<i64>> {
        let c = c.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + FENCE_WAIT * 5;
            c.shared_read_async(
                || async move {
                    released.await.unwrap();
                    Ok(value)
                },
                deadline,
            )
            .await
        })
    }

    /// As the blocking `a_read_in_flight_at_the_start_is_not_used`: a request
    /// that starts while a read is out sends the next read without waiting
    /// for that one, and takes the next read's answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_async_read_in_flight_at_the_start_is_not_used() {
        let c = Arc::new(Coherence::new());
        c.reset(100);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let a = held_read(&c, 1, released);
        while lock(&c.reads).issued != 1 {
            tokio::task::yield_now().await;
        }
        let b = async_read(&c, 2);
        assert_eq!(b.await.unwrap(), Some(2), "its own read, A's still out");
        release.send(()).unwrap();
        assert_eq!(a.await.unwrap(), Some(1));
    }

    /// A request that begins while one read is out and the next is waiting
    /// for its interval is served by the next one, not by the one out, even
    /// when that one ends first (paused time: exact instants).
    #[tokio::test(start_paused = true)]
    async fn a_read_that_ends_while_the_next_waits_serves_no_one_who_came_after_it() {
        let c = Arc::new(Coherence::with_interval(Duration::from_millis(2)));
        c.reset(1);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let first = held_read(&c, 1, released);
        while lock(&c.reads).issued != 1 {
            tokio::task::yield_now().await;
        }
        // Both start after read 1 was sent: one schedules read 2 (2 ms
        // later), the other waits for it.
        let (second, third) = (async_read(&c, 2), async_read(&c, 2));
        while !lock(&c.reads).scheduled {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Some(1));
        assert_eq!(lock(&c.reads).issued, 1, "read 2 still waits for its turn");
        assert_eq!(second.await.unwrap(), Some(2));
        assert_eq!(third.await.unwrap(), Some(2));
        assert_eq!(lock(&c.reads).issued, 2, "one read for the two");
    }

    /// A blocking read sent while an async request waits for its turn
    /// serves that request: when the turn comes, no second read is sent
    /// (found by the review: the turn used to send regardless, past the
    /// bound). Paused time; the blocking read answers at once.
    #[tokio::test(start_paused = true)]
    async fn a_turn_served_meanwhile_by_a_blocking_read_sends_nothing() {
        let c = Arc::new(Coherence::with_interval(Duration::from_millis(300)));
        c.reset(1);
        assert!(c.fence_async(|| std::future::ready(Ok(1))).await);
        let waiting = async_read(&c, 99);
        while !lock(&c.reads).scheduled {
            tokio::task::yield_now().await;
        }
        let deadline = Instant::now() + FENCE_WAIT;
        assert_eq!(c.shared_read(&|| Ok(7), deadline), Some(7));
        assert_eq!(
            waiting.await.unwrap(),
            Some(7),
            "the blocking read's answer"
        );
        let reads = lock(&c.reads);
        assert_eq!(reads.issued, 2, "no read sent for the turn");
        assert!(!reads.scheduled && reads.in_flight.is_empty());
    }

    /// At most [`READS_IN_FLIGHT`] reads are out at once; a request that
    /// needs another waits until one ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_out_at_once_are_bounded() {
        let c = Arc::new(Coherence::new());
        c.reset(1);
        let mut gates = Vec::new();
        let mut waiting = Vec::new();
        for n in 1..=READS_IN_FLIGHT as u64 + 1 {
            let (release, released) = tokio::sync::oneshot::channel::<()>();
            gates.push(release);
            waiting.push(held_read(&c, n as i64, released));
            // Each starts once the one before is out (or, the last, once
            // the bound is reached).
            let target = n.min(READS_IN_FLIGHT as u64);
            while lock(&c.reads).issued != target {
                tokio::task::yield_now().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(lock(&c.reads).in_flight.len(), READS_IN_FLIGHT);
        assert_eq!(
            lock(&c.reads).issued,
            READS_IN_FLIGHT as u64,
            "the last waits"
        );
        let mut gates = gates.into_iter();
        gates.next().unwrap().send(()).unwrap();
        while lock(&c.reads).issued != READS_IN_FLIGHT as u64 + 1 {
            tokio::task::yield_now().await;
        }
        for gate in gates {
            gate.send(()).unwrap();
        }
        let mut answers = Vec::new();
        for handle in waiting {
            answers.push(handle.await.unwrap());
        }
        assert_eq!(answers[0], Some(1));
        assert_eq!(answers[READS_IN_FLIGHT], Some(READS_IN_FLIGHT as i64 + 1));
    }

    /// A request dropped while its shared read is out (its client went away)
    /// does not leave the others waiting for a read nobody makes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_async_read_does_not_hold_up_the_others() {
        let c = Arc::new(Coherence::new());
        c.reset(3);
        let stuck = {
            let c = c.clone();
            tokio::spawn(async move {
                c.fence_async(std::future::pending::<Result<i64, StorageError>>)
                    .await
            })
        };
        while lock(&c.reads).in_flight.is_empty() {
            tokio::task::yield_now().await;
        }
        stuck.abort();
        assert!(stuck.await.unwrap_err().is_cancelled());
        assert!(lock(&c.reads).in_flight.is_empty());
        // The next request reads for itself (a stuck flag would leave it
        // waiting out its bound and saying no).
        assert!(c.fence_async(|| std::future::ready(Ok(3))).await);
    }

    /// Reads of the async fence go at least the interval apart; whoever
    /// arrived during the pause is served by the next read; after a quiet
    /// spell a request reads at once (paused time: exact instants).
    #[tokio::test(start_paused = true)]
    async fn async_reads_go_an_interval_apart_and_serve_who_came_meanwhile() {
        let c = Coherence::with_interval(Duration::from_millis(2));
        c.reset(1);
        let sent = Arc::new(Mutex::new(Vec::<tokio::time::Instant>::new()));
        let reader = |sent: &Arc<Mutex<Vec<tokio::time::Instant>>>| {
            let sent = sent.clone();
            move || {
                sent.lock().unwrap().push(tokio::time::Instant::now());
                std::future::ready(Ok(1))
            }
        };
        let start = tokio::time::Instant::now();
        assert!(c.fence_async(reader(&sent)).await);
        let (a, b) = tokio::join!(c.fence_async(reader(&sent)), c.fence_async(reader(&sent)));
        assert!(a && b);
        tokio::time::advance(Duration::from_millis(10)).await;
        let quiet = tokio::time::Instant::now();
        assert!(c.fence_async(reader(&sent)).await);
        let sent = sent.lock().unwrap().clone();
        assert_eq!(
            sent,
            vec![start, start + Duration::from_millis(2), quiet],
            "one read for the two that came together, 2 ms after the first"
        );
    }

    /// Sync and async fences share one count of reads: an async request that
    /// starts while a blocking fence's read is out does not take that read's
    /// answer (it was issued before the request began), however the two
    /// interleave.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_async_request_does_not_take_a_blocking_read_issued_before_it() {
        let c = Arc::new(Coherence::new());
        c.reset(100);
        let (release, released) = std::sync::mpsc::channel::<()>();
        let blocking = {
            let c = c.clone();
            std::thread::spawn(move || {
                let read = || {
                    released.recv().unwrap();
                    Ok(1)
                };
                c.shared_read(&read, Instant::now() + FENCE_WAIT * 5)
            })
        };
        while lock(&c.reads).issued != 1 {
            tokio::task::yield_now().await;
        }
        let fenced = async_read(&c, 2);
        tokio::task::yield_now().await;
        release.send(()).unwrap();
        assert_eq!(blocking.join().unwrap(), Some(1));
        assert_eq!(fenced.await.unwrap(), Some(2));
    }
}
