//! Secrets over TLS: the tour, versions, stages, CAS, delete/undelete/destroy,
//! the version limit, and every input rule.

use tonic::Code;

use crate::harness::{data, unique, TestServer};
use keyward::client::PutOptions;
use keyward::secrecy::{SecretBytes, SecretData};

#[tokio::test]
async fn put_get_list_metadata_versions_and_stages() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = format!("{}/db", unique("app"));

    let v1 = root
        .put(
            &path,
            &data(&[("username", "svc"), ("password", "first-pass")]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(v1, 1);
    let v2 = root
        .put(
            &path,
            &data(&[("username", "svc"), ("password", "second-pass")]),
            PutOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(v2, 2);

    let current = root.get(&path).await.unwrap();
    assert_eq!((current.version, current.stage.as_str()), (2, "current"));
    assert_eq!(current.field_str("password"), Some("second-pass"));
    assert!(current.created_at.is_some());

    let previous = root.get_with(&path, None, Some("previous")).await.unwrap();
    assert_eq!(
        (previous.version, previous.field_str("password")),
        (1, Some("first-pass"))
    );
    let by_number = root.get_with(&path, Some(1), None).await.unwrap();
    assert_eq!(by_number.field_str("password"), Some("first-pass"));
    let pending = root
        .get_with(&path, None, Some("pending"))
        .await
        .unwrap_err();
    assert_eq!(pending.code(), Some(Code::NotFound));

    let prefix = path.split('/').next().unwrap().to_owned();
    root.put(
        &format!("{prefix}/dbx"),
        &data(&[("k", "v")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    root.put(
        &format!("{prefix}x/other"),
        &data(&[("k", "v")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let listed = root.list(&prefix).await.unwrap();
    assert_eq!(
        listed,
        vec![path.clone(), format!("{prefix}/dbx")],
        "a prefix lists its own subtree only"
    );

    let meta = root.metadata(&path).await.unwrap();
    assert_eq!(
        (meta.current_version, meta.newest_version, meta.max_versions),
        (2, 2, 10)
    );
    let stages: Vec<&str> = meta.versions.iter().map(|v| v.stage.as_str()).collect();
    assert_eq!(stages, ["previous", "current"]);
}

#[tokio::test]
async fn check_and_set() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = unique("cas");
    let only_new = PutOptions {
        cas: Some(0),
        ..Default::default()
    };
    assert_eq!(
        root.put(&path, &data(&[("a", "1")]), only_new.clone())
            .await
            .unwrap(),
        1
    );
    let again = root
        .put(&path, &data(&[("a", "2")]), only_new)
        .await
        .unwrap_err();
    assert_eq!(again.code(), Some(Code::FailedPrecondition));
    assert!(
        again
            .to_string()
            .contains("expected version 0, newest is 1"),
        "{again}"
    );
    let stale = root
        .put(
            &path,
            &data(&[("a", "2")]),
            PutOptions {
                cas: Some(5),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Some(Code::FailedPrecondition));
    assert_eq!(
        root.put(
            &path,
            &data(&[("a", "2")]),
            PutOptions {
                cas: Some(1),
                ..Default::default()
            }
        )
        .await
        .unwrap(),
        2
    );
    assert_eq!(root.get(&path).await.unwrap().field_str("a"), Some("2"));
}

#[tokio::test]
async fn delete_undelete_destroy() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = unique("lifecycle");
    root.put(&path, &data(&[("a", "1")]), PutOptions::default())
        .await
        .unwrap();
    root.put(&path, &data(&[("a", "2")]), PutOptions::default())
        .await
        .unwrap();

    root.delete(&path, None).await.unwrap();
    let gone = root.get(&path).await.unwrap_err();
    assert_eq!(gone.code(), Some(Code::NotFound));
    assert!(gone.to_string().contains("version 2 is deleted"), "{gone}");
    root.undelete(&path, 2).await.unwrap();
    assert_eq!(root.get(&path).await.unwrap().field_str("a"), Some("2"));

    root.destroy(&path, 1).await.unwrap();
    let destroyed = root.get_with(&path, Some(1), None).await.unwrap_err();
    assert_eq!(destroyed.code(), Some(Code::NotFound));
    assert!(destroyed.to_string().contains("destroyed"), "{destroyed}");
    assert_eq!(
        root.undelete(&path, 1).await.unwrap_err().code(),
        Some(Code::NotFound)
    );
    let meta = root.metadata(&path).await.unwrap();
    assert!(meta.versions.iter().any(|v| v.version == 1 && v.destroyed));

    assert_eq!(
        root.get(&unique("never")).await.unwrap_err().code(),
        Some(Code::NotFound)
    );
    assert_eq!(
        root.delete(&unique("never"), None)
            .await
            .unwrap_err()
            .code(),
        Some(Code::NotFound)
    );
    assert_eq!(
        root.get_with(&path, Some(99), None)
            .await
            .unwrap_err()
            .code(),
        Some(Code::NotFound)
    );
}

#[tokio::test]
async fn version_limit_drops_the_oldest() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = unique("limited");
    for i in 1..=5 {
        let opts = PutOptions {
            max_versions: Some(3),
            ..Default::default()
        };
        root.put(&path, &data(&[("n", &i.to_string())]), opts)
            .await
            .unwrap();
    }
    let meta = root.metadata(&path).await.unwrap();
    let kept: Vec<u64> = meta.versions.iter().map(|v| v.version).collect();
    assert_eq!(kept, [3, 4, 5]);
    assert_eq!(meta.max_versions, 3);
    assert_eq!(
        root.get_with(&path, Some(1), None)
            .await
            .unwrap_err()
            .code(),
        Some(Code::NotFound)
    );
    assert_eq!(
        root.get_with(&path, Some(3), None)
            .await
            .unwrap()
            .field_str("n"),
        Some("3")
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_the_rule() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let ok = data(&[("a", "1")]);
    let deep = vec!["s"; 33].join("/");
    let long = "a".repeat(513);
    let cases: Vec<(&str, &str)> = vec![
        ("", "path must not be empty"),
        ("/lead", "must not start or end with '/'"),
        ("trail/", "must not start or end with '/'"),
        ("a//b", "segment 2 is empty"),
        ("a/../b", "segment 2 is empty, '.' or '..'"),
        ("a/./b", "segment 2 is empty, '.' or '..'"),
        ("sp ace", "character outside [A-Za-z0-9._-]"),
        (&deep, "at most 32 segments"),
        (&long, "at most 512 bytes"),
    ];
    for (path, rule) in &cases {
        let err = root
            .put(path, &ok, PutOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{path}");
        assert!(err.to_string().contains(rule), "{path}: {err}");
        let err = root.get(path).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{path}");
    }

    let path = unique("input");
    let mut big = SecretData::new();
    big.insert("blob".into(), SecretBytes::new(vec![b'x'; 512 * 1024 + 1]));
    let err = root
        .put(&path, &big, PutOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("at most 524288 bytes"), "{err}");

    let many: SecretData = (0..257)
        .map(|i| (format!("f{i}"), SecretBytes::from("v")))
        .collect();
    let err = root
        .put(&path, &many, PutOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("at most 256 fields"), "{err}");

    let err = root
        .put(&path, &SecretData::new(), PutOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("at least one field"), "{err}");
    let err = root
        .put(&path, &data(&[("bad name", "v")]), PutOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("field names"), "{err}");
    let err = root
        .get_with(&path, None, Some("latest"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("stage must be one of"), "{err}");
    let err = root
        .put(
            &path,
            &ok,
            PutOptions {
                max_versions: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_versions"), "{err}");
    // Nothing was written by any refused call.
    assert_eq!(
        root.get(&path).await.unwrap_err().code(),
        Some(Code::NotFound)
    );
}

#[tokio::test]
async fn tokens_are_required_and_checked() {
    let server = TestServer::dev().await;
    let root = server.root().await;
    let path = unique("guarded");
    root.put(&path, &data(&[("a", "1")]), PutOptions::default())
        .await
        .unwrap();

    let anonymous = server.anonymous().await;
    let err = anonymous.get(&path).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated));
    // A well-formed token that the server never issued.
    let forged = keyward::token::format::TokenSecret::generate().unwrap();
    let wrong = anonymous.with_token(forged.expose()).unwrap();
    let err = wrong.get(&path).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated));
    let garbage = anonymous.with_token("not-a-token").unwrap();
    assert_eq!(
        garbage.get(&path).await.unwrap_err().code(),
        Some(Code::Unauthenticated)
    );
    // The same answer whether or not the path exists.
    let missing = wrong.get(&unique("nothing-here")).await.unwrap_err();
    assert_eq!(missing.to_string(), err.to_string());
    assert_eq!(
        wrong
            .put(&path, &data(&[("a", "2")]), PutOptions::default())
            .await
            .unwrap_err()
            .code(),
        Some(Code::Unauthenticated)
    );
    assert_eq!(root.get(&path).await.unwrap().field_str("a"), Some("1"));
}

#[tokio::test]
async fn a_watch_ends_when_its_token_is_revoked() {
    use keyward::client::IssueOptions;
    use std::time::Duration;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("watched");
    let policy = unique("watcher");
    root.policy_put(
        &policy,
        &format!("[[rule]]\npath = \"secret/{prefix}/**\"\ncapabilities = [\"read\", \"list\"]\n"),
    )
    .await
    .unwrap();
    let issued = root
        .issue_token(IssueOptions {
            policies: vec![policy.clone()],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let user = root.with_token(&issued.token).unwrap();
    let path = format!("{prefix}/db");
    root.put(&path, &data(&[("password", "one")]), PutOptions::default())
        .await
        .unwrap();
    let mut stream = user.watch(&[], &[&prefix]).await.unwrap();

    // While the token holds, events come.
    root.put(&path, &data(&[("password", "two")]), PutOptions::default())
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("an event")
        .unwrap()
        .expect("the stream is open");
    assert_eq!((event.path.as_str(), event.version), (path.as_str(), 2));

    // Revoked: the stream ends with UNAUTHENTICATED, even with no event.
    root.revoke_accessor(&issued.accessor).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("the watch to end after the revoke");
    let status = ended.expect_err("the watch ends with an error, not an event");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // And no event reaches it afterwards.
    root.put(
        &path,
        &data(&[("password", "three")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let after = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
    assert!(
        matches!(after, Ok(Ok(None)) | Ok(Err(_))),
        "an event after the revoke: {after:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_watch_stops_delivering_paths_its_narrowed_policy_no_longer_reads() {
    use keyward::client::IssueOptions;
    use std::time::Duration;
    let server = TestServer::dev().await;
    let root = server.root().await;
    let prefix = unique("narrowed");
    let policy = unique("watcher");
    let rules = |paths: &[&str]| {
        paths
            .iter()
            .map(|p| format!("[[rule]]\npath = \"secret/{prefix}/{p}\"\ncapabilities = [\"read\", \"list\"]\n"))
            .collect::<String>()
    };
    root.policy_put(&policy, &rules(&["**"])).await.unwrap();
    let issued = root
        .issue_token(IssueOptions {
            policies: vec![policy.clone()],
            ..IssueOptions::default()
        })
        .await
        .unwrap();
    let user = root.with_token(&issued.token).unwrap();
    let (a, b) = (format!("{prefix}/a"), format!("{prefix}/b"));
    let mut stream = user.watch(&[], &[&prefix]).await.unwrap();
    // Narrowed to `b` only while the watch is open.
    root.policy_put(&policy, &rules(&["b"])).await.unwrap();
    root.put(&a, &data(&[("k", "1")]), PutOptions::default())
        .await
        .unwrap();
    root.put(&b, &data(&[("k", "1")]), PutOptions::default())
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("an event")
        .unwrap()
        .expect("the stream is open");
    assert_eq!(
        event.path, b,
        "a path the policy no longer reads was delivered"
    );
    server.stop().await;
}
