//! An application whose PostgreSQL connections use a dynamic credential
//! that keyward keeps fresh: [`FreshCredential`] renews the lease and asks
//! for a new user when the old one reaches its max TTL; a small connection
//! pool built on tokio-postgres takes each new credential as it comes, so
//! new connections log in as the new user while connections already open
//! finish their work and are not returned to the pool.
//!
//! ```sh
//! cargo run --release -- dev &            # prints the export lines below
//! export KEYWARD_ADDR=... KEYWARD_CACERT=... KEYWARD_TOKEN=...
//! keyward secret put db/admin host=127.0.0.1 port=5432 username=postgres password=...
//! keyward dynamic role put app --provider postgres --config admin_secret=db/admin \
//!     --ttl 30s --max-ttl 2m
//! cargo run --example dynamic_pg_pool -- app 300    # role, queries (one a second)
//! ```
//!
//! Each query prints the user it ran as; the password is never printed.
//! At the end the last lease is revoked (its user is dropped at once).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyward::client::{Client, ClientOptions, DynamicCredential, FreshCredential, RefreshOptions};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::NoTls;

/// An open connection and the credential generation it logged in with.
struct Idle {
    generation: u64,
    client: tokio_postgres::Client,
}

struct PoolState {
    credential: Arc<DynamicCredential>,
    idle: Vec<Idle>,
}

/// At most `size` connections at once; idle ones are reused while their
/// credential is the current one.
struct Pool {
    state: Mutex<PoolState>,
    permits: Arc<Semaphore>,
}

/// A connection lent by the pool; given back when dropped, unless its
/// credential was replaced meanwhile or it broke.
struct Pooled<'a> {
    pool: &'a Pool,
    client: Option<Idle>,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &tokio_postgres::Client {
        match &self.client {
            Some(idle) => &idle.client,
            None => unreachable!("a lent connection is held until drop"),
        }
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(idle) = self.client.take() {
            let mut state = self.pool.lock();
            if idle.generation == state.credential.generation && !idle.client.is_closed() {
                state.idle.push(idle);
            }
        }
    }
}

impl Pool {
    fn new(credential: Arc<DynamicCredential>, size: usize) -> Self {
        Self {
            state: Mutex::new(PoolState {
                credential,
                idle: Vec::new(),
            }),
            permits: Arc::new(Semaphore::new(size)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// New connections use `credential` from now on; idle ones made with
    /// an older one are closed.
    fn set_credential(&self, credential: Arc<DynamicCredential>) {
        let mut state = self.lock();
        state.credential = credential;
        state.idle.clear();
    }

    async fn get(&self) -> Result<Pooled<'_>, Box<dyn std::error::Error>> {
        let permit = self.permits.clone().acquire_owned().await?;
        let (reuse, credential) = {
            let mut state = self.lock();
            let generation = state.credential.generation;
            state
                .idle
                .retain(|i| i.generation == generation && !i.client.is_closed());
            (state.idle.pop(), state.credential.clone())
        };
        let client = match reuse {
            Some(idle) => idle,
            None => Idle {
                generation: credential.generation,
                client: connect(&credential).await?,
            },
        };
        Ok(Pooled {
            pool: self,
            client: Some(client),
            _permit: permit,
        })
    }
}

async fn connect(
    credential: &DynamicCredential,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let database = if credential.database.is_empty() {
        "postgres"
    } else {
        credential.database.as_str()
    };
    let (client, connection) = tokio_postgres::Config::new()
        .host(&credential.host)
        .port(credential.port)
        .user(&credential.username)
        .password(credential.password())
        .dbname(database)
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("dynamic_pg_pool: connection ended: {e}");
        }
    });
    Ok(client)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let role = args.next().unwrap_or_else(|| "app".to_owned());
    let queries: u32 = match args.next() {
        Some(n) => n.parse()?,
        None => 60,
    };

    // KEYWARD_ADDR, KEYWARD_CACERT and KEYWARD_TOKEN, as for the CLI.
    let client = Client::connect(ClientOptions::from_env()).await?;
    let fresh = FreshCredential::start(client, &role, RefreshOptions::default()).await?;
    let pool = Arc::new(Pool::new(fresh.current(), 4));

    // Swap each new credential into the pool.
    let mut changes = fresh.subscribe();
    let swapper = {
        let pool = pool.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let credential = changes.borrow_and_update().clone();
                println!(
                    "new credential: user {} (lease {})",
                    credential.username, credential.lease_id
                );
                pool.set_credential(credential);
            }
        })
    };

    for i in 0..queries {
        let conn = pool.get().await?;
        let row = conn.query_one("SELECT current_user::text", &[]).await?;
        let user: String = row.get(0);
        println!("query {i}: ran as {user}");
        drop(conn);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    swapper.abort();
    fresh.revoke().await?;
    Ok(())
}
