//! [`FreshCredential`]: a dynamic credential (`keyward creds ROLE`) that
//! stays valid for as long as it is held.
//!
//! ```no_run
//! # async fn demo(client: keyward::client::Client) -> Result<(), keyward::client::ClientError> {
//! use keyward::client::{FreshCredential, RefreshOptions};
//! let db = FreshCredential::start(client, "app", RefreshOptions::default()).await?;
//! let mut changes = db.subscribe();
//! loop {
//!     let cred = db.current();
//!     // ... connect as cred.username with cred.password() ...
//!     changes.changed().await.ok(); // a new credential replaced it
//! }
//! # }
//! ```
//!
//! A background task renews the lease when a fraction of its remaining TTL
//! has passed ([`RefreshOptions::renew_fraction`]). When a renewal cannot
//! extend it any more (the role's max TTL or the token's end is reached) or
//! is refused (the lease was revoked, has expired, is unknown), it asks for
//! a new credential and publishes it on the watch channel; the previous
//! lease is left to end at its own expiry, so connections made with it are
//! not cut while a pool switches over. Errors that may pass (the server is
//! down) are retried with back-off; the current credential stays until a
//! new one is had. The password is never shown by `Debug`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::Code;

use super::{Client, ClientError};
use crate::clock::Clock;
use crate::proto::v1::CredsResponse;

/// When and how the lease is kept.
#[derive(Debug, Clone)]
pub struct RefreshOptions {
    /// Renew when this share of the remaining TTL has passed (0.1 to 0.9;
    /// default 0.5: a lease with 10 s left is renewed after 5 s).
    pub renew_fraction: f64,
    /// The shortest wait between two attempts (default 250 ms).
    pub min_wait: Duration,
    /// The longest wait between retries after an error (default 30 s).
    pub max_retry_wait: Duration,
    /// `--ttl` asked for each new credential (`None`: the role's).
    pub ttl: Option<Duration>,
}

impl Default for RefreshOptions {
    fn default() -> Self {
        Self {
            renew_fraction: 0.5,
            min_wait: Duration::from_millis(250),
            max_retry_wait: Duration::from_secs(30),
            ttl: None,
        }
    }
}

/// One credential: who to log in as, where, and until when.
pub struct DynamicCredential {
    pub lease_id: String,
    pub username: String,
    password: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    /// How many credentials this helper had before this one (0 for the
    /// first).
    pub generation: u64,
}

impl DynamicCredential {
    /// The password (shown once by the server; kept in memory only).
    pub fn password(&self) -> &str {
        &self.password
    }
}

impl std::fmt::Debug for DynamicCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicCredential")
            .field("lease_id", &self.lease_id)
            .field("username", &self.username)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Drop for DynamicCredential {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.password);
    }
}

/// A dynamic credential kept fresh. Dropping it (and every receiver from
/// [`FreshCredential::subscribe`]) stops the background task; the last
/// lease then ends at its own expiry (or call [`FreshCredential::revoke`]).
pub struct FreshCredential {
    rx: watch::Receiver<Arc<DynamicCredential>>,
    task: tokio::task::JoinHandle<()>,
    client: Client,
}

fn ts_ms(ts: Option<prost_types::Timestamp>) -> u64 {
    ts.map_or(0, |t| {
        u64::try_from(t.seconds)
            .unwrap_or(0)
            .saturating_mul(1000)
            .saturating_add(u64::try_from(t.nanos).unwrap_or(0) / 1_000_000)
    })
}

fn credential(c: CredsResponse, generation: u64) -> DynamicCredential {
    DynamicCredential {
        lease_id: c.lease_id.clone(),
        username: c.username.clone(),
        password: c.password.clone(),
        host: c.host.clone(),
        port: u16::try_from(c.port).unwrap_or(0),
        database: c.database.clone(),
        generation,
    }
}

impl FreshCredential {
    /// Asks for a credential of `role` once (an error here is returned) and
    /// starts keeping it fresh.
    pub async fn start(
        client: Client,
        role: &str,
        options: RefreshOptions,
    ) -> Result<Self, ClientError> {
        let fraction = options.renew_fraction;
        if !(0.1..=0.9).contains(&fraction) {
            return Err(ClientError::Config(
                "renew_fraction",
                "must be between 0.1 and 0.9".into(),
            ));
        }
        let first = client.creds(role, options.ttl).await?;
        let expires = ts_ms(first.expires_at);
        let (tx, rx) = watch::channel(Arc::new(credential(first, 0)));
        let keeper = Keeper {
            client: client.clone(),
            role: role.to_owned(),
            options,
            tx,
            expires_ms: expires,
            clock: Clock::system(),
        };
        let task = tokio::spawn(keeper.run());
        Ok(Self { rx, task, client })
    }

    /// The credential in use now.
    pub fn current(&self) -> Arc<DynamicCredential> {
        self.rx.borrow().clone()
    }

    /// A receiver whose `changed()` resolves when a new credential replaces
    /// the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<DynamicCredential>> {
        self.rx.clone()
    }

    /// Stops keeping it fresh and revokes the current lease (the user is
    /// dropped on the target at once).
    pub async fn revoke(self) -> Result<(), ClientError> {
        self.task.abort();
        let lease = self.current().lease_id.clone();
        self.client.lease_revoke(&lease).await.map(|_| ())
    }
}

impl Drop for FreshCredential {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a renewal found.
enum Renewed {
    /// Extended to this end.
    Until(u64),
    /// Renewing can no longer extend it (max TTL or the token's end).
    AtMax,
    /// Refused for good: revoked, expired, unknown, not allowed.
    Refused,
}

struct Keeper {
    client: Client,
    role: String,
    options: RefreshOptions,
    tx: watch::Sender<Arc<DynamicCredential>>,
    /// The current lease's end, as the server said.
    expires_ms: u64,
    /// Wall time for comparing with the lease's end (tokio's clock, so a
    /// paused test clock moves it too).
    clock: Clock,
}

impl Keeper {
    /// The wait before the next renewal: the fraction of what remains.
    fn wait(&self) -> Duration {
        let left = self.expires_ms.saturating_sub(self.clock.now_ms());
        let wait = Duration::from_millis(left).mul_f64(self.options.renew_fraction);
        wait.max(self.options.min_wait)
    }

    async fn run(mut self) {
        let mut retry = self.options.min_wait;
        loop {
            if self.tx.is_closed() {
                return;
            }
            tokio::time::sleep(self.wait()).await;
            let lease = self.tx.borrow().lease_id.clone();
            let outcome = match self.renew(&lease).await {
                Ok(Renewed::Until(until)) => {
                    self.expires_ms = until;
                    Ok(())
                }
                Ok(Renewed::AtMax) | Ok(Renewed::Refused) => self.replace().await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => retry = self.options.min_wait,
                Err(e) => {
                    tracing::debug!(role = %self.role, error = %e, "dynamic credential not refreshed; retrying");
                    // Past the end with nothing better: ask for a new one
                    // at the next try rather than renewing a dead lease.
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(self.options.max_retry_wait);
                    if self.clock.now_ms() >= self.expires_ms {
                        if let Err(e) = self.replace().await {
                            tracing::debug!(role = %self.role, error = %e, "no new dynamic credential yet");
                        }
                    }
                }
            }
        }
    }

    async fn renew(&self, lease: &str) -> Result<Renewed, ClientError> {
        match self.client.lease_renew(lease, None).await {
            Ok(l) => {
                // The server never shortens a lease: no later end means it
                // cannot be extended any more.
                let until = ts_ms(l.expires_at);
                if until <= self.expires_ms {
                    Ok(Renewed::AtMax)
                } else {
                    Ok(Renewed::Until(until))
                }
            }
            Err(e) => match e.code() {
                Some(
                    Code::NotFound
                    | Code::FailedPrecondition
                    | Code::PermissionDenied
                    | Code::InvalidArgument,
                ) => Ok(Renewed::Refused),
                _ => Err(e),
            },
        }
    }

    /// A new credential, published; the old lease ends on its own.
    async fn replace(&mut self) -> Result<(), ClientError> {
        let fresh = self.client.creds(&self.role, self.options.ttl).await?;
        self.expires_ms = ts_ms(fresh.expires_at);
        let generation = self.tx.borrow().generation + 1;
        let _ = self.tx.send(Arc::new(credential(fresh, generation)));
        Ok(())
    }
}
