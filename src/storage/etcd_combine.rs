//! Concurrent writes of one node sent to etcd as one transaction.
//!
//! Every etcd write is a Raft proposal that each member applies, and on a
//! small machine it is etcd's per-request work (three members decoding,
//! proposing, applying and answering) that bounds durable writes, not the
//! fsync, which etcd already shares between proposals. So the backend does
//! not send each unfenced write on its own: writes that arrive while others
//! are out are gathered into one transaction (at most [`IN_FLIGHT`] out at
//! once), whose comparisons are those of every write in it and whose
//! operations are theirs, plus one bump of the change marker when any of
//! them needs it.
//!
//! What this keeps of each write's meaning:
//!
//! - **Atomicity** of each write: a transaction applies all of its
//!   operations or none, so each write's operations go in together.
//! - **Its own comparisons.** etcd checks every comparison before any
//!   operation applies, so a write whose comparison names a key another
//!   write of the same transaction changes would be checked against the
//!   value *before* that change: a lost update. Writes are therefore
//!   gathered only while the keys each one compares or writes are disjoint
//!   from the others' (this also keeps etcd's rule of one operation per key
//!   in a transaction). A write that overlaps waits for the next
//!   transaction.
//! - **A failed comparison** fails the whole gathered transaction, and
//!   nothing of it applies. Each of its writes is then sent again alone,
//!   which gives each its own answer: applied, or its comparison failed.
//!   A caller who makes its own guarded writes fail over and over costs the
//!   writes gathered with it one more round trip each, never a wrong
//!   answer.
//! - **Errors.** A gathered transaction is a write: sent again only when
//!   certainly not applied (`etcd_backend`'s `Resend::IfNotApplied`), and a
//!   failure is every gathered write's failure, with the same message ("may
//!   or may not have been applied" when etcd did not answer).
//! - **Order and fairness.** Writes of one key keep their order: a write
//!   that overlaps one already gathered waits for the next transaction, and
//!   so does every later write that names a key of a write passed over. A
//!   disjoint write is not held back by them: it joins the transaction
//!   being gathered, so that a caller who keeps many writes of one key
//!   queued (each needs its own transaction) does not make every other
//!   caller's write wait behind all of them.
//! - **A caller that gave up.** A caller waits for its answer within a
//!   bound; one that stops waiting before its write was taken into a
//!   transaction marks it ([`Claim::give_up`]) and is told it was not sent,
//!   and the write is then never sent (a write sent after its caller was
//!   answered could overwrite one acknowledged meanwhile).
//! - **Limits.** A gathered transaction stays within etcd's
//!   [`MAX_TXN_OPS`] operations (comparisons counted apart) and
//!   [`MAX_REQUEST_BYTES`]; a write is checked against them alone before it
//!   comes here.
//!
//! Fenced writes (a leader's background tasks) and compare-and-swap are not
//! gathered: they need their own failure branch to tell a lost term or read
//! the current value.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use etcd_client::{Compare, Txn, TxnOp};
use tokio::sync::{mpsc, watch, Semaphore};

use super::etcd_backend::{etcd_error, Resend, Sender, MAX_REQUEST_BYTES, MAX_TXN_OPS};
use super::StorageError;

/// Gathered transactions out at once. More queue; while all are out, the
/// writes that arrive wait and go together in the next.
const IN_FLIGHT: usize = 1;

/// Writes passed over for one transaction (they overlap a write before
/// them) past which no more are taken from the queue for it.
const PASSED_OVER: usize = 1024;

/// Whether a queued write may still be sent: shared by its caller, who
/// may give up waiting, and the gathering task.
#[derive(Clone, Default)]
pub(super) struct Claim(Arc<AtomicU8>);

const WAITING: u8 = 0;
const SENDING: u8 = 1;
const GIVEN_UP: u8 = 2;

impl Claim {
    /// The gathering task takes the write to send it: false once its
    /// caller gave up.
    fn take(&self) -> bool {
        self.0
            .compare_exchange(WAITING, SENDING, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// A transaction that applied nothing hands the write back (to be sent
    /// alone), unless its caller gave up meanwhile.
    fn put_back(&self) {
        let _ = self
            .0
            .compare_exchange(SENDING, WAITING, Ordering::SeqCst, Ordering::SeqCst);
    }

    fn is_given_up(&self) -> bool {
        self.0.load(Ordering::SeqCst) == GIVEN_UP
    }

    /// The caller stops waiting. True when the write is not out (never
    /// sent, or sent in a transaction that applied nothing): it will never
    /// be sent, and nothing of it was applied.
    pub(super) fn give_up(&self) -> bool {
        self.0.swap(GIVEN_UP, Ordering::SeqCst) == WAITING
    }
}

/// One write: what it compares, what it does, and the keys of both.
pub(super) struct Write {
    /// The trait call it comes from, for error messages when sent alone.
    pub operation: &'static str,
    pub compares: Vec<Compare>,
    /// Its operations on data keys (the change marker is added here).
    pub ops: Vec<TxnOp>,
    /// Whether it changes a tracked key (the marker must be bumped).
    pub bump: bool,
    /// Every etcd key it compares or writes.
    pub keys: Vec<Vec<u8>>,
    /// Its size in bytes, etcd keys and values (for etcd's request limit).
    pub bytes: usize,
    /// Whether it may still be sent (its caller may give up).
    pub claim: Claim,
}

/// Applied (at this revision), or one of its comparisons failed.
pub(super) type Outcome = Result<Option<i64>, StorageError>;

type Reply = Box<dyn FnOnce(Outcome) + Send>;

/// Hands writes to the gathering task on the backend's runtime.
pub(super) struct Combiner {
    queue: mpsc::UnboundedSender<(Write, Reply)>,
    /// Writes handed over and not yet taken into a transaction.
    queued: Arc<AtomicUsize>,
    /// While true the gathering task sends nothing (tests: [`Combiner::hold`]).
    held: watch::Sender<bool>,
}

/// Keeps the gathering task from sending until dropped (see
/// [`Combiner::hold`]).
#[must_use = "writes go on when this is dropped"]
pub struct WriteHold {
    held: watch::Sender<bool>,
}

impl Drop for WriteHold {
    fn drop(&mut self) {
        self.held.send_replace(false);
    }
}

impl Combiner {
    /// Starts the gathering task on `runtime`; it ends when the combiner is
    /// dropped and the queue is empty.
    pub(super) fn start(
        runtime: &tokio::runtime::Handle,
        sender: Sender,
        epoch_key: Vec<u8>,
    ) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let (held, hold_rx) = watch::channel(false);
        runtime.spawn(gather(
            Queue {
                rx,
                queued: queued.clone(),
                held: hold_rx,
            },
            sender,
            Arc::new(epoch_key),
        ));
        Self {
            queue,
            queued,
            held,
        }
    }

    /// Stops sending until the guard is dropped, so that writes queue up
    /// and then go together: tests show what is gathered with what.
    pub(super) fn hold(&self) -> WriteHold {
        self.held.send_replace(true);
        WriteHold {
            held: self.held.clone(),
        }
    }

    /// Writes handed over and not yet taken into a transaction.
    pub(super) fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Queues `write`; `reply` gets its outcome on the backend's runtime.
    pub(super) fn submit(
        &self,
        write: Write,
        reply: impl FnOnce(Outcome) + Send + 'static,
    ) -> Result<(), StorageError> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.queue
            .send((write, Box::new(reply)))
            .map_err(|_| StorageError::Io("etcd: the backend is closed".into()))
    }
}

/// What one gathered transaction holds so far.
#[derive(Default)]
struct Gathered {
    writes: Vec<(Write, Reply)>,
    keys: HashSet<Vec<u8>>,
    ops: usize,
    compares: usize,
    bytes: usize,
}

impl Gathered {
    /// Whether `write` can join: disjoint keys, within etcd's limits (one
    /// operation kept for the marker).
    fn fits(&self, write: &Write) -> bool {
        self.writes.is_empty()
            || (self.ops + write.ops.len() < MAX_TXN_OPS
                && self.compares + write.compares.len() <= MAX_TXN_OPS
                && self.bytes + write.bytes <= MAX_REQUEST_BYTES
                && write.keys.iter().all(|k| !self.keys.contains(k)))
    }

    fn add(&mut self, (write, reply): (Write, Reply)) {
        self.ops += write.ops.len();
        self.compares += write.compares.len();
        self.bytes += write.bytes;
        self.keys.extend(write.keys.iter().cloned());
        self.writes.push((write, reply));
    }
}

/// The gathering task's end of the queue.
struct Queue {
    rx: mpsc::UnboundedReceiver<(Write, Reply)>,
    queued: Arc<AtomicUsize>,
    held: watch::Receiver<bool>,
}

impl Queue {
    /// One write leaves the queue for a transaction.
    fn took(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn gather(mut queue: Queue, sender: Sender, epoch_key: Arc<Vec<u8>>) {
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    // Writes passed over, oldest first: they come before the queue's.
    let mut waiting: VecDeque<(Write, Reply)> = VecDeque::new();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        if waiting.is_empty() {
            match queue.rx.recv().await {
                Some(write) => waiting.push_back(write),
                None => return,
            }
        }
        // Held (tests): wait with the first write in hand, counted as queued.
        if queue.held.wait_for(|held| !held).await.is_err() {
            return;
        }
        let mut gathered = Gathered::default();
        // The keys of the writes passed over: a later write naming one of
        // them is passed over too, so that writes of one key keep their order.
        let mut passed: HashSet<Vec<u8>> = HashSet::new();
        let mut kept: VecDeque<(Write, Reply)> = VecDeque::new();
        loop {
            let next = match waiting.pop_front() {
                Some(next) => next,
                None if kept.len() < PASSED_OVER => match queue.rx.try_recv() {
                    Ok(next) => next,
                    Err(_) => break,
                },
                None => break,
            };
            let write = &next.0;
            if write.claim.is_given_up() {
                // Its caller was answered: never sent.
                queue.took();
                continue;
            }
            if gathered.fits(write) && write.keys.iter().all(|k| !passed.contains(k)) {
                queue.took();
                if write.claim.take() {
                    gathered.add(next);
                }
            } else {
                passed.extend(write.keys.iter().cloned());
                kept.push_back(next);
            }
        }
        kept.append(&mut waiting);
        waiting = kept;
        if gathered.writes.is_empty() {
            continue;
        }
        let (sender, epoch_key) = (sender.clone(), epoch_key.clone());
        tokio::spawn(async move {
            send_gathered(sender, epoch_key, gathered.writes).await;
            drop(permit);
        });
    }
}

/// Sends the gathered writes as one transaction; on a failed comparison,
/// each alone.
async fn send_gathered(sender: Sender, epoch_key: Arc<Vec<u8>>, mut writes: Vec<(Write, Reply)>) {
    if writes.len() == 1 {
        if let Some((write, reply)) = writes.pop() {
            let operation = write.operation;
            reply(send(&sender, &epoch_key, operation, vec![write]).await);
        }
        return;
    }
    let (batch, replies): (Vec<Write>, Vec<Reply>) = writes.into_iter().unzip();
    let alone: Vec<Write> = batch.iter().map(copy).collect();
    match send(&sender, &epoch_key, "batch", batch).await {
        Ok(None) => {
            // Nothing applied: each on its own, concurrently.
            let mut each = tokio::task::JoinSet::new();
            for (write, reply) in alone.into_iter().zip(replies) {
                let (sender, epoch_key) = (sender.clone(), epoch_key.clone());
                write.claim.put_back();
                each.spawn(async move {
                    if !write.claim.take() {
                        // Its caller gave up meanwhile and was told nothing
                        // of it was applied.
                        return;
                    }
                    let operation = write.operation;
                    reply(send(&sender, &epoch_key, operation, vec![write]).await);
                });
            }
            while each.join_next().await.is_some() {}
        }
        out => {
            for reply in replies {
                reply(out.clone());
            }
        }
    }
}

fn copy(write: &Write) -> Write {
    Write {
        operation: write.operation,
        compares: write.compares.clone(),
        ops: write.ops.clone(),
        bump: write.bump,
        keys: Vec::new(),
        bytes: write.bytes,
        claim: write.claim.clone(),
    }
}

/// One transaction of `writes`: their comparisons, their operations and
/// the marker's bump when any needs it.
async fn send(
    sender: &Sender,
    epoch_key: &[u8],
    operation: &'static str,
    writes: Vec<Write>,
) -> Outcome {
    let bump = writes.iter().any(|w| w.bump);
    let mut compares = Vec::new();
    let mut ops = Vec::new();
    for write in writes {
        compares.extend(write.compares);
        ops.extend(write.ops);
    }
    if bump {
        ops.push(TxnOp::put(epoch_key.to_vec(), Vec::new(), None));
    }
    let txn = Txn::new().when(compares).and_then(ops);
    sender
        .send(
            operation,
            Resend::IfNotApplied,
            move |mut client| async move {
                let answer = client
                    .txn(txn)
                    .await
                    .map_err(|e| etcd_error(operation, e))?;
                Ok(answer
                    .succeeded()
                    .then(|| answer.header().map_or(0, |h| h.revision())))
            },
        )
        .await
}
