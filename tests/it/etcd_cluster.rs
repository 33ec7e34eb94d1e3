//! Two keyward nodes on one 3-member etcd cluster (`etcd_kit`), in process
//! over TLS: what one node acknowledges, the other honours on its next call.

use tonic::Code;

use crate::etcd_kit::EtcdCluster;
use crate::harness::{data, private_tempdir, unique, TestServer};
use keyward::client::{ClientError, IssueOptions, PutOptions};
use keyward::config::{ServerConfig, StorageBackend, TlsConfig};
use keyward::storage::EtcdOptions;

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    r.unwrap_err().code().unwrap_or(Code::Unknown)
}

/// A node on `etcd` under `prefix`, with the certificates in `certs`.
async fn node(
    etcd: &EtcdCluster,
    prefix: &str,
    certs: &keyward::pki::CertPaths,
    node_id: &str,
) -> TestServer {
    crate::harness::install_crypto();
    let dir = private_tempdir();
    let config = ServerConfig {
        tls: Some(TlsConfig {
            cert: certs.server.clone(),
            key: certs.server_key.clone(),
            client_ca: Some(certs.ca.clone()),
        }),
        storage_backend: StorageBackend::Etcd(EtcdOptions::plaintext(etcd.endpoints(), prefix)),
        node_id: node_id.to_owned(),
        ..ServerConfig::local(dir.path().join("data"), dir.path().join("audit.log"))
    };
    TestServer::from_config(dir, config, certs.ca.clone()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_share_one_vault_on_etcd() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let etcd = EtcdCluster::start(3);
    let certs_dir = private_tempdir();
    let certs = keyward::pki::ensure_dev_certs(&certs_dir.path().join("certs")).unwrap();
    let prefix = format!("{}/", unique("kw"));
    let one = node(&etcd, &prefix, &certs, "kw1").await;
    // Node 2 opens before the vault exists: it must still see the init.
    let two = node(&etcd, &prefix, &certs, "kw2").await;

    let anon1 = one.anonymous().await;
    let init = anon1.init(1, 1).await.unwrap();
    anon1.unseal(&init.shares[0]).await.unwrap();
    let anon2 = two.anonymous().await;
    let status = anon2.status().await.unwrap();
    assert!(status.initialized && status.sealed, "{status:?}");
    anon2.unseal(&init.shares[0]).await.unwrap();
    assert!(!anon2.status().await.unwrap().sealed);

    let root1 = anon1.with_token(&init.root_token).unwrap();
    let root2 = anon2.with_token(&init.root_token).unwrap();

    // A secret written on node 1 is read on node 2 at once.
    let path = format!("{}/db", unique("app"));
    root1
        .put(
            &path,
            &data(&[("password", "s3cr3t-on-etcd")]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let read = root2.get(&path).await.unwrap();
    assert_eq!(read.version, 1);
    assert_eq!(read.field_str("password"), Some("s3cr3t-on-etcd"));
    root2
        .put(
            &path,
            &data(&[("password", "second")]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(root1.get(&path).await.unwrap().version, 2);

    // A token revoked on node 1 is refused by node 2 on its next call
    // (used on node 2 first, so a cache would hold it).
    let policy = unique("p");
    let prefix_path = path.split('/').next().unwrap().to_owned();
    root1
        .policy_put(
            &policy,
            &format!(
                "[[rule]]\npath = \"secret/{prefix_path}/**\"\ncapabilities = [\"read\", \"write\"]\n"
            ),
        )
        .await
        .unwrap();
    let issued = root1
        .issue_token(IssueOptions {
            policies: vec![policy.clone()],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let user2 = anon2.with_token(&issued.token).unwrap();
    user2.get(&path).await.unwrap();
    user2.get(&path).await.unwrap();
    root1.revoke_token(&issued.token).await.unwrap();
    assert_eq!(code(user2.get(&path).await), Code::Unauthenticated);

    // A policy narrowed on node 1 is enforced by node 2 on its next call.
    let issued = root1
        .issue_token(IssueOptions {
            policies: vec![policy.clone()],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let user2 = anon2.with_token(&issued.token).unwrap();
    user2
        .put(
            &path,
            &data(&[("password", "third")]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    user2.get(&path).await.unwrap();
    root1
        .policy_put(
            &policy,
            &format!("[[rule]]\npath = \"secret/{prefix_path}/**\"\ncapabilities = [\"read\"]\n"),
        )
        .await
        .unwrap();
    assert_eq!(
        code(
            user2
                .put(
                    &path,
                    &data(&[("password", "fourth")]),
                    PutOptions::default()
                )
                .await
        ),
        Code::PermissionDenied
    );
    user2.get(&path).await.unwrap();
    root1.policy_delete(&policy).await.unwrap();
    assert_eq!(code(user2.get(&path).await), Code::PermissionDenied);

    // Sealing node 1 seals node 1 only.
    root1.seal().await.unwrap();
    assert!(anon1.status().await.unwrap().sealed);
    assert_eq!(root2.get(&path).await.unwrap().version, 3);

    // etcd holds no plaintext: no stored value contains the secret.
    let raw = keyward::storage::EtcdBackend::open(&EtcdOptions::plaintext(
        etcd.endpoints(),
        prefix.clone(),
    ))
    .unwrap();
    let mut leaked = 0;
    keyward::storage::Backend::export(&raw, &mut |_, value| {
        if crate::harness::contains(value, b"s3cr3t-on-etcd")
            || crate::harness::contains(value, b"third")
        {
            leaked += 1;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(leaked, 0);
}

/// `keyward migrate`: a dev vault on sled with a secret and a token is
/// copied into etcd, opened there, unsealed with its share and read; a
/// second migration into the same (now non-empty) prefix is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_copies_a_sled_vault_into_etcd() {
    let etcd = EtcdCluster::start(3);
    let dev = TestServer::dev().await;
    let root = dev.root().await;
    let path = format!("{}/db", unique("mig"));
    root.put(
        &path,
        &data(&[("password", "moved-intact")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let policy = unique("p");
    root.policy_put(
        &policy,
        &format!("[[rule]]\npath = \"secret/{path}\"\ncapabilities = [\"read\"]\n"),
    )
    .await
    .unwrap();
    let issued = root
        .issue_token(IssueOptions {
            policies: vec![policy],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let (ca, root_token, share) = (
        dev.ca.clone(),
        dev.root_token.clone(),
        dev.unseal_share.clone(),
    );
    let dir = dev.stop().await;

    let prefix = format!("{}/", unique("kwm"));
    let config_path = dir.path().join("etcd.toml");
    std::fs::write(
        &config_path,
        format!(
            "[storage]\npath = \"unused\"\nbackend = \"etcd\"\n[storage.etcd]\nendpoints = [{}]\nprefix = \"{prefix}\"\n[audit]\npath = \"audit-etcd.log\"\n",
            etcd.endpoints()
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .unwrap();
    let from = format!("sled:{}", dir.path().join("data").display());
    let to = format!("etcd:{}", config_path.display());
    let (code_, out, err) = tokio::task::block_in_place(|| {
        crate::harness::cli(
            &["--format", "json", "migrate", "--from", &from, "--to", &to],
            &[],
            None,
        )
    });
    assert_eq!(code_, 0, "{out}\n{err}");
    assert!(err.contains("keys copied"), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(report["keys"].as_u64().unwrap() > 3, "{report}");

    // Into the same prefix again: refused, nothing changed.
    let (code_, _, err) = tokio::task::block_in_place(|| {
        crate::harness::cli(&["migrate", "--from", &from, "--to", &to], &[], None)
    });
    assert_ne!(code_, 0);
    assert!(err.contains("already holds data"), "{err}");

    // The vault opens on etcd with the same share, certificates and tokens.
    let certs = keyward::pki::ensure_dev_certs(&dir.path().join("certs")).unwrap();
    assert_eq!(certs.ca, ca);
    let node = node(&etcd, &prefix, &certs, "kw1").await;
    let anon = node.anonymous().await;
    assert!(anon.status().await.unwrap().sealed);
    anon.unseal(&share).await.unwrap();
    let root = anon.with_token(&root_token).unwrap();
    let secret = root.get(&path).await.unwrap();
    assert_eq!(secret.version, 1);
    assert_eq!(secret.field_str("password"), Some("moved-intact"));
    let user = anon.with_token(&issued.token).unwrap();
    user.get(&path).await.unwrap();
    drop(dir);
}
