//! Keyward nodes on a real etcd cluster for the etcd tests (`etcd_caches`,
//! `etcd_reads`): in-process servers over TLS sharing one prefix, and a
//! wait for a node's change feed to catch up.

use crate::etcd_kit::EtcdCluster;
use crate::harness::{eventually, private_tempdir, TestServer};
use keyward::client::{Client, IssueOptions};
use keyward::config::{ServerConfig, StorageBackend, TlsConfig};
use keyward::storage::EtcdOptions;

/// A node on `etcd` under `prefix`, with the certificates in `certs`.
pub async fn node(
    etcd: &EtcdCluster,
    prefix: &str,
    certs: &keyward::pki::CertPaths,
    node_id: &str,
) -> TestServer {
    node_with(etcd, prefix, certs, node_id, |_| {}).await
}

/// [`node`], with its etcd options changed by `adjust` first.
pub async fn node_with(
    etcd: &EtcdCluster,
    prefix: &str,
    certs: &keyward::pki::CertPaths,
    node_id: &str,
    adjust: impl FnOnce(&mut EtcdOptions),
) -> TestServer {
    crate::harness::install_crypto();
    let dir = private_tempdir();
    let mut options = EtcdOptions::plaintext(etcd.endpoints(), prefix);
    adjust(&mut options);
    let config = ServerConfig {
        tls: Some(TlsConfig {
            cert: certs.server.clone(),
            key: certs.server_key.clone(),
            client_ca: Some(certs.ca.clone()),
        }),
        storage_backend: StorageBackend::Etcd(options),
        node_id: node_id.to_owned(),
        ..ServerConfig::local(dir.path().join("data"), dir.path().join("audit.log"))
    };
    TestServer::from_config(dir, config, certs.ca.clone()).await
}

/// Two nodes on one prefix of `etcd`, initialised on the first and
/// unsealed on both, with a root client on each. The certificates' folder
/// is returned so that it lives as long as the nodes.
pub struct TwoNodes {
    pub one: TestServer,
    pub two: TestServer,
    pub root1: Client,
    pub root2: Client,
    pub _certs: tempfile::TempDir,
}

pub async fn two_nodes(
    etcd: &EtcdCluster,
    prefix: &str,
    adjust_two: impl FnOnce(&mut EtcdOptions),
) -> TwoNodes {
    let certs_dir = private_tempdir();
    let certs = keyward::pki::ensure_dev_certs(&certs_dir.path().join("certs")).unwrap();
    let one = node(etcd, prefix, &certs, "kw1").await;
    let two = node_with(etcd, prefix, &certs, "kw2", adjust_two).await;
    let anon1 = one.anonymous().await;
    let init = anon1.init(1, 1).await.unwrap();
    anon1.unseal(&init.shares[0]).await.unwrap();
    let anon2 = two.anonymous().await;
    anon2.unseal(&init.shares[0]).await.unwrap();
    let root1 = anon1.with_token(&init.root_token).unwrap();
    let root2 = anon2.with_token(&init.root_token).unwrap();
    TwoNodes {
        one,
        two,
        root1,
        root2,
        _certs: certs_dir,
    }
}

/// Waits until `server`'s watch runs and has delivered every change
/// acknowledged so far (its cache fence holds).
pub async fn caught_up(server: &TestServer) {
    let barrier = server.core.barrier.clone();
    eventually("the node's etcd watch has caught up", || {
        let barrier = barrier.clone();
        async move {
            tokio::task::spawn_blocking(move || barrier.cache_fence())
                .await
                .unwrap()
        }
    })
    .await;
}

/// A token of `policy` issued by `root` (on any node).
pub async fn issue(root: &Client, policy: &str) -> String {
    root.issue_token(IssueOptions {
        policies: vec![policy.to_owned()],
        ..IssueOptions::default()
    })
    .await
    .unwrap()
    .token
}
