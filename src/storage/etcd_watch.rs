//! The watch that feeds [`Coherence`] on etcd (see `storage::coherence` for
//! why caches stay right). It runs on the backend's own runtime for as long
//! as the backend lives.
//!
//! One watch covers the whole vault prefix (`PREFIX d/...` data keys and the
//! `PREFIX m/epoch` marker). Each session:
//!
//! 1. reads the cluster's revision `S` and the read-lease roll
//!    (`PREFIX m/node/`, see `storage::members`) at `S` (one linearizable
//!    read);
//! 2. opens a watch from `S + 1` and waits for etcd to confirm it;
//! 3. calls `Coherence::reset(S)`: every cache forgets everything, *after*
//!    `S` was read, so whatever a node reads from now on is at `S` or later,
//!    and every later change comes through the watch;
//! 4. hands each response's changed keys, the roll's changed keys, and the
//!    highest revision in it, to `Coherence::deliver_all` (etcd sends all
//!    events of one revision in one response, in revision order).
//!
//! Any error, an end of the stream or a cancel (a compacted start revision)
//! marks the feed down (`Coherence::down`: fences say no, requests read
//! etcd) and starts a new session after a short pause.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};

use super::coherence::Coherence;
use super::members::Entry;

/// The pause before a new session after a failed one (grows to 2 s).
const RETRY: Duration = Duration::from_millis(100);

/// What one session watches.
pub(super) struct Feed {
    pub client: Client,
    /// `PREFIX`: the watch's range is every key under it.
    pub prefix: Vec<u8>,
    /// `PREFIX d/`: stripped from data keys before they are handed out.
    pub data: Vec<u8>,
    /// `PREFIX m/node/`: the read-lease roll.
    pub roll: Vec<u8>,
    /// `PREFIX m/epoch`: the change marker.
    pub epoch: Vec<u8>,
    pub coherence: Arc<Coherence>,
}

/// Runs sessions until the runtime shuts down.
pub(super) async fn run(feed: Feed) {
    let mut pause = RETRY;
    loop {
        match session(&feed).await {
            Ok(()) => pause = RETRY,
            Err(reason) => {
                tracing::warn!(reason, "etcd watch for the caches stopped; caches bypassed");
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
        feed.coherence.down();
        tokio::time::sleep(pause).await;
    }
}

/// One watch, from its start to its first failure.
async fn session(feed: &Feed) -> Result<(), String> {
    let mut client = feed.client.clone();
    let start = client
        .get(
            feed.roll.clone(),
            Some(GetOptions::new().with_range(super::etcd_backend::prefix_end(&feed.roll))),
        )
        .await
        .map_err(|e| format!("revision read: {e}"))?;
    let revision = start.header().map_or(0, |h| h.revision());
    let roll: HashMap<String, Entry> = start
        .kvs()
        .iter()
        .filter_map(|kv| roll_entry(feed, kv))
        .collect();
    let options = WatchOptions::new()
        .with_range(super::etcd_backend::prefix_end(&feed.prefix))
        .with_start_revision(revision + 1);
    let mut stream = client
        .watch_client()
        .max_decoding_message_size(super::etcd_backend::MAX_ANSWER_BYTES)
        .watch(feed.prefix.clone(), Some(options))
        .await
        .map_err(|e| format!("watch: {e}"))?;
    // The first answer confirms the watch (or cancels it).
    match stream.message().await {
        Ok(Some(answer)) if answer.created() && !answer.canceled() => {}
        Ok(Some(answer)) => {
            return Err(format!("watch refused: {}", answer.cancel_reason()));
        }
        Ok(None) => return Err("watch stream ended at once".into()),
        Err(e) => return Err(format!("watch: {e}")),
    }
    feed.coherence.reset_with(revision, Some(roll));
    loop {
        let answer = match stream.message().await {
            Ok(Some(answer)) => answer,
            Ok(None) => return Err("watch stream ended".into()),
            Err(e) => return Err(format!("watch: {e}")),
        };
        // etcd marks a watch that a compaction overtook with the compacted
        // revision (and cancels it); either ends this session, and the next
        // starts from a fresh revision and empties the caches.
        if answer.canceled() || answer.compact_revision() != 0 {
            return Err(format!(
                "watch cancelled (compacted at {}): {}",
                answer.compact_revision(),
                answer.cancel_reason()
            ));
        }
        let mut highest = 0i64;
        let mut keys = Vec::with_capacity(answer.events().len());
        let mut nodes = Vec::new();
        let mut marker = 0i64;
        for event in answer.events() {
            let Some(kv) = event.kv() else { continue };
            highest = highest.max(kv.mod_revision());
            if kv.key() == feed.epoch.as_slice() {
                marker = marker.max(kv.mod_revision());
            } else if let Some(key) = kv.key().strip_prefix(feed.data.as_slice()) {
                keys.push((key.to_vec(), kv.mod_revision()));
            } else if let Some((name, entry)) = roll_entry(feed, kv) {
                let deleted = event.event_type() == EventType::Delete;
                nodes.push((name, (!deleted).then_some(entry)));
            }
        }
        if highest > 0 {
            feed.coherence.deliver_all(highest, keys, nodes, marker);
        }
    }
}

/// A key of the read-lease roll: its name and entry (an acknowledgement
/// that does not parse counts as none).
fn roll_entry(feed: &Feed, kv: &KeyValue) -> Option<(String, Entry)> {
    let name = kv.key().strip_prefix(feed.roll.as_slice())?;
    let acked = std::str::from_utf8(kv.value())
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some((
        String::from_utf8_lossy(name).into_owned(),
        Entry {
            created: kv.create_revision(),
            acked,
        },
    ))
}
