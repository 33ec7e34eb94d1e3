//! [`FreshSecret`]: a secret that stays current without polling.
//!
//! ```no_run
//! # async fn demo(client: keyward::client::Client) -> Result<(), keyward::client::ClientError> {
//! let db = keyward::client::FreshSecret::start(client, "app/db").await?;
//! let mut changes = db.subscribe();
//! loop {
//!     let secret = db.current();
//!     // ... connect with secret.field_str("password") ...
//!     changes.changed().await.ok(); // a rotation promoted a new version
//! }
//! # }
//! ```
//!
//! A background task holds a `Secrets.Watch` stream on the path and reads
//! each new version as it is announced; if the stream breaks (server
//! restart, the watcher fell behind) it reconnects with back-off and reads
//! the secret again, so no version is missed for long.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Client, ClientError, Secret};

/// The longest wait between reconnection attempts.
pub const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(30);

/// A secret kept at its newest `current` version. Dropping it (and every
/// receiver from [`FreshSecret::subscribe`]) stops the background task.
pub struct FreshSecret {
    rx: watch::Receiver<Arc<Secret>>,
    task: tokio::task::JoinHandle<()>,
}

impl FreshSecret {
    /// Reads `path` once (an error here is returned) and starts keeping it fresh.
    pub async fn start(client: Client, path: &str) -> Result<Self, ClientError> {
        let first = client.get(path).await?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let path = path.to_owned();
        let task = tokio::spawn(keep_fresh(client, path, tx));
        Ok(Self { rx, task })
    }

    /// The newest version seen.
    pub fn current(&self) -> Arc<Secret> {
        self.rx.borrow().clone()
    }

    /// A receiver whose `changed()` resolves at each new version.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Secret>> {
        self.rx.clone()
    }
}

impl Drop for FreshSecret {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep_fresh(client: Client, path: String, tx: watch::Sender<Arc<Secret>>) {
    let mut wait = Duration::from_millis(200);
    loop {
        if tx.is_closed() {
            return;
        }
        match follow(&client, &path, &tx).await {
            Ok(()) => wait = Duration::from_millis(200),
            Err(e) => {
                tracing::debug!(path = %path, error = %e, "watch broke; reconnecting");
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_RECONNECT_WAIT);
    }
}

/// One watch stream: subscribe, then read once (nothing between is
/// missed), then read again at each event.
async fn follow(
    client: &Client,
    path: &str,
    tx: &watch::Sender<Arc<Secret>>,
) -> Result<(), ClientError> {
    let mut stream = client.watch(&[path], &[]).await?;
    refresh(client, path, tx).await?;
    while let Some(event) = stream.message().await? {
        if event.version > tx.borrow().version {
            refresh(client, path, tx).await?;
        }
    }
    Ok(())
}

async fn refresh(
    client: &Client,
    path: &str,
    tx: &watch::Sender<Arc<Secret>>,
) -> Result<(), ClientError> {
    let secret = client.get(path).await?;
    let newer = secret.version != tx.borrow().version;
    if newer {
        let _ = tx.send(Arc::new(secret));
    }
    Ok(())
}
