//! An application that reads its database credentials from keyward at
//! start-up, with the client library.
//!
//! ```sh
//! cargo run --release -- dev &            # prints the export lines below
//! export KEYWARD_ADDR=... KEYWARD_CACERT=... KEYWARD_TOKEN=...
//! cargo run --release -- secret put app/db username=svc password=s3cret
//! cargo run --example fetch_secret -- app/db
//! ```

use keyward::client::{Client, ClientOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "app/db".to_owned());

    // KEYWARD_ADDR, KEYWARD_CACERT and KEYWARD_TOKEN, as for the CLI.
    let client = Client::connect(ClientOptions::from_env()).await?;
    let secret = client.get(&path).await?;

    let username = secret.field_str("username").unwrap_or("(none)");
    let password = secret
        .data
        .get("password")
        .ok_or("the secret has no password field")?;
    // Use the password to open a connection; never print it.
    println!(
        "read {path} version {}: user {username}, a password of {} bytes",
        secret.version,
        password.len()
    );
    Ok(())
}
