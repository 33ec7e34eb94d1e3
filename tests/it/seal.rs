//! Init, unseal and seal over TLS: thresholds, wrong, mixed and foreign
//! shares, and what a sealed server answers.

use tonic::Code;

use crate::harness::{data, unique, TestServer};
use keyward::client::{Client, PutOptions};

#[tokio::test]
async fn init_three_of_five_then_unseal_with_any_three() {
    let server = TestServer::uninitialized().await;
    let anon = server.anonymous().await;
    let status = anon.status().await.unwrap();
    assert!(!status.initialized && status.sealed);

    let init = anon.init(5, 3).await.unwrap();
    assert_eq!(init.shares.len(), 5);
    assert!(init.root_token.starts_with("kwt_"));
    let status = anon.status().await.unwrap();
    assert!(status.initialized && status.sealed);
    assert_eq!((status.shares, status.threshold), (5, 3));

    // Sealed: every other call answers UNAVAILABLE, even with the root token.
    let root = anon.with_token(&init.root_token).unwrap();
    assert_eq!(
        root.get("x").await.unwrap_err().code(),
        Some(Code::Unavailable)
    );
    assert_eq!(
        root.put("x", &data(&[("a", "1")]), PutOptions::default())
            .await
            .unwrap_err()
            .code(),
        Some(Code::Unavailable)
    );
    assert_eq!(
        root.seal().await.unwrap_err().code(),
        Some(Code::Unavailable)
    );
    assert_eq!(
        anon.init(5, 3).await.unwrap_err().code(),
        Some(Code::FailedPrecondition)
    );

    // Too few shares: still sealed, progress shown.
    let r = anon.unseal(&init.shares[4]).await.unwrap();
    assert!(r.sealed);
    assert_eq!((r.progress, r.threshold), (1, 3));
    // The same share twice does not count.
    let dup = anon.unseal(&init.shares[4]).await.unwrap_err();
    assert_eq!(dup.code(), Some(Code::InvalidArgument));
    assert_eq!(anon.status().await.unwrap().progress, 1);
    let r = anon.unseal(&init.shares[1]).await.unwrap();
    assert!(r.sealed && r.progress == 2);
    let r = anon.unseal(&init.shares[2]).await.unwrap();
    assert!(!r.sealed);

    let path = unique("after-unseal");
    root.put(&path, &data(&[("a", "1")]), PutOptions::default())
        .await
        .unwrap();
    root.seal().await.unwrap();
    assert!(anon.status().await.unwrap().sealed);
    assert_eq!(
        root.get(&path).await.unwrap_err().code(),
        Some(Code::Unavailable)
    );
    for share in [&init.shares[0], &init.shares[3], &init.shares[1]] {
        anon.unseal(share).await.unwrap();
    }
    assert_eq!(root.get(&path).await.unwrap().field_str("a"), Some("1"));
}

#[tokio::test]
async fn wrong_malformed_and_foreign_shares_are_refused() {
    let server = TestServer::uninitialized().await;
    let anon = server.anonymous().await;
    let init = anon.init(3, 2).await.unwrap();

    let other = TestServer::uninitialized().await;
    let other_anon = other.anonymous().await;
    let foreign = other_anon.init(3, 2).await.unwrap();

    let err = anon.unseal(&foreign.shares[0]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("another vault"), "{err}");

    let err = anon.unseal("kwu1_not-a-share").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("malformed"), "{err}");
    let mut typo = init.shares[0].clone();
    let last = typo.pop().unwrap();
    typo.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(
        anon.unseal(&typo).await.unwrap_err().code(),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        anon.status().await.unwrap().progress,
        0,
        "refused shares do not count"
    );

    // Errors never echo the share.
    assert!(!err.to_string().contains(&init.shares[0]));

    // Reset forgets given shares.
    anon.unseal(&init.shares[0]).await.unwrap();
    assert_eq!(anon.unseal_reset().await.unwrap().progress, 0);
    anon.unseal(&init.shares[1]).await.unwrap();
    let r = anon.unseal(&init.shares[2]).await.unwrap();
    assert!(!r.sealed);
}

#[tokio::test]
async fn rotate_key_keeps_old_values_readable() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = unique("rotated");
    root.put(&path, &data(&[("a", "before")]), PutOptions::default())
        .await
        .unwrap();
    let term0 = root.status().await.unwrap().key_term;
    let term = root.rotate_key().await.unwrap();
    assert_eq!(term, term0 + 1);
    assert_eq!(root.status().await.unwrap().key_term, term);
    root.put(&path, &data(&[("a", "after")]), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        root.get_with(&path, Some(1), None)
            .await
            .unwrap()
            .field_str("a"),
        Some("before")
    );
    assert_eq!(root.get(&path).await.unwrap().field_str("a"), Some("after"));

    // Survives a seal/unseal cycle with both terms.
    root.seal().await.unwrap();
    let anon: Client = server.anonymous().await;
    anon.unseal(&server.unseal_share).await.unwrap();
    assert_eq!(
        root.get_with(&path, Some(1), None)
            .await
            .unwrap()
            .field_str("a"),
        Some("before")
    );
    assert_eq!(root.status().await.unwrap().key_term, term);
}

/// A share with this vault's id and a valid checksum but forged bytes: it is
/// accepted as well-formed, and refused once the threshold is reached.
fn forge(share: &str) -> String {
    use base64::Engine;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut raw = engine.decode(share.strip_prefix("kwu1_").unwrap()).unwrap();
    assert_eq!(raw.len(), 46);
    for b in &mut raw[10..42] {
        *b ^= 0x5a;
    }
    let crc = crc32fast::hash(&raw[..42]);
    raw[42..].copy_from_slice(&crc.to_be_bytes());
    format!("kwu1_{}", engine.encode(raw))
}

#[tokio::test]
async fn forged_shares_do_not_unseal_and_reset_progress() {
    let server = TestServer::uninitialized().await;
    let anon = server.anonymous().await;
    let init = anon.init(3, 2).await.unwrap();

    let r = anon.unseal(&init.shares[0]).await.unwrap();
    assert_eq!(r.progress, 1);
    let err = anon.unseal(&forge(&init.shares[1])).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("do not open this vault"), "{err}");
    let status = anon.status().await.unwrap();
    assert!(status.sealed);
    assert_eq!(status.progress, 0, "a failed combination starts over");

    // The real shares still open it afterwards.
    anon.unseal(&init.shares[2]).await.unwrap();
    assert!(!anon.unseal(&init.shares[1]).await.unwrap().sealed);
}
