//! Identity metadata in OIDC role claim templates
//! (`{{identity.metadata.KEY}}`): set by whoever may write the identity,
//! shown by `identity get`, put in identity tokens; a missing label is a
//! clear error at issue time with nothing issued; no template reaches a
//! secret value, a secret-id or a token.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use tonic::Code;

use crate::federation_issuer::{fetch_keys, issuer_server, validation, verify, TRUST_DOMAIN};
use crate::harness::{cli, data, unique};
use crate::ident_kit::{create, login};

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

// Multi-threaded: `cli` waits for the child process on this thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_templates_use_identity_metadata_and_never_a_secret() {
    let (server, issuer) = issuer_server().await;
    let root = server.root().await;
    let role = unique("meta");
    root.put_oidc_role(
        &role,
        vec!["sts.example".into()],
        Duration::from_secs(600),
        [
            ("env".to_owned(), "{{identity.metadata.env}}".to_owned()),
            (
                "cost".to_owned(),
                "{{identity.owner}}/{{identity.metadata.cost-center}}".to_owned(),
            ),
        ]
        .into(),
    )
    .await
    .unwrap();
    // A secret the identity may read: no template can reach it.
    let path = unique("meta-secret");
    root.put(
        &format!("{path}/db"),
        &data(&[("password", "hunter2-do-not-leak")]),
        Default::default(),
    )
    .await
    .unwrap();
    let policy = unique("oidc-meta");
    root.policy_put(
        &policy,
        &format!(
            "[[rule]]\npath = \"sys/oidc/{role}\"\ncapabilities = [\"issue\"]\n\
             [[rule]]\npath = \"secret/{path}/*\"\ncapabilities = [\"read\"]\n"
        ),
    )
    .await
    .unwrap();
    let name = unique("ci");
    root.identity_create(create(&name, "ci-runner", "team-a", &[policy]))
        .await
        .unwrap();
    let sid = root.identity_secret_id(&name, 0, 0, &[]).await.unwrap();
    let (me, ci) = login(&server, &sid.role_id, &sid.secret_id).await;

    // No labels yet: a clear error naming the claim and the key; nothing
    // issued (no jti in the audit log).
    let e = ci.identity_token(&role, None, None).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
    // (Claims are filled in name order: `cost` is the first to fail.)
    assert!(
        e.to_string().contains("metadata label 'cost-center'"),
        "{e}"
    );
    assert!(e.to_string().contains("claim 'cost'"), "{e}");
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    assert_eq!(audit.matches("/jti/").count(), 0);

    // The identity may not label itself (it may not write its record).
    let refused = ci
        .identity_set_metadata(&name, labels(&[("env", "prod")]), vec![])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(Code::PermissionDenied));
    // Bad labels are refused with the rule.
    for bad in [labels(&[("Env", "x")]), labels(&[("env", "a\nb")])] {
        let e = root
            .identity_set_metadata(&name, bad, vec![])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    }
    let shown = root
        .identity_set_metadata(
            &name,
            labels(&[("env", "prod"), ("cost-center", "cc-42"), ("tmp", "x")]),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(shown.metadata.get("env").map(String::as_str), Some("prod"));

    // `keyward identity metadata` sets and removes; `identity get` shows them.
    let addr = format!("https://{}", server.addr);
    let ca = server.ca.to_string_lossy().into_owned();
    let env = [
        ("KEYWARD_ADDR", addr.as_str()),
        ("KEYWARD_TOKEN", server.root_token.as_str()),
        ("KEYWARD_CACERT", ca.as_str()),
        ("KEYWARD_FORMAT", "json"),
    ];
    let (status, out, err) = cli(
        &[
            "identity",
            "metadata",
            &name,
            "env=staging",
            "--remove",
            "tmp",
        ],
        &env,
        None,
    );
    assert_eq!(status, 0, "{err}");
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["metadata"]["env"], "staging", "{out}");
    assert!(got["metadata"].get("tmp").is_none(), "{out}");
    let (status, out, err) = cli(&["identity", "get", &name], &env, None);
    assert_eq!(status, 0, "{err}");
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["metadata"]["cost-center"], "cc-42", "{out}");
    let (status, _, err) = cli(&["identity", "metadata", &name, "novalue"], &env, None);
    assert_eq!(status, 2, "a label without '=' is a usage error: {err}");

    // Now the token carries them; a relying party verifies it.
    let t = ci.identity_token(&role, None, None).await.unwrap();
    let (_, keys) = fetch_keys(&server, &issuer).await;
    let claims = verify(&t.token, &keys, &validation(&issuer, "sts.example")).unwrap();
    assert_eq!(claims["env"], "staging");
    assert_eq!(claims["cost"], "team-a/cc-42");
    assert_eq!(
        claims["sub"],
        format!("spiffe://{TRUST_DOMAIN}/ci-runner/{name}")
    );
    // Nothing secret is in it: not the secret it may read, its secret-id,
    // its token.
    let payload = String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(t.token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    for secret in [
        "hunter2-do-not-leak",
        sid.secret_id.as_str(),
        me.token.as_str(),
    ] {
        assert!(!payload.contains(secret), "{payload}");
    }

    // No template may name a secret, a token, a secret-id or the role-id.
    for bad in [
        "{{secret.password}}",
        "{{secret/data/x}}",
        "{{token}}",
        "{{identity.token}}",
        "{{identity.secret_id}}",
        "{{identity.role_id}}",
        "{{identity.metadata}}",
    ] {
        let e = root
            .put_oidc_role(
                &unique("bad"),
                vec!["a".into()],
                Duration::from_secs(60),
                [("k".to_owned(), bad.to_owned())].into(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{bad}: {e}");
    }
}

/// `write` on `identity/<name>` alone only takes access away. Labels and
/// the owner are claims of identity tokens (the owner always: its `owner`
/// claim) that relying parties may map to access: changing them needs every
/// policy the identity holds, as `identity enable` does, also when the same
/// call sets the policies. Before, a holder of `write` could label an
/// identity `env=prod`, or change its owner, and so win it a cloud role.
#[tokio::test]
async fn write_alone_cannot_change_what_identity_tokens_claim() {
    use keyward::proto::v1::UpdateIdentityRequest;
    let (server, _issuer) = issuer_server().await;
    let root = server.root().await;
    let policy = unique("claimed");
    root.policy_put(
        &policy,
        "[[rule]]\npath = \"secret/claimed/*\"\ncapabilities = [\"read\"]\n",
    )
    .await
    .unwrap();
    let name = unique("claimed");
    root.identity_create(create(&name, "ci-runner", "team-a", &[policy]))
        .await
        .unwrap();
    let writer_policy = unique("writer");
    root.policy_put(
        &writer_policy,
        &format!("[[rule]]\npath = \"identity/{name}\"\ncapabilities = [\"read\", \"write\"]\n"),
    )
    .await
    .unwrap();
    let writer = root
        .issue_token(keyward::client::IssueOptions {
            policies: vec![writer_policy.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let writer = server.anonymous().await.with_token(&writer.token).unwrap();
    let owner = |owner: &str| UpdateIdentityRequest {
        name: name.clone(),
        owner: Some(owner.to_owned()),
        ..Default::default()
    };
    let e = writer.identity_update(owner("team-b")).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    // Setting policies the writer holds in the same call does not carry
    // the owner change past the check.
    let mut both = owner("team-b");
    both.set_policies = true;
    both.policies = vec![writer_policy.clone()];
    let e = writer.identity_update(both).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    let e = writer
        .identity_set_metadata(&name, labels(&[("env", "prod")]), vec![])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    let e = writer
        .identity_set_metadata(&name, HashMap::new(), vec!["env".into()])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    // The same owner again changes nothing and is not refused.
    writer.identity_update(owner("team-a")).await.unwrap();
    // Whoever holds the identity's policies (here root) may.
    root.identity_update(owner("team-prod")).await.unwrap();
    let shown = root
        .identity_set_metadata(&name, labels(&[("env", "prod")]), vec![])
        .await
        .unwrap();
    assert_eq!(shown.owner, "team-prod");
    assert_eq!(shown.metadata.get("env").map(String::as_str), Some("prod"));
    server.stop().await;
}
