//! Login throttle counts shared by the nodes of one vault on a shared store
//! (etcd), written in bounded batches.
//!
//! Each node keeps its own [`super::login::Throttle`] in memory, as on sled.
//! On a shared store a node also:
//!
//! - notes each failure in a *pending* table (at most `max_pending` distinct
//!   throttle keys; past it, new keys count on this node only);
//! - every `flush_every_ms` writes the pending counts into storage, at most
//!   `max_slots_per_flush` records per flush, the keys with the most
//!   failures first (the rest wait for the next flush, or are forgotten
//!   once older than the throttle's window);
//! - before admitting a login, reads the stored counts of its keys (one read
//!   per key) and acts on the larger of its own count and the stored one,
//!   and on the later of the two lock-out ends.
//!
//! Storage prefix `identities/throttle/<slot>` (through the barrier, so
//! values are ciphertext): a throttle key is named by an HMAC-SHA256 under a
//! key derived from the keyring (`identities/login-throttle`), so neither a
//! role-id nor an address appears in a key name. The first 16 bytes of the
//! HMAC are the entry's tag; the slot is the tag's first four bytes modulo
//! `slots`. A slot holds at most `entries_per_slot` entries (past it, the
//! entries with the fewest failures go, locked ones last). So however many
//! identities and sources a flood makes up, the vault has at most `slots`
//! throttle records of at most `entries_per_slot` entries each: with the
//! defaults 1,024 records of at most 16 x 36 bytes.
//!
//! A slot is updated by compare-and-swap: the stored counts plus this
//! node's, so concurrent flushes of several nodes add up.
//!
//! Record format: `"KWT1" || n (u16) || n x (tag (16) || failures (u32) ||
//! last failure ms (u64) || locked until ms (u64))`, big-endian.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use super::login::{SourceNet, ThrottleConfig, ThrottleKey};
use super::IdentityError;
use crate::barrier::Barrier;
use crate::clock::{Clock, Shutdown};

const PREFIX: &str = "identities/throttle/";
const PURPOSE: &str = "identities/login-throttle";
const MAGIC: &[u8; 4] = b"KWT1";
const TAG_LEN: usize = 16;
const ENTRY_LEN: usize = TAG_LEN + 4 + 8 + 8;
/// Compare-and-swap attempts on one slot per flush.
const SLOT_ATTEMPTS: usize = 16;

type Tag = [u8; TAG_LEN];

/// Bounds of the shared counts.
#[derive(Debug, Clone, Copy)]
pub struct SharedThrottleConfig {
    /// Records in storage at most.
    pub slots: u32,
    /// Entries per record at most.
    pub entries_per_slot: usize,
    /// How often pending counts are written.
    pub flush_every_ms: u64,
    /// Records written per flush at most.
    pub max_slots_per_flush: usize,
    /// Distinct throttle keys waiting for a flush at most.
    pub max_pending: usize,
}

impl Default for SharedThrottleConfig {
    fn default() -> Self {
        Self {
            slots: 1024,
            entries_per_slot: 16,
            flush_every_ms: 500,
            max_slots_per_flush: 64,
            max_pending: 4096,
        }
    }
}

/// A count as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub failures: u32,
    pub last_failure_ms: u64,
    pub locked_until_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    slot: u32,
    limit: u32,
    failures: u32,
    last_failure_ms: u64,
}

/// What flushes did so far (for tests and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushFigures {
    pub flushes: u64,
    pub slots_written: u64,
    /// Failures not shared because the pending table was full.
    pub dropped: u64,
    /// Flushes that stopped on an error (storage refused or unreachable, a
    /// record that changed at every attempt, a sealed vault); their counts
    /// wait for the next flush.
    pub failed: u64,
}

/// What the stored records hold at one moment (read for `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredFigures {
    /// Throttle records in the store (at most `slots`).
    pub records: usize,
    /// Live entries in them.
    pub entries: usize,
    /// Entries locked out at the time asked.
    pub locked: usize,
}

/// The shared part of the login throttle (see the module text).
pub struct SharedThrottle {
    barrier: Arc<Barrier>,
    throttle: ThrottleConfig,
    config: SharedThrottleConfig,
    pending: Mutex<HashMap<Tag, Pending>>,
    /// The counters below are also on `/metrics` (`throttle_metrics`).
    flushes: Counter,
    slots_written: Counter,
    dropped: Counter,
    failed: Counter,
}

impl std::fmt::Debug for SharedThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedThrottle")
            .field("config", &self.config)
            .field("figures", &self.figures())
            .finish_non_exhaustive()
    }
}

fn key_bytes(key: &ThrottleKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(80);
    let net = |out: &mut Vec<u8>, net: &SourceNet| match net {
        SourceNet::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        SourceNet::V6(high) => {
            out.push(6);
            out.extend_from_slice(&high.to_be_bytes());
        }
        SourceNet::Unknown => out.push(0),
    };
    match key {
        ThrottleKey::RoleSource(role, source) => {
            out.push(b'r');
            net(&mut out, source);
            out.extend_from_slice(role.as_bytes());
        }
        ThrottleKey::Source(source) => {
            out.push(b's');
            net(&mut out, source);
        }
    }
    out
}

fn slot_key(slot: u32) -> String {
    format!("{PREFIX}{slot:04x}")
}

fn corrupt() -> IdentityError {
    IdentityError::Corrupt
}

fn decode(bytes: &[u8]) -> Result<Vec<(Tag, Stored)>, IdentityError> {
    let body = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(corrupt)?;
    if body.len() < 2 {
        return Err(corrupt());
    }
    let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let entries = &body[2..];
    if entries.len() != n * ENTRY_LEN {
        return Err(corrupt());
    }
    let mut out = Vec::with_capacity(n);
    for chunk in entries.chunks_exact(ENTRY_LEN) {
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&chunk[..TAG_LEN]);
        let rest = &chunk[TAG_LEN..];
        let failures = u32::from_be_bytes(rest[..4].try_into().map_err(|_| corrupt())?);
        let last = u64::from_be_bytes(rest[4..12].try_into().map_err(|_| corrupt())?);
        let until = u64::from_be_bytes(rest[12..20].try_into().map_err(|_| corrupt())?);
        out.push((
            tag,
            Stored {
                failures,
                last_failure_ms: last,
                locked_until_ms: until,
            },
        ));
    }
    Ok(out)
}

fn encode(entries: &[(Tag, Stored)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + entries.len() * ENTRY_LEN);
    out.extend_from_slice(MAGIC);
    // At most `entries_per_slot` entries, far below u16::MAX.
    let n = u16::try_from(entries.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    for (tag, s) in entries.iter().take(usize::from(n)) {
        out.extend_from_slice(tag);
        out.extend_from_slice(&s.failures.to_be_bytes());
        out.extend_from_slice(&s.last_failure_ms.to_be_bytes());
        out.extend_from_slice(&s.locked_until_ms.to_be_bytes());
    }
    out
}

impl SharedThrottle {
    pub fn new(
        barrier: Arc<Barrier>,
        throttle: ThrottleConfig,
        config: SharedThrottleConfig,
    ) -> Self {
        Self {
            barrier,
            throttle,
            config: SharedThrottleConfig {
                slots: config.slots.max(1),
                entries_per_slot: config.entries_per_slot.clamp(1, 1024),
                flush_every_ms: config.flush_every_ms.max(1),
                max_slots_per_flush: config.max_slots_per_flush.max(1),
                max_pending: config.max_pending.max(1),
            },
            pending: Mutex::new(HashMap::new()),
            flushes: Counter::default(),
            slots_written: Counter::default(),
            dropped: Counter::default(),
            failed: Counter::default(),
        }
    }

    /// The counters, for `/metrics`: (flushes, records written, flushes
    /// failed, failures dropped at the pending cap). Clones share the count.
    pub(super) fn counters(&self) -> [(&'static str, &'static str, Counter); 4] {
        [
            (
                "login_throttle_flushes",
                "flushes of this node's pending login failures to the shared throttle records",
                self.flushes.clone(),
            ),
            (
                "login_throttle_records_written",
                "shared login throttle records this node wrote (one per slot per flush)",
                self.slots_written.clone(),
            ),
            (
                "login_throttle_flush_failures",
                "flushes that stopped on an error (storage refused or unreachable, a record \
                 that changed at every attempt); their counts wait for the next flush",
                self.failed.clone(),
            ),
            (
                "login_throttle_dropped",
                "login failures not shared because the pending table was full (counted on \
                 this node only)",
                self.dropped.clone(),
            ),
        ]
    }

    pub fn config(&self) -> SharedThrottleConfig {
        self.config
    }

    pub fn figures(&self) -> FlushFigures {
        FlushFigures {
            flushes: self.flushes.get(),
            slots_written: self.slots_written.get(),
            dropped: self.dropped.get(),
            failed: self.failed.get(),
        }
    }

    /// Reads every stored record (for `/metrics`: at most `slots` reads of
    /// one scan). Damaged records count as records with no entries.
    pub fn stored_figures(&self, now_ms: u64) -> Result<StoredFigures, IdentityError> {
        let mut figures = StoredFigures::default();
        for (_, raw) in self.barrier.scan_prefix(PREFIX)? {
            figures.records += 1;
            let Ok(entries) = decode(&raw) else {
                continue;
            };
            for (_, s) in entries.iter().filter(|(_, s)| self.live(s, now_ms)) {
                figures.entries += 1;
                if s.locked_until_ms > now_ms {
                    figures.locked += 1;
                }
            }
        }
        Ok(figures)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<Tag, Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The tag and slot of `key` (needs an unsealed vault). The HMAC key
    /// is derived again for each call and never kept: a sealed node holds
    /// no key material, so nothing can be named (or noted) while sealed.
    fn tag(&self, key: &ThrottleKey) -> Result<(Tag, u32), IdentityError> {
        let derived = self.barrier.derive_key(PURPOSE)?;
        let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_slice());
        let sum = ring::hmac::sign(&hmac, &key_bytes(key));
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&sum.as_ref()[..TAG_LEN]);
        let slot = u32::from_be_bytes([tag[0], tag[1], tag[2], tag[3]]) % self.config.slots;
        Ok((tag, slot))
    }

    /// Whether a stored entry still counts at `now_ms` (the same ageing as
    /// the in-memory throttle).
    fn live(&self, s: &Stored, now_ms: u64) -> bool {
        s.locked_until_ms > now_ms
            || (s.failures != 0
                && now_ms.saturating_sub(s.last_failure_ms) < self.throttle.window_ms)
    }

    /// The stored count of `key`, if one is live.
    pub fn stored(&self, key: &ThrottleKey, now_ms: u64) -> Result<Option<Stored>, IdentityError> {
        let (tag, slot) = self.tag(key)?;
        let Some(raw) = self.barrier.get(&slot_key(slot))? else {
            return Ok(None);
        };
        Ok(decode(&raw)?
            .into_iter()
            .find(|(t, s)| *t == tag && self.live(s, now_ms))
            .map(|(_, s)| s))
    }

    /// Notes one failure of `key` (whose limit is `limit`) for the next flush.
    pub fn note_failure(&self, key: &ThrottleKey, limit: u32, now_ms: u64) {
        let Ok((tag, slot)) = self.tag(key) else {
            return;
        };
        let mut pending = self.pending();
        let full = pending.len() >= self.config.max_pending;
        match pending.get_mut(&tag) {
            Some(p) => {
                p.failures = p.failures.saturating_add(1);
                p.last_failure_ms = p.last_failure_ms.max(now_ms);
            }
            None if full => {
                self.dropped.inc();
            }
            None => {
                pending.insert(
                    tag,
                    Pending {
                        slot,
                        limit,
                        failures: 1,
                        last_failure_ms: now_ms,
                    },
                );
            }
        }
    }

    /// Forgets this node's failures of `key` not yet flushed (a success
    /// when the shared record holds no count of `key`: nothing to clear
    /// there, no storage request).
    pub fn forget_pending(&self, key: &ThrottleKey) -> Result<(), IdentityError> {
        let (tag, _) = self.tag(key)?;
        self.pending().remove(&tag);
        Ok(())
    }

    /// A successful login of `key` (a role-id from a source): its failures
    /// are forgotten here and in the shared record, as the in-memory
    /// throttle forgets them, so that the other nodes (and this one, which
    /// reads the shared count at each admission) do not count them again.
    /// A lock-out in force stays. One read; a write only when the shared
    /// record holds the key.
    pub fn succeeded(&self, key: &ThrottleKey, now_ms: u64) -> Result<(), IdentityError> {
        let (tag, slot) = self.tag(key)?;
        self.pending().remove(&tag);
        let key = slot_key(slot);
        for _ in 0..SLOT_ATTEMPTS {
            let Some((raw, stamp)) = self.barrier.get_stamped(&key)? else {
                return Ok(());
            };
            let mut record = decode(&raw)?;
            let before = record.len();
            // A lock-out stays: on one node a success cannot happen while
            // the key is locked, so a lock this node had not read yet (the
            // flush gap) was set by failures it must not wipe.
            record
                .retain(|(t, s)| (*t != tag || s.locked_until_ms > now_ms) && self.live(s, now_ms));
            if record.len() == before {
                return Ok(());
            }
            let value = (!record.is_empty()).then(|| encode(&record));
            if self
                .barrier
                .compare_and_swap(&key, Some(&stamp), value.as_deref())?
            {
                return Ok(());
            }
        }
        Err(IdentityError::Barrier(
            crate::barrier::BarrierError::Storage(crate::storage::StorageError::Busy(
                "a login throttle record changed at every attempt".into(),
            )),
        ))
    }

    /// Writes pending counts: at most `max_slots_per_flush` records, the
    /// slots with the most pending failures first; the others go back to
    /// the pending table (those older than the window are forgotten).
    /// Returns how many records were written.
    pub fn flush(&self, now_ms: u64) -> Result<usize, IdentityError> {
        let taken = std::mem::take(&mut *self.pending());
        if taken.is_empty() {
            return Ok(0);
        }
        self.flushes.inc();
        let mut by_slot: BTreeMap<u32, Vec<(Tag, Pending)>> = BTreeMap::new();
        for (tag, p) in taken {
            by_slot.entry(p.slot).or_default().push((tag, p));
        }
        let mut slots: Vec<(u32, Vec<(Tag, Pending)>)> = by_slot.into_iter().collect();
        slots.sort_by_key(|(slot, entries)| {
            let total: u64 = entries.iter().map(|(_, p)| u64::from(p.failures)).sum();
            (std::cmp::Reverse(total), *slot)
        });
        let later = slots.split_off(slots.len().min(self.config.max_slots_per_flush));
        self.put_back(later.into_iter().flat_map(|(_, e)| e), now_ms);
        let mut written = 0;
        let mut slots = slots.into_iter();
        while let Some((slot, entries)) = slots.next() {
            if let Err(error) = self.merge_slot(slot, &entries, now_ms) {
                self.failed.inc();
                self.put_back(entries.into_iter(), now_ms);
                self.put_back(slots.flat_map(|(_, e)| e), now_ms);
                return Err(error);
            }
            written += 1;
            self.slots_written.inc();
        }
        Ok(written)
    }

    fn put_back(&self, entries: impl Iterator<Item = (Tag, Pending)>, now_ms: u64) {
        let mut pending = self.pending();
        for (tag, p) in entries {
            if now_ms.saturating_sub(p.last_failure_ms) >= self.throttle.window_ms {
                continue;
            }
            let full = pending.len() >= self.config.max_pending;
            match pending.get_mut(&tag) {
                Some(q) => {
                    q.failures = q.failures.saturating_add(p.failures);
                    q.last_failure_ms = q.last_failure_ms.max(p.last_failure_ms);
                }
                None if full => {
                    self.dropped.inc_by(u64::from(p.failures));
                }
                None => {
                    pending.insert(tag, p);
                }
            }
        }
    }

    /// Adds `entries` to the stored record of `slot` by compare-and-swap.
    fn merge_slot(
        &self,
        slot: u32,
        entries: &[(Tag, Pending)],
        now_ms: u64,
    ) -> Result<(), IdentityError> {
        let key = slot_key(slot);
        for _ in 0..SLOT_ATTEMPTS {
            let stored = self.barrier.get_stamped(&key)?;
            let (mut record, stamp) = match &stored {
                Some((raw, stamp)) => (decode(raw)?, Some(stamp)),
                None => (Vec::new(), None),
            };
            record.retain(|(_, s)| self.live(s, now_ms));
            for (tag, p) in entries {
                let index = match record.iter().position(|(t, _)| t == tag) {
                    Some(i) => i,
                    None => {
                        record.push((
                            *tag,
                            Stored {
                                failures: 0,
                                last_failure_ms: 0,
                                locked_until_ms: 0,
                            },
                        ));
                        record.len() - 1
                    }
                };
                let s = &mut record[index].1;
                if now_ms.saturating_sub(s.last_failure_ms) >= self.throttle.window_ms
                    && s.locked_until_ms <= now_ms
                {
                    s.failures = 0;
                }
                s.failures = s.failures.saturating_add(p.failures);
                s.last_failure_ms = s.last_failure_ms.max(p.last_failure_ms);
                let limit = p.limit.max(1);
                if s.failures >= limit {
                    let doublings = (s.failures - limit).min(20);
                    let backoff = self
                        .throttle
                        .backoff_ms
                        .saturating_mul(1u64 << doublings)
                        .min(self.throttle.max_backoff_ms);
                    s.locked_until_ms = s
                        .locked_until_ms
                        .max(s.last_failure_ms.saturating_add(backoff));
                }
            }
            if record.len() > self.config.entries_per_slot {
                // Locked entries last to go, then the most failures.
                record.sort_by_key(|(_, s)| {
                    (
                        std::cmp::Reverse(s.locked_until_ms > now_ms),
                        std::cmp::Reverse(s.failures),
                        std::cmp::Reverse(s.last_failure_ms),
                    )
                });
                record.truncate(self.config.entries_per_slot);
            }
            let value = (!record.is_empty()).then(|| encode(&record));
            if self
                .barrier
                .compare_and_swap(&key, stamp, value.as_deref())?
            {
                return Ok(());
            }
        }
        Err(IdentityError::Barrier(
            crate::barrier::BarrierError::Storage(crate::storage::StorageError::Busy(
                "a login throttle record changed at every attempt".into(),
            )),
        ))
    }

    /// Flushes every `flush_every_ms` until `shutdown`, then once more. A
    /// failed flush (sealed vault, storage down) keeps the counts for the
    /// next one.
    pub async fn run_flusher(self: Arc<Self>, clock: Clock, shutdown: Shutdown) {
        let every = Duration::from_millis(self.config.flush_every_ms);
        loop {
            tokio::select! {
                () = shutdown.wait() => break,
                () = clock.sleep(every) => {}
            }
            let me = Arc::clone(&self);
            let now = clock.now_ms();
            match tokio::task::spawn_blocking(move || me.flush(now)).await {
                Ok(Err(error)) => tracing::debug!(%error, "login throttle flush failed"),
                Ok(Ok(_)) => {}
                Err(error) => tracing::warn!(%error, "login throttle flush panicked"),
            }
        }
        let _ = self.flush(clock.now_ms());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let entries = vec![
            (
                [1u8; TAG_LEN],
                Stored {
                    failures: 3,
                    last_failure_ms: 7,
                    locked_until_ms: 9,
                },
            ),
            (
                [2u8; TAG_LEN],
                Stored {
                    failures: 1,
                    last_failure_ms: 2,
                    locked_until_ms: 0,
                },
            ),
        ];
        let bytes = encode(&entries);
        assert_eq!(bytes.len(), 6 + 2 * ENTRY_LEN);
        assert_eq!(decode(&bytes).unwrap(), entries);
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(b"KWT0\0\0").is_err());
        assert!(decode(&encode(&[])).unwrap().is_empty());
    }

    /// A sealed node holds no key material: the throttle's HMAC key (derived
    /// from the keyring) must not outlive the seal, and no failure can be
    /// named (or noted) while sealed.
    #[test]
    fn the_hmac_key_does_not_outlive_a_seal() {
        let dir = tempfile::tempdir().unwrap();
        let backend = crate::storage::SledBackend::open(dir.path()).unwrap();
        let barrier =
            Barrier::new(Arc::new(backend), crate::barrier::BarrierOptions::default()).unwrap();
        let shares = barrier.init(1, 1).unwrap();
        barrier.unseal(&shares[0].0).unwrap();
        let barrier = Arc::new(barrier);
        let shared = SharedThrottle::new(
            Arc::clone(&barrier),
            ThrottleConfig::default(),
            SharedThrottleConfig::default(),
        );
        let key = ThrottleKey::Source(SourceNet::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
        assert!(shared.tag(&key).is_ok());
        shared.note_failure(&key, 5, 1);
        barrier.seal();
        assert!(
            shared.tag(&key).is_err(),
            "the throttle HMAC key was still usable after the vault was sealed"
        );
        shared.note_failure(&key, 5, 2);
        let pending = shared.pending();
        assert_eq!(pending.values().map(|p| p.failures).sum::<u32>(), 1);
    }

    #[test]
    fn key_names_differ_by_kind_source_and_role() {
        let v4 = SourceNet::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
        let keys = [
            key_bytes(&ThrottleKey::Source(v4)),
            key_bytes(&ThrottleKey::Source(SourceNet::V6(1))),
            key_bytes(&ThrottleKey::Source(SourceNet::Unknown)),
            key_bytes(&ThrottleKey::role_source("a", v4)),
            key_bytes(&ThrottleKey::role_source("b", v4)),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
