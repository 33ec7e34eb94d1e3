//! The identity-expiry sweep: a background task that revokes the tokens of
//! identities whose expiry has passed, and the certificates issued to log
//! in as them.
//!
//! It holds exactly what it uses ([`IdentityExpiry`]): the identity store,
//! the token store as a [`TokenRevoker`], the PKI as a
//! [`CertificateRevoker`], the barrier (only to skip a sweep
//! while sealed) and the clock. Tokens also carry their identity's expiry as
//! a hard limit, so this sweep is the second line, not the first.

use std::sync::Arc;
use std::time::Duration;

use super::{CertificateRevoker, IdentityError, IdentityStore, Swept, TokenRevoker};
use crate::barrier::Barrier;
use crate::clock::{Clock, Shutdown};

/// The longest the sweep sleeps without looking for expired identities.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// The shortest sleep between two looks (an expiry set in the past).
const MIN_SLEEP: Duration = Duration::from_millis(50);

/// The handles the sweep uses.
pub struct IdentityExpiry {
    pub identities: Arc<IdentityStore>,
    pub tokens: Arc<dyn TokenRevoker + Send + Sync>,
    pub certificates: Arc<dyn CertificateRevoker + Send + Sync>,
    pub barrier: Arc<Barrier>,
    pub clock: Clock,
}

impl IdentityExpiry {
    /// Sleeps until the next identity expiry (at most [`SWEEP_EVERY`], or
    /// until an expiry is set), revokes what is due; until `shutdown`. The
    /// first sweep that runs catches up on the certificates of identities
    /// that expired before 0.6.15 (see [`IdentityStore::sweep_expired`]); a
    /// sweep that failed for some identity waits [`SWEEP_EVERY`] before the
    /// next, so a store that keeps failing is not read again every
    /// [`MIN_SLEEP`].
    pub async fn run(self, shutdown: Shutdown) {
        let this = Arc::new(self);
        let mut caught_up = false;
        let mut failed = false;
        loop {
            let wait = if failed {
                SWEEP_EVERY
            } else {
                this.next_wait()
            };
            tokio::select! {
                _ = this.clock.sleep(wait) => {}
                _ = this.identities.expiry_changed(), if !failed => continue,
                _ = shutdown.wait() => return,
            }
            if this.barrier.status().sealed {
                continue;
            }
            let sweep = Arc::clone(&this);
            let catch_up = !caught_up;
            // Its writes go under the leader term's fence, if any.
            let fence = crate::storage::cluster::current();
            match tokio::task::spawn_blocking(move || {
                crate::storage::cluster::blocking(fence, || sweep.sweep_once(catch_up))
            })
            .await
            {
                Ok(outcome) => {
                    // The catch-up is done once its certificates are: an
                    // identity whose tokens keep failing does not repeat it.
                    caught_up |= outcome.is_ok();
                    failed = !matches!(outcome, Ok(swept) if swept.failed == 0);
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(error = %e, "identity expiry sweep panicked");
                }
            }
        }
    }

    fn next_wait(&self) -> Duration {
        match self.identities.next_expiry_ms() {
            Ok(Some(at)) => self.clock.until_ms(at).clamp(MIN_SLEEP, SWEEP_EVERY),
            _ => SWEEP_EVERY,
        }
    }

    /// One sweep, now (blocking: it reads and writes the store); with
    /// `catch_up`, also the certificates of identities handled before.
    /// Logs what it did; `Err` when it stopped (no certificate revoked),
    /// else what it revoked and for how many identities it failed.
    pub fn sweep_once(&self, catch_up: bool) -> Result<Swept, IdentityError> {
        match self.identities.sweep_expired(
            self.tokens.as_ref(),
            self.certificates.as_ref(),
            self.clock.now_ms(),
            catch_up,
        ) {
            Ok(swept) => {
                if swept.tokens > 0 || swept.certificates > 0 {
                    tracing::info!(
                        tokens = swept.tokens,
                        certificates = swept.certificates,
                        "tokens and certificates of expired identities revoked"
                    );
                }
                Ok(swept)
            }
            Err(e) => {
                tracing::warn!(error = %e, "identity expiry sweep failed");
                Err(e)
            }
        }
    }
}
