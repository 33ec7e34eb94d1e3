//! One node's read lease on etcd (see `storage::members` for what it
//! promises and why it holds). It runs on the backend's own runtime for as
//! long as the backend lives, one *term* after another:
//!
//! 1. once the watch is live, grant a lease of [`LEASE_TTL`] and put the
//!    node's key `PREFIX m/node/<lease id>` on it (its value: the revision
//!    the watch has delivered); the put's revision is the registration;
//! 2. every [`TICK`], renew the lease (the lease holds for this node until
//!    the renewal's *sending* plus the TTL etcd granted, less [`MARGIN`]),
//!    and read the change marker: a marker revision the watch has not
//!    delivered [`LAG_LIMIT`] after it was read ends the term, as does a
//!    watch that is down or a lease etcd no longer knows;
//! 3. meanwhile, send this node's acknowledgements as they come due
//!    (`Coherence::next_ack`): a put of the key, on the same lease;
//! 4. at the end of a term, stop trusting the caches, then revoke the lease
//!    so that writers stop waiting for this node (if the revoke is lost,
//!    the lease runs out within its TTL).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, PutOptions};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::coherence::Coherence;
use super::etcd_leader::{keep_alive_once, LEASE_TTL, MARGIN};

/// How often the lease is renewed and the watch's lag checked.
const TICK: Duration = Duration::from_millis(500);
/// How long a change the marker showed may go undelivered by the watch
/// before this node gives its lease up (a writer waits about this long, at
/// most, for a node whose watch stalls while its lease is renewed).
pub(super) const LAG_LIMIT: Duration = Duration::from_secs(1);
/// The longest one request of the loop is waited for.
const REQUEST_BOUND: Duration = Duration::from_secs(2);
/// The longest a writer waits for the other nodes' acknowledgements: a
/// node that stopped answering loses its lease within [`LEASE_TTL`], and
/// the writer's watch delivers the deletion soon after.
pub(super) const ACK_WAIT: Duration = Duration::from_secs(8);

/// The read lease's figures on `/metrics`.
#[derive(Clone, Default)]
pub struct ReadLeaseMetrics {
    /// 1 while this node answers from its caches with no fence read.
    pub serving: Gauge,
    /// Nodes on the roll, this one included, as this node's watch shows.
    pub nodes: Gauge,
    /// Terms that ended other than by shutdown (lag, watch down, expiry).
    pub given_up: Counter,
}

/// What one node's read lease needs.
pub(super) struct Lessee {
    pub client: Client,
    /// `PREFIX m/node/`.
    pub roll: Vec<u8>,
    /// `PREFIX m/epoch`: the change marker.
    pub epoch_key: Vec<u8>,
    pub coherence: Arc<Coherence>,
    /// The lease of the current term (0: none), for the backend's `Drop`.
    pub lease: Arc<AtomicI64>,
    /// Set by the backend's `Drop`: take no new lease.
    pub closing: Arc<AtomicBool>,
    pub metrics: ReadLeaseMetrics,
}

impl Lessee {
    fn show(&self) {
        let serving = self.coherence.leased();
        self.metrics.serving.set(i64::from(serving));
        self.metrics
            .nodes
            .set(i64::try_from(self.coherence.roll_len()).unwrap_or(i64::MAX));
    }
}

/// Runs terms until the runtime shuts down.
pub(super) async fn run(lessee: Lessee) {
    const FIRST_PAUSE: Duration = Duration::from_millis(100);
    let mut pause = FIRST_PAUSE;
    loop {
        while !lessee.coherence.delivered().0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if lessee.closing.load(Ordering::SeqCst) {
            return;
        }
        let began = Instant::now();
        let outcome = term(&lessee).await;
        lessee.show();
        if let Err(reason) = outcome {
            lessee.metrics.given_up.inc();
            tracing::warn!(reason, "read lease given up; requests take the fence read");
        }
        // A term that lasted starts the pauses over; quick failures double it.
        pause = if began.elapsed() > Duration::from_secs(10) {
            FIRST_PAUSE
        } else {
            (pause * 2).min(Duration::from_secs(2))
        };
        tokio::time::sleep(pause).await;
    }
}

/// Aborts a task when dropped.
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One lease, from its grant to its end.
async fn term(lessee: &Lessee) -> Result<(), String> {
    let mut leases = lessee.client.lease_client();
    let ttl = i64::try_from(LEASE_TTL.as_secs()).unwrap_or(3);
    let asked = Instant::now();
    let lease = tokio::time::timeout(REQUEST_BOUND, leases.grant(ttl, None))
        .await
        .map_err(|_| "no answer to the lease grant".to_owned())?
        .map_err(|e| format!("lease grant: {e}"))?
        .id();
    lessee.lease.store(lease, Ordering::SeqCst);
    let out = if lessee.closing.load(Ordering::SeqCst) {
        Ok(())
    } else {
        hold(lessee, lease, asked).await
    };
    // Stop trusting the caches first, then let the writers go.
    lessee.coherence.left();
    let _ = tokio::time::timeout(REQUEST_BOUND, leases.revoke(lease)).await;
    lessee.lease.store(0, Ordering::SeqCst);
    out
}

/// Registers on `lease` and keeps it until something ends the term.
async fn hold(lessee: &Lessee, lease: i64, asked: Instant) -> Result<(), String> {
    let name = format!("{lease:x}");
    let key = [lessee.roll.as_slice(), name.as_bytes()].concat();
    let (_, delivered) = lessee.coherence.delivered();
    let mut kv = lessee.client.kv_client();
    let put = tokio::time::timeout(
        REQUEST_BOUND,
        kv.put(
            key.clone(),
            delivered.to_string(),
            Some(PutOptions::new().with_lease(lease)),
        ),
    )
    .await
    .map_err(|_| "no answer to the registration".to_owned())?
    .map_err(|e| format!("registration: {e}"))?;
    let created = put.header().map_or(0, |h| h.revision());
    lessee
        .coherence
        .registered(name, created, asked + LEASE_TTL - MARGIN);
    let _acks = Abort(tokio::spawn(send_acks(
        lessee.client.clone(),
        key,
        lease,
        lessee.coherence.clone(),
    )));
    let mut leases = lessee.client.lease_client();
    let mut stream = None;
    // Marker revisions read, with when each read was sent, oldest first.
    let mut unseen: VecDeque<(Instant, i64)> = VecDeque::new();
    loop {
        lessee.show();
        tokio::time::sleep(TICK).await;
        if !lessee.coherence.delivered().0 {
            return Err("the watch is down".into());
        }
        if !lessee.coherence.lease_held() {
            return Err("the lease was not renewed in time".into());
        }
        if stream.is_none() {
            match tokio::time::timeout(REQUEST_BOUND, leases.keep_alive(lease)).await {
                Ok(Ok(opened)) => stream = Some(opened),
                _ => continue,
            }
        }
        if let Some((keeper, answers)) = stream.as_mut() {
            let sent = Instant::now();
            match tokio::time::timeout(REQUEST_BOUND, keep_alive_once(keeper, answers)).await {
                Ok(Ok(answer)) if answer.ttl() > 0 => {
                    let ttl = Duration::from_secs(u64::try_from(answer.ttl()).unwrap_or(0));
                    lessee.coherence.renewed(sent + ttl.min(LEASE_TTL) - MARGIN);
                }
                Ok(Ok(_)) => return Err("the lease expired in etcd".into()),
                // A late answer must never be matched with a later
                // keep-alive: a new stream for the next one.
                _ => stream = None,
            }
        }
        let read = Instant::now();
        if let Ok(Ok(answer)) =
            tokio::time::timeout(REQUEST_BOUND, kv.get(lessee.epoch_key.clone(), None)).await
        {
            let marker = answer.kvs().first().map_or(0, |kv| kv.mod_revision());
            unseen.push_back((read, marker));
        }
        let (_, delivered) = lessee.coherence.delivered();
        while unseen
            .front()
            .is_some_and(|(_, marker)| *marker <= delivered)
        {
            unseen.pop_front();
        }
        if unseen
            .front()
            .is_some_and(|(at, _)| at.elapsed() >= LAG_LIMIT)
        {
            return Err("the watch lags behind the change marker".into());
        }
    }
}

/// Sends this node's acknowledgements as they come due, each a put of its
/// key on its lease; a failed one is sent again (writers wait for it).
async fn send_acks(client: Client, key: Vec<u8>, lease: i64, coherence: Arc<Coherence>) {
    let mut kv = client.kv_client();
    loop {
        let ack = coherence.next_ack().await;
        loop {
            let put = kv.put(
                key.clone(),
                ack.to_string(),
                Some(PutOptions::new().with_lease(lease)),
            );
            match tokio::time::timeout(REQUEST_BOUND, put).await {
                Ok(Ok(_)) => break,
                Ok(Err(error)) => tracing::debug!(%error, "read-lease acknowledgement failed"),
                Err(_) => tracing::debug!("read-lease acknowledgement went unanswered"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
