//! Read leases on etcd: which nodes answer from their caches with no fence
//! read, and the acknowledgements that writers wait for.
//!
//! The fence of `coherence` costs each request (or each batch of
//! concurrent requests) one linearizable read of etcd, and on a busy node
//! that read is most of the time a Get takes. A read lease moves that cost
//! from reads to writes:
//!
//! - **Registration.** A node with a read lease holds an etcd lease and
//!   one key on it, `PREFIX m/node/<lease id>`. The key's value is the
//!   node's *acknowledgement*: a revision up to which its watch has
//!   delivered every change (the caches' callbacks have run). Its create
//!   revision names the registration.
//! - **Writers wait.** A write of a tracked key is answered to its caller
//!   only once the writer's own watch has delivered the write's revision
//!   (so the writer's roll holds every node that registered before it),
//!   and then every *other* node on the roll has acknowledged that
//!   revision, or has left the roll (its key deleted: its lease expired or
//!   it revoked it). The writer's own caches take the write before it
//!   returns (`Coherence::settle`).
//! - **Readers trust their caches** while their lease holds, counted on
//!   this node's clock from the *sending* of the last answered keep-alive,
//!   less a margin. etcd ends a lease no earlier than its TTL after it
//!   received that keep-alive, so a node's own count always runs out
//!   first, and a node that was paused or cut off has stopped trusting its
//!   caches before the writers stop waiting for it.
//! - **Joining.** A node trusts its caches only after its watch has
//!   delivered its own registration. A write answered before that
//!   registration was committed is then delivered too; a write committed
//!   after it is waited for by its writer, whose roll holds the newcomer.
//! - **Leaving.** A node whose watch is down, or lags more than
//!   `LAG_LIMIT` behind the change marker, stops trusting its caches and
//!   only then revokes its lease, so that writers stop waiting for it.
//!   Its requests go back to the fence read.
//!
//! This module holds the roll as the watch delivered it and decides the
//! questions above; `etcd_members` runs the lease, and `coherence` owns one
//! [`Roll`] behind a lock.

use std::collections::HashMap;
use std::time::Instant;

/// One node's key on the roll, as the watch delivered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The key's create revision: the node's registration.
    pub created: i64,
    /// The revision up to which that node's watch has delivered everything.
    pub acked: i64,
}

/// This node's own registration.
#[derive(Clone, Debug)]
struct Own {
    name: String,
    created: i64,
    /// The lease may have ended in etcd from this instant on (less margin).
    valid_until: Instant,
}

/// The nodes on the roll and this node's part in it.
#[derive(Debug, Default)]
pub struct Roll {
    /// Every key on the roll by name (the lease id), this node's included.
    nodes: HashMap<String, Entry>,
    own: Option<Own>,
    /// The highest revision of a tracked change the watch delivered.
    changed: i64,
    /// The highest acknowledgement this node has sent.
    acked: i64,
}

impl Roll {
    /// A new watch session read the roll at `revision`: it replaces what
    /// was known, and an acknowledgement of `revision` is due.
    pub fn reset(&mut self, revision: i64, nodes: HashMap<String, Entry>) {
        if let Some(own) = &self.own {
            if !nodes.contains_key(&own.name) && own.created <= revision {
                self.own = None;
            }
        }
        self.nodes = nodes;
        self.changed = self.changed.max(revision);
    }

    /// The watch delivered a change of one node's key (`None`: deleted).
    /// This node's own key deleted means its lease is gone in etcd, whatever
    /// its own count says: it stops trusting its caches at once.
    pub fn update(&mut self, name: &str, entry: Option<Entry>) {
        match entry {
            Some(entry) => {
                self.nodes.insert(name.to_owned(), entry);
            }
            None => {
                self.nodes.remove(name);
                if self.is_own(name) {
                    self.own = None;
                }
            }
        }
    }

    /// The watch delivered a tracked change at `revision`.
    pub fn changed(&mut self, revision: i64) {
        self.changed = self.changed.max(revision);
    }

    fn is_own(&self, name: &str) -> bool {
        self.own.as_ref().is_some_and(|own| own.name == name)
    }

    /// This node registered as `name` at revision `created`; its lease
    /// holds until `valid_until` (less margin).
    pub fn registered(&mut self, name: String, created: i64, valid_until: Instant) {
        self.own = Some(Own {
            name,
            created,
            valid_until,
        });
        self.acked = 0;
    }

    /// A keep-alive was answered: the lease holds until `valid_until`.
    pub fn renewed(&mut self, valid_until: Instant) {
        if let Some(own) = self.own.as_mut() {
            own.valid_until = own.valid_until.max(valid_until);
        }
    }

    /// This node no longer holds a lease (or is about to give it up).
    pub fn left(&mut self) {
        self.own = None;
    }

    /// Whether this node registered and may still hold its lease (its
    /// acknowledgements are then waited for by writers).
    pub fn holds(&self, now: Instant) -> bool {
        self.own.as_ref().is_some_and(|own| now < own.valid_until)
    }

    /// Whether a request that starts `now` may trust the caches with no
    /// fence read, the watch having delivered up to `delivered`.
    pub fn serving(&self, now: Instant, delivered: i64) -> bool {
        self.own
            .as_ref()
            .is_some_and(|own| now < own.valid_until && delivered >= own.created)
    }

    /// The other nodes that have not acknowledged `revision` yet: a write
    /// at `revision` is acknowledged to its caller when this is empty.
    pub fn pending(&self, revision: i64) -> usize {
        self.nodes
            .iter()
            .filter(|(name, entry)| !self.is_own(name) && entry.acked < revision)
            .count()
    }

    /// The acknowledgement to send now, if one is due: this node holds a
    /// lease and a tracked change has come since the last one. `delivered`
    /// is what the watch has delivered; it is taken as sent.
    ///
    /// A node alone on the roll acknowledges too: the writer may be a node
    /// that holds no lease (`read_lease = false`, or one that gave its
    /// lease up), which this node cannot see.
    pub fn due(&mut self, delivered: i64) -> Option<i64> {
        self.own.as_ref()?;
        if delivered <= self.acked || self.changed <= self.acked {
            return None;
        }
        self.acked = delivered;
        Some(delivered)
    }

    /// How many nodes are on the roll (status, tests).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(created: i64, acked: i64) -> Option<Entry> {
        Some(Entry { created, acked })
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn a_node_alone_serves_once_its_watch_delivered_its_registration() {
        let mut roll = Roll::default();
        assert!(!roll.serving(Instant::now(), 100));
        roll.registered("a".into(), 10, later());
        roll.update("a", entry(10, 0));
        assert!(!roll.serving(Instant::now(), 9));
        assert!(roll.serving(Instant::now(), 10));
        // Alone, nobody waits for it and it sends no acknowledgement.
        roll.changed(11);
        assert_eq!(roll.pending(11), 0);
    }

    #[test]
    fn a_newcomer_is_waited_for_once_on_the_roll() {
        let mut roll = Roll::default();
        roll.registered("a".into(), 1, later());
        roll.update("a", entry(1, 0));
        assert_eq!(roll.pending(10), 0);
        roll.update("d", entry(20, 0));
        assert_eq!(roll.pending(21), 1);
        assert_eq!(roll.pending(0), 0);
    }

    #[test]
    fn its_own_key_deleted_ends_a_nodes_lease_whatever_its_count_says() {
        let mut roll = Roll::default();
        roll.registered("a".into(), 10, later());
        roll.update("a", entry(10, 0));
        assert!(roll.serving(Instant::now(), 10));
        roll.update("a", None);
        assert!(!roll.serving(Instant::now(), 10));
        // A new session's roll without it: the same.
        roll.registered("a2".into(), 12, later());
        roll.reset(15, HashMap::new());
        assert!(!roll.serving(Instant::now(), 15));
        // One registered after the session's read keeps its lease.
        roll.registered("a3".into(), 16, later());
        roll.reset(15, HashMap::new());
        assert!(roll.serving(Instant::now(), 16));
    }

    #[test]
    fn a_lease_counted_out_stops_serving_whatever_the_roll_says() {
        // (`renewed` keeps the later of two ends: a late answer for an
        // older keep-alive never shortens the count.)
        let mut roll = Roll::default();
        let start = Instant::now();
        roll.registered("a".into(), 10, start + Duration::from_secs(2));
        assert!(roll.serving(start, 10));
        assert!(!roll.serving(start + Duration::from_secs(2), 10));
        assert!(!roll.holds(start + Duration::from_secs(2)));
        roll.renewed(start + Duration::from_secs(4));
        assert!(roll.serving(start + Duration::from_secs(3), 10));
        roll.renewed(start + Duration::from_secs(1));
        assert!(roll.serving(start + Duration::from_secs(3), 10));
        roll.left();
        assert!(!roll.serving(start, 10));
    }

    #[test]
    fn a_write_waits_for_the_other_nodes_until_they_acknowledge_or_leave() {
        let mut roll = Roll::default();
        roll.registered("a".into(), 1, later());
        roll.update("a", entry(1, 0));
        roll.update("b", entry(2, 30));
        roll.update("c", entry(3, 40));
        assert_eq!(roll.pending(30), 0);
        assert_eq!(roll.pending(35), 1);
        assert_eq!(roll.pending(50), 2);
        roll.update("c", None);
        assert_eq!(roll.pending(50), 1);
        roll.update("b", entry(2, 50));
        assert_eq!(roll.pending(50), 0);
    }

    #[test]
    fn acknowledgements_follow_tracked_changes() {
        let mut roll = Roll::default();
        roll.registered("a".into(), 1, later());
        roll.update("a", entry(1, 0));
        assert_eq!(roll.due(3), None, "nothing tracked changed");
        roll.changed(5);
        assert_eq!(roll.due(5), Some(5));
        assert_eq!(roll.due(6), None, "nothing tracked changed since");
        roll.changed(8);
        assert_eq!(roll.due(8), Some(8));
        assert_eq!(roll.due(8), None);
        // A new session's roll asks for one again.
        roll.reset(
            20,
            HashMap::from([
                (
                    "a".to_owned(),
                    Entry {
                        created: 1,
                        acked: 8,
                    },
                ),
                (
                    "b".to_owned(),
                    Entry {
                        created: 2,
                        acked: 8,
                    },
                ),
            ]),
        );
        assert_eq!(roll.due(20), Some(20));
        // Without a lease, a node acknowledges nothing.
        roll.left();
        roll.changed(30);
        assert_eq!(roll.due(30), None);
    }
}
