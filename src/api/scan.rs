//! `keyward.v1.Scan`: the server half of the discovery scan. Candidate
//! values in, the stored secrets holding them out, without any value going
//! back, into a log or into the audit record (which names the method,
//! `sys/scan`, the caller and the outcome; the counts go to the server log).
//!
//! It must not become a guessing oracle: it needs `scan` on `sys/scan`;
//! a candidate the scanner's own rule calls weak (`scan::worth_checking`:
//! shorter than 12 characters or of low entropy) is not checked; one call
//! carries at most [`MAX_CANDIDATES_PER_CALL`]; and each identity has a
//! token bucket of [`CANDIDATES_PER_MINUTE`] checked candidates a minute
//! (full at first, refilled continuously on the server's clock), beyond
//! which the whole call is refused with `RESOURCE_EXHAUSTED` before
//! anything is checked. A match on a secret the caller may not `read`
//! names only the secret's owner, once per candidate and owner however many
//! secrets, versions or fields of that owner hold the value.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use super::{begin, Access, Failure, FailureKind};
use crate::core::auth::Caller;
use crate::core::offload::Work;
use crate::core::Core;
use crate::policy::Capability;
use crate::proto::v1::scan_server::Scan;
use crate::proto::v1::*;

/// Candidates one call may carry.
pub const MAX_CANDIDATES_PER_CALL: usize = 1000;
/// Candidates one identity may have checked per minute (and at once).
pub const CANDIDATES_PER_MINUTE: u32 = 20_000;
/// Identities whose buckets are remembered; beyond it, full buckets are
/// forgotten (a full bucket is what a forgotten one starts as).
const MAX_BUCKETS: usize = 10_000;

struct Bucket {
    /// Candidates available, in thousandths.
    milli: u64,
    at_ms: u64,
}

/// The per-identity token buckets.
struct Limiter {
    capacity: u64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    fn new(per_minute: u32) -> Self {
        Self {
            capacity: u64::from(per_minute) * 1000,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `n` candidates from `identity`'s bucket, or none if it holds
    /// fewer.
    fn take(&self, identity: &str, n: u64, now_ms: u64) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let capacity = self.capacity;
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(identity) {
            buckets.retain(|_, b| {
                // Per minute = capacity/60_000 thousandths per ms.
                let refill = now_ms.saturating_sub(b.at_ms).saturating_mul(capacity) / 60_000;
                b.milli.saturating_add(refill) < capacity
            });
        }
        let bucket = buckets.entry(identity.to_owned()).or_insert(Bucket {
            milli: capacity,
            at_ms: now_ms,
        });
        let refill = now_ms.saturating_sub(bucket.at_ms).saturating_mul(capacity) / 60_000;
        bucket.milli = bucket.milli.saturating_add(refill).min(capacity);
        bucket.at_ms = now_ms.max(bucket.at_ms);
        let cost = n.saturating_mul(1000);
        if bucket.milli >= cost {
            bucket.milli -= cost;
            true
        } else {
            false
        }
    }
}

pub struct ScanService {
    core: Arc<Core>,
    limiter: Limiter,
}

impl ScanService {
    pub fn new(core: Arc<Core>) -> Self {
        Self::with_rate(core, CANDIDATES_PER_MINUTE)
    }

    /// A service whose identities may have `per_minute` candidates checked.
    pub fn with_rate(core: Arc<Core>, per_minute: u32) -> Self {
        Self {
            core,
            limiter: Limiter::new(per_minute),
        }
    }
}

fn may_read(caller: &Caller, path: &str) -> bool {
    caller
        .set
        .check(&format!("secret/{path}"), Capability::Read)
        .is_some()
}

#[tonic::async_trait]
impl Scan for ScanService {
    async fn r#match(
        &self,
        req: Request<ScanMatchRequest>,
    ) -> Result<Response<ScanMatchResponse>, Status> {
        let mut call = begin(&self.core, "keyward.v1.Scan/Match", Access::Token, &req).await?;
        call.authorize(Capability::Scan, "sys/scan".to_owned())?;
        let mut caller = call.require_caller()?;
        let r = req.into_inner();
        if r.candidates.len() > MAX_CANDIDATES_PER_CALL {
            return Err(call
                .fail(Failure::new(
                    FailureKind::InvalidInput,
                    format!("at most {MAX_CANDIDATES_PER_CALL} candidates per call"),
                ))
                .into());
        }
        let strong: Vec<(u32, &str)> = r
            .candidates
            .iter()
            .zip(0u32..)
            .filter(|(c, _)| crate::scan::worth_checking(c))
            .map(|(c, i)| (i, c.as_str()))
            .collect();
        let now_ms = self.core.clock().now_ms();
        if !self
            .limiter
            .take(&caller.identity, strong.len() as u64, now_ms)
        {
            return Err(call
                .fail(Failure::new(
                    FailureKind::Exhausted,
                    format!(
                        "scan rate limit: at most {CANDIDATES_PER_MINUTE} candidates a minute per identity; try again later"
                    ),
                ))
                .into());
        }
        let mut matches = Vec::new();
        let mut metas = HashMap::new();
        let found = if strong.is_empty() {
            Vec::new()
        } else {
            // On the blocking pool: on etcd a Match may read the whole
            // store's metadata for the node's index (`secrets::print_index`),
            // under a lock the next Match waits for, which must not hold a
            // runtime worker. It takes a turn of the node's matches
            // (`core::offload::MATCHES_AT_ONCE`), so a flood cannot fill
            // the blocking pools with threads, and the caller is checked
            // again once its turn has come: what it may see follows its
            // token and policies as they stand then. The candidates are
            // copied in as zeroized buffers.
            let values: Vec<zeroize::Zeroizing<Vec<u8>>> = strong
                .iter()
                .map(|(_, c)| zeroize::Zeroizing::new(c.as_bytes().to_vec()))
                .collect();
            let fresh = caller.fresh;
            let (found, checked) = call
                .off_thread_as(Work::Match, move |core, checked| {
                    let values: Vec<&[u8]> = values.iter().map(|v| v.as_slice()).collect();
                    let found = core.secrets.match_values(&values, fresh)?;
                    Ok::<_, Failure>((found, checked.cloned()))
                })
                .await?;
            if let Some(checked) = checked {
                caller = checked;
            }
            found
        };
        for ((index, _), found) in strong.iter().zip(found) {
            // Owners already named for this candidate without a path: one
            // answer per owner, so a blind caller learns no count of the
            // secrets, versions or fields holding the value.
            let mut blind_owners = std::collections::HashSet::new();
            for m in found {
                if !metas.contains_key(&m.path) {
                    let path = call.check(crate::secrets::SecretPath::parse(&m.path))?;
                    let meta = call.check(self.core.secrets.metadata(&path))?;
                    metas.insert(m.path.clone(), meta);
                }
                let Some(meta) = metas.get(&m.path) else {
                    continue;
                };
                // The metadata as read now: a version that lost its stage
                // (or was destroyed) since the match is not reported.
                if !meta.is_staged_and_kept(m.version) {
                    continue;
                }
                let owner = meta.owner.clone();
                if may_read(&caller, &m.path) {
                    let stage = meta
                        .stage_of(m.version)
                        .map(|s| s.as_str().to_owned())
                        .unwrap_or_default();
                    matches.push(ScanMatch {
                        candidate: *index,
                        owner,
                        readable: true,
                        path: m.path,
                        fields: m.fields,
                        version: m.version,
                        stage,
                    });
                } else if blind_owners.insert(owner.clone()) {
                    matches.push(ScanMatch {
                        candidate: *index,
                        owner,
                        readable: false,
                        ..ScanMatch::default()
                    });
                }
            }
        }
        let checked = strong.len() as u32;
        let skipped_weak = r.candidates.len() as u32 - checked;
        tracing::info!(
            identity = %caller.identity,
            request_id = %call.request_id(),
            candidates = r.candidates.len(),
            checked,
            matches = matches.len(),
            "scan match"
        );
        call.ok(&[])?;
        Ok(Response::new(ScanMatchResponse {
            matches,
            checked,
            skipped_weak,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_refuses_beyond_its_rate_and_refills_with_time() {
        let limiter = Limiter::new(600);
        assert!(limiter.take("a", 600, 0));
        assert!(!limiter.take("a", 1, 0));
        // Another identity has its own bucket.
        assert!(limiter.take("b", 10, 0));
        // 10 per second: after 1 s, 10 more, not 11.
        assert!(!limiter.take("a", 11, 1_000));
        assert!(limiter.take("a", 10, 1_000));
        // Never more than a minute's worth.
        assert!(!limiter.take("a", 601, 3_600_000));
        assert!(limiter.take("a", 600, 3_600_000));
    }
}
