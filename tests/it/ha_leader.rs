//! Leader election, fencing and the cluster's status on a real 3-member
//! etcd cluster (`etcd_kit`), with keyward nodes as child processes of the
//! `keyward` binary (`keyward server --config`), so that a node can be
//! killed (SIGKILL) or frozen (SIGSTOP) as a whole.
//!
//! Every wait is for an event, with a generous bound (60 s); the measured
//! leader change is printed, never asserted beyond that bound.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::db_target::{password, with_cleanup, Kind, Target};
use crate::ha_kit::{cluster, init_and_unseal, leads, wait_for, wait_until_leads, Node};
use crate::harness::{data, unique};
use keyward::client::{Client, PutOptions, RotationPolicySpec, ScheduleSpec};

fn spec(provider: &str, pairs: &[(&str, &str)]) -> RotationPolicySpec {
    RotationPolicySpec {
        provider: provider.to_owned(),
        schedule: ScheduleSpec::Every(Duration::from_secs(3600)),
        grace: Duration::from_secs(3600),
        settings: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// A Redis user with a known password, its admin secret and a rotation
/// policy (single user) on `path`; the user's name and first password.
async fn redis_rotation(t: &Target, root: &Client, prefix: &str) -> (String, String, String) {
    let (admin, path) = (format!("{prefix}/admin"), format!("{prefix}/app"));
    let fields: Vec<(String, String)> = t.admin();
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    root.put(&admin, &data(&pairs), PutOptions::default())
        .await
        .unwrap();
    let user = t.user("app");
    let initial = password();
    t.create_user(&user, &initial).await;
    root.put(
        &path,
        &data(&[("username", &user), ("password", &initial)]),
        PutOptions::default(),
    )
    .await
    .unwrap();
    root.set_rotation_policy(
        &path,
        &spec(
            t.provider(),
            &[
                ("admin_secret", &admin),
                ("strategy", "single"),
                ("username", &user),
            ],
        ),
    )
    .await
    .unwrap();
    (path, user, initial)
}

/// SIGKILL of the leader while writes go on and a rotation is between its
/// apply and verify steps: nothing acknowledged is lost, another node
/// leads, and the rotation ends exactly once with `current` logging in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_under_writes_and_a_rotation() {
    let target = Target::new(Kind::Redis).await;
    let t = target.clone();
    with_cleanup(target, async move {
        let (etcd, _certs_dir, certs, prefix) = cluster();
        // kw1 starts alone, so it is the first leader. It kills itself
        // (SIGKILL, the rotation fault point) once a rotation's apply step
        // is durable: a kill in the middle of a rotation, whatever the
        // machine's speed.
        let mut kw1 = Node::start(
            &etcd,
            &prefix,
            &certs,
            "kw1",
            &[("KEYWARD_TEST_CRASH_AFTER", "apply")],
        );
        wait_until_leads(&kw1).await;
        let kw2 = Node::start(&etcd, &prefix, &certs, "kw2", &[]);
        let kw3 = Node::start(&etcd, &prefix, &certs, "kw3", &[]);
        let root_token = init_and_unseal(&[&kw1, &kw2, &kw3]).await;
        let roots = [
            kw1.client(Some(&root_token)).await,
            kw2.client(Some(&root_token)).await,
            kw3.client(Some(&root_token)).await,
        ];
        let (path, user, initial) = redis_rotation(&t, &roots[1], &unique("ha-kill")).await;

        // Writers on every node, kw1 included.
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let written = unique("acked");
        let mut writers = Vec::new();
        for w in 0..6 {
            let client = roots[w % 3].clone();
            let (acked, stop, written) = (acked.clone(), stop.clone(), written.clone());
            writers.push(tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 400 {
                    let key = format!("{written}/w{w}/s{i}");
                    let value = format!("v-{w}-{i}");
                    if client
                        .put(&key, &data(&[("v", &value)]), PutOptions::default())
                        .await
                        .is_ok()
                    {
                        acked.lock().unwrap().push((key, value));
                    }
                    i += 1;
                }
            }));
        }
        wait_for("some writes are acknowledged", || {
            let n = acked.lock().unwrap().len();
            async move { (n >= 30).then_some(()) }
        })
        .await;
        // The rotation, on the leader: it dies after its apply step.
        let started = roots[0].rotate(&path, false).await.unwrap();
        wait_for("kw1 is dead", || {
            let dead = kw1.has_exited();
            async move { dead.then_some(()) }
        })
        .await;
        let killed_at = Instant::now();
        let new_leader = wait_for("another node leads", || {
            let (two, three) = (&kw2, &kw3);
            async move {
                if leads(two).await {
                    Some("kw2")
                } else if leads(three).await {
                    Some("kw3")
                } else {
                    None
                }
            }
        })
        .await;
        let leader_change = killed_at.elapsed();
        println!(
            "leader change after SIGKILL of the leader: {new_leader} leads {:.2} s after kw1 died",
            leader_change.as_secs_f64()
        );
        // More writes after the change, then stop the writers.
        wait_for("writes go on after the change", || {
            let n = acked.lock().unwrap().len();
            async move { (n >= 60).then_some(()) }
        })
        .await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for writer in writers {
            writer.await.unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        for (key, value) in &acked {
            for survivor in &roots[1..] {
                let read = survivor.get(key).await.unwrap();
                assert_eq!(read.field_str("v"), Some(value.as_str()), "{key}");
            }
        }
        println!(
            "{} acknowledged writes read back from both survivors",
            acked.len()
        );

        // The new leader resumes the run where kw1 left it and ends it.
        let run = wait_for("the rotation finishes on the new leader", || {
            let (client, path, id) = (&roots[1], &path, &started.run_id);
            async move {
                let runs = client.rotation_history(path).await.ok()?;
                runs.into_iter()
                    .find(|r| &r.run_id == id && r.state != "running")
            }
        })
        .await;
        assert_eq!(run.state, "succeeded", "{:?}", run.steps);
        // The time from the kill to the first rotation step on the new
        // leader, from the run's own records: kw1 killed itself right after
        // recording its apply step; the next record is the new leader's
        // (recorded once that step has acted on Redis). Printed, not asserted.
        let millis = |t: &Option<prost_types::Timestamp>| {
            t.as_ref()
                .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        };
        let apply_index = run
            .steps
            .iter()
            .position(|s| s.step == "apply" && s.outcome == "ok")
            .unwrap();
        let next = &run.steps[apply_index + 1];
        let (applied_at, next_at) = (
            millis(&run.steps[apply_index].at).unwrap(),
            millis(&next.at).unwrap(),
        );
        println!(
            "first rotation step on the new leader ({} {}) recorded {:.2} s after kw1's last \
             step (apply), on which kw1 was killed",
            next.step,
            next.outcome,
            (next_at - applied_at) as f64 / 1000.0,
        );
        let applied: Vec<_> = run
            .steps
            .iter()
            .filter(|s| s.step == "apply" && s.outcome == "ok")
            .collect();
        assert_eq!(applied.len(), 1, "one apply: {:?}", run.steps);
        let generated = run
            .steps
            .iter()
            .filter(|s| s.step == "generate" && s.outcome == "ok")
            .count();
        assert_eq!(generated, 1, "one generated value: {:?}", run.steps);
        let history = roots[2].rotation_history(&path).await.unwrap();
        assert_eq!(history.len(), 1, "one run: {history:?}");
        let meta = roots[2].metadata(&path).await.unwrap();
        assert_eq!(meta.newest_version, 2, "one new version: {meta:?}");
        assert_eq!(meta.current_version, 2);
        let current = roots[2].get(&path).await.unwrap();
        let new = current.field_str("password").unwrap().to_owned();
        assert!(t.can_login(&user, &new).await, "current logs in");
        assert!(
            !t.can_login(&user, &initial).await,
            "the old password is refused"
        );
        drop(etcd);
    })
    .await;
}

/// A leader frozen (SIGSTOP) after generating a value and before storing
/// it, past its lease: another node leads and rotates; when the old one
/// runs again its late write is refused by the fence, and the target and
/// the store keep the one value the new leader promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_paused_past_its_lease_cannot_finish_its_step() {
    let target = Target::new(Kind::Redis).await;
    let t = target.clone();
    with_cleanup(target, async move {
        let (etcd, _certs_dir, certs, prefix) = cluster();
        let kw1 = Node::start(
            &etcd,
            &prefix,
            &certs,
            "kw1",
            &[("KEYWARD_TEST_STOP_AT", "generated")],
        );
        wait_until_leads(&kw1).await;
        let kw2 = Node::start(&etcd, &prefix, &certs, "kw2", &[]);
        let root_token = init_and_unseal(&[&kw1, &kw2]).await;
        let one = kw1.client(Some(&root_token)).await;
        let two = kw2.client(Some(&root_token)).await;
        let (path, user, initial) = redis_rotation(&t, &two, &unique("ha-fence")).await;

        // kw1 generates a value and freezes before storing it.
        one.rotate(&path, false).await.unwrap();
        wait_for("kw1 is stopped", || {
            let stopped = kw1.is_stopped();
            async move { stopped.then_some(()) }
        })
        .await;
        let frozen_at = Instant::now();
        wait_for("kw2 leads", || {
            let n = &kw2;
            async move { leads(n).await.then_some(()) }
        })
        .await;
        println!(
            "kw2 leads {:.2} s after kw1 froze",
            frozen_at.elapsed().as_secs_f64()
        );
        // kw2 resumes the recorded run and finishes it.
        let run = wait_for("kw2 finishes the rotation", || {
            let (client, path) = (&two, &path);
            async move {
                let runs = client.rotation_history(path).await.ok()?;
                runs.into_iter().find(|r| r.state != "running")
            }
        })
        .await;
        assert_eq!(run.state, "succeeded", "{:?}", run.steps);
        let promoted = two.get(&path).await.unwrap();
        let value = promoted.field_str("password").unwrap().to_owned();
        assert!(t.can_login(&user, &value).await);

        // kw1 runs again; once it has stopped its leader tasks (its worker
        // stopped with them), the store and the target are looked at.
        kw1.signal("CONT");
        wait_for("kw1 stops its leader tasks", || {
            let log = kw1.log_text();
            async move { log.contains("leader tasks stopped").then_some(()) }
        })
        .await;
        let meta = two.metadata(&path).await.unwrap();
        assert_eq!(
            meta.newest_version, 2,
            "no version from the deposed leader: {meta:?}"
        );
        let current = two.get(&path).await.unwrap();
        assert_eq!(current.field_str("password"), Some(value.as_str()));
        assert!(
            t.can_login(&user, &value).await,
            "the target has the promoted value"
        );
        assert!(!t.can_login(&user, &initial).await);
        let runs = two.rotation_history(&path).await.unwrap();
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert_eq!(runs[0].state, "succeeded");
        // What stopped it: its write was refused by the fence.
        assert!(
            kw1.log_text().contains(keyward::storage::cluster::FENCED),
            "kw1's log names the refused write"
        );
        assert!(!leads(&kw1).await, "kw1 no longer says it leads");
        drop(etcd);
    })
    .await;
}

/// `keyward status`, `/metrics`, the audit records' node id, and health
/// NOT_SERVING while every etcd member is down (SERVING once they are back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_metrics_audit_and_health_follow_the_cluster() {
    let (mut etcd, _certs_dir, certs, prefix) = cluster();
    let kw1 = Node::start(&etcd, &prefix, &certs, "kw1", &[]);
    wait_until_leads(&kw1).await;
    let kw2 = Node::start(&etcd, &prefix, &certs, "kw2", &[]);
    let root_token = init_and_unseal(&[&kw1, &kw2]).await;
    let two = kw2.client(Some(&root_token)).await;
    two.put(
        &unique("ha-status"),
        &data(&[("k", "v")]),
        PutOptions::default(),
    )
    .await
    .unwrap();

    let status = kw2.client(None).await.status().await.unwrap();
    assert_eq!(status.node_id, "kw2");
    assert_eq!(status.leader, "kw1");
    assert!(!status.is_leader);
    assert_eq!(status.etcd_endpoints.len(), 3, "{status:?}");
    assert!(
        status.etcd_endpoints.iter().all(|e| e.healthy),
        "{status:?}"
    );
    let status = kw1.client(None).await.status().await.unwrap();
    assert!(status.is_leader && status.leader == "kw1", "{status:?}");

    // The CLI prints the same.
    let (code, out, err) = crate::harness::cli(
        &["status", "--format", "json"],
        &[
            ("KEYWARD_ADDR", &kw2.addr),
            ("KEYWARD_CACERT", &certs.ca.display().to_string()),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let printed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(printed["node_id"], "kw2");
    assert_eq!(printed["leader"], "kw1");
    assert_eq!(printed["etcd_endpoints"].as_array().unwrap().len(), 3);

    let one_metrics = kw1.scrape().await;
    let two_metrics = kw2.scrape().await;
    assert!(
        one_metrics.contains("\nkeyward_cluster_leader 1\n"),
        "{one_metrics}"
    );
    assert!(
        two_metrics.contains("\nkeyward_cluster_leader 0\n"),
        "{two_metrics}"
    );
    assert!(
        two_metrics
            .contains("keyward_etcd_request_duration_seconds_bucket{le=\"+Inf\",op=\"batch\"}"),
        "{two_metrics}"
    );
    assert!(two_metrics.contains("keyward_etcd_request_duration_seconds_count{op=\"get\"}"));
    // kw2's secret write waited for the read-lease acknowledgements (none
    // from kw1 may be needed, but the wait is always timed), and kw2 shows
    // its read lease.
    assert!(
        two_metrics.contains("keyward_etcd_request_duration_seconds_count{op=\"ack_wait\"}"),
        "{two_metrics}"
    );
    assert!(
        two_metrics.contains("\nkeyward_etcd_read_lease_nodes "),
        "{two_metrics}"
    );

    // Each node's audit file names the node in every record and verifies.
    for node in [&kw1, &kw2] {
        let text = std::fs::read_to_string(&node.audit).unwrap();
        let mut records = 0;
        for line in text.lines() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(record["node"], node.id.as_str(), "{line}");
            records += 1;
        }
        assert!(records > 0);
        let report = keyward::audit::verify_file(&node.audit).unwrap();
        assert!(report.ok, "{report:?}");
    }

    // Every etcd member killed: both nodes say NOT_SERVING.
    assert!(two.health().await.unwrap());
    for member in &mut etcd.members {
        member.kill();
    }
    let lost_at = Instant::now();
    for node in [&kw1, &kw2] {
        let client = node.client(None).await;
        wait_for("NOT_SERVING without etcd", || {
            let client = client.clone();
            async move { (!client.health().await.unwrap_or(true)).then_some(()) }
        })
        .await;
    }
    println!(
        "NOT_SERVING on both nodes {:.2} s after every etcd member was killed",
        lost_at.elapsed().as_secs_f64()
    );
    // `keyward status` still answers, and its probe finds no member.
    let anonymous = kw2.client(None).await;
    wait_for("status shows every endpoint unhealthy", || {
        let anonymous = anonymous.clone();
        async move {
            let status = anonymous.status().await.ok()?;
            (status.etcd_endpoints.len() == 3 && status.etcd_endpoints.iter().all(|e| !e.healthy))
                .then_some(())
        }
    })
    .await;
    for member in &mut etcd.members {
        member.restart();
    }
    etcd.wait_healthy();
    for node in [&kw1, &kw2] {
        let client = node.client(None).await;
        wait_for("SERVING once etcd is back", || {
            let client = client.clone();
            async move { client.health().await.unwrap_or(false).then_some(()) }
        })
        .await;
    }
    wait_for("a leader again", || {
        let (one, two) = (&kw1, &kw2);
        async move { (leads(one).await || leads(two).await).then_some(()) }
    })
    .await;
    two.put(
        &unique("ha-back"),
        &data(&[("k", "v")]),
        PutOptions::default(),
    )
    .await
    .unwrap();
}
