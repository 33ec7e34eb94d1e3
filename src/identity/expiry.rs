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

use super::{CertificateRevoker, IdentityStore, Swept, TokenRevoker};
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
    /// until an expiry is set), revokes what is due; until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        let this = Arc::new(self);
        loop {
            let wait = this.next_wait();
            tokio::select! {
                _ = this.clock.sleep(wait) => {}
                _ = this.identities.expiry_changed() => continue,
                _ = shutdown.wait() => return,
            }
            if this.barrier.status().sealed {
                continue;
            }
            let sweep = Arc::clone(&this);
            // Its writes go under the leader term's fence, if any.
            let fence = crate::storage::cluster::current();
            match tokio::task::spawn_blocking(move || {
                crate::storage::cluster::blocking(fence, || sweep.sweep_once())
            })
            .await
            {
                Ok(()) => {}
                Err(e) => tracing::warn!(error = %e, "identity expiry sweep panicked"),
            }
        }
    }

    fn next_wait(&self) -> Duration {
        match self.identities.next_expiry_ms() {
            Ok(Some(at)) => self.clock.until_ms(at).clamp(MIN_SLEEP, SWEEP_EVERY),
            _ => SWEEP_EVERY,
        }
    }

    /// One sweep, now (blocking: it reads and writes the store).
    pub fn sweep_once(&self) {
        match self.identities.sweep_expired(
            self.tokens.as_ref(),
            self.certificates.as_ref(),
            self.clock.now_ms(),
        ) {
            Ok(Swept {
                tokens: 0,
                certificates: 0,
            }) => {}
            Ok(Swept {
                tokens,
                certificates,
            }) => tracing::info!(
                tokens,
                certificates,
                "tokens and certificates of expired identities revoked"
            ),
            Err(e) => tracing::warn!(error = %e, "identity expiry sweep failed"),
        }
    }
}
