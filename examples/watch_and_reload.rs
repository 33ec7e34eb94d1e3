//! An application that keeps its database credentials fresh: it reads them
//! once, then reloads as soon as a rotation promotes a new version, without
//! polling (`Secrets.Watch` through `keyward::client::FreshSecret`).
//!
//! ```sh
//! cargo run -- dev &                       # prints the export lines below
//! export KEYWARD_ADDR=... KEYWARD_CACERT=... KEYWARD_TOKEN=...
//! cargo run -- secret put app/db username=svc password=first
//! cargo run -- rotation set app/db --provider random --every 10s --grace 0s
//! cargo run --example watch_and_reload -- app/db
//! ```
//!
//! Each new version prints its number and the length of the new password
//! (never the password itself); a real application would open a new
//! connection pool with it and drain the old one.

use keyward::client::{Client, ClientOptions, FreshSecret};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "app/db".to_owned());
    let reloads: Option<u64> = std::env::args().nth(2).and_then(|n| n.parse().ok());

    let client = Client::connect(ClientOptions::from_env()).await?;
    let secret = FreshSecret::start(client, &path).await?;
    let mut changes = secret.subscribe();
    let mut seen = 0u64;
    loop {
        let current = secret.current();
        let length = current.field_str("password").map(str::len).unwrap_or(0);
        println!(
            "{path}: using version {} (password of {length} characters)",
            current.version
        );
        if reloads.is_some_and(|n| seen >= n) {
            return Ok(());
        }
        // Resolves when a rotation (or a write) makes a new current version.
        changes.changed().await?;
        seen += 1;
        println!("{path}: new version announced, reloading");
    }
}
