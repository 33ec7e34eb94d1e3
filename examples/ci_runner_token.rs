//! A CI job exchanging its OIDC token for a short-lived keyward token and
//! reading one secret, with the client library. No keyward secret is stored
//! in the CI system: the job proves who it is with the JWT its platform
//! signed (GitHub Actions, GitLab CI, ...), and the keyward token it gets
//! never outlives that JWT.
//!
//! Set up once, as an operator:
//!
//! ```sh
//! keyward oidc-issuer put github --issuer https://token.actions.githubusercontent.com \
//!     --jwks-url https://token.actions.githubusercontent.com/.well-known/jwks --audience keyward
//! keyward identity create deploy-app --kind ci-runner --owner platform --policy app-deploy
//! keyward identity bind-oidc deploy-app --issuer github \
//!     --claim repository=acme/app --claim ref=refs/heads/main
//! ```
//!
//! The server fetches the issuer's key set itself: it trusts the CA bundle of
//! `oidc.ca_file`, and connects only to public addresses unless
//! `oidc.allow_private_hosts = true` (an issuer inside a private network, or
//! a test issuer on loopback, as this example's test uses). A key set given
//! with `--jwks-file` must be a file under the server's `oidc.jwks_dir`.
//!
//! In the job (KEYWARD_ADDR and KEYWARD_CACERT as for the CLI; no KEYWARD_TOKEN):
//!
//! ```sh
//! export KEYWARD_OIDC_ISSUER=github
//! export KEYWARD_JWT_FILE=/tmp/id-token     # or KEYWARD_JWT=<the token>
//! cargo run --example ci_runner_token -- app/deploy-key
//! ```

use keyward::client::{Client, ClientOptions};

/// The job's JWT: `KEYWARD_JWT`, or the file named by `KEYWARD_JWT_FILE`.
fn job_jwt() -> Result<String, Box<dyn std::error::Error>> {
    if let Ok(jwt) = std::env::var("KEYWARD_JWT") {
        return Ok(jwt.trim().to_owned());
    }
    let file = std::env::var("KEYWARD_JWT_FILE")
        .map_err(|_| "set KEYWARD_JWT or KEYWARD_JWT_FILE to the job's OIDC token")?;
    Ok(std::fs::read_to_string(&file)
        .map_err(|e| format!("reading {file}: {e}"))?
        .trim()
        .to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: ci_runner_token SECRET_PATH")?;
    let issuer = std::env::var("KEYWARD_OIDC_ISSUER").unwrap_or_else(|_| "github".to_owned());
    let jwt = job_jwt()?;

    let mut options = ClientOptions::from_env();
    options.token = None;
    let anonymous = Client::connect(options).await?;
    // Ask for 10 minutes; the server caps it at the JWT's expiry.
    let login = anonymous.login_oidc(&issuer, &jwt, 600).await?;
    eprintln!(
        "logged in as {} with policies {:?}, token accessor {}",
        login.identity, login.policies, login.accessor
    );
    let client = anonymous.with_token(&login.token)?;

    let secret = client.get(&path).await?;
    let fields: Vec<&String> = secret.data.keys().collect();
    // Hand the values to the deploy step; never print them.
    println!(
        "read {} version {} (fields: {:?})",
        secret.path, secret.version, fields
    );
    // The job is done: its token goes now rather than at its expiry.
    client.revoke_self().await?;
    Ok(())
}
