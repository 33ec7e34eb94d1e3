//! etcd member failures seen through keyward nodes: two `keyward server`
//! child processes (`ha_kit`) on a real 3-member etcd cluster (`etcd_kit`).
//! One member killed (SIGKILL, etcd's raft leader) while writes go on: the
//! nodes keep serving reads and writes (a few calls during etcd's election
//! may fail, and health may say NOT_SERVING for a moment: both are printed,
//! the writes that were acknowledged are all kept). A second one killed: no quorum, writes and reads fail
//! with UNAVAILABLE naming etcd, health says NOT_SERVING. Both members back:
//! every acknowledged write reads back and writes work again.
//!
//! Every wait is for an event, with the generous bound of `ha_kit::BOUND`;
//! the times measured are printed, never asserted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tonic::Code;

use crate::ha_kit::{cluster, init_and_unseal, leads, wait_for, wait_until_leads, Node, BOUND};
use crate::harness::{data, unique};
use keyward::client::{Client, PutOptions};

/// What the writers saw: acknowledged `(key, value)` pairs and refusals.
#[derive(Default)]
struct Writes {
    acked: Vec<(String, String)>,
    failed: Vec<String>,
}

/// Writers on `clients` (two per client), each writing its own keys until
/// `stop`; returns their handles.
fn start_writers(
    clients: &[Client],
    writes: &Arc<Mutex<Writes>>,
    stop: &Arc<AtomicBool>,
    under: &str,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut writers = Vec::new();
    for w in 0..clients.len() * 2 {
        let client = clients[w % clients.len()].clone();
        let (writes, stop, under) = (writes.clone(), stop.clone(), under.to_owned());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && i < 5000 {
                let key = format!("{under}/w{w}/s{i}");
                let value = format!("v-{w}-{i}");
                let fields = data(&[("v", &value)]);
                match client.put(&key, &fields, PutOptions::default()).await {
                    Ok(_) => writes.lock().unwrap().acked.push((key, value)),
                    Err(e) => writes.lock().unwrap().failed.push(e.to_string()),
                }
                i += 1;
            }
        }));
    }
    writers
}

fn acked(writes: &Arc<Mutex<Writes>>) -> usize {
    writes.lock().unwrap().acked.len()
}

/// Every acknowledged write reads back, with its value, from every client.
async fn all_read_back(acked: &[(String, String)], clients: &[Client]) {
    for (key, value) in acked {
        for client in clients {
            let read = client.get(key).await.unwrap();
            assert_eq!(read.field_str("v"), Some(value.as_str()), "{key}");
        }
    }
}

/// The health of `node` as its gRPC health service says it (false on an
/// error).
async fn serving(node: &Node) -> bool {
    node.client(None).await.health().await.unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_members_killed_under_writes_and_brought_back() {
    let (mut etcd, _certs_dir, certs, prefix) = cluster();
    let kw1 = Node::start(&etcd, &prefix, &certs, "kw1", &[]);
    wait_until_leads(&kw1).await;
    let kw2 = Node::start(&etcd, &prefix, &certs, "kw2", &[]);
    let root_token = init_and_unseal(&[&kw1, &kw2]).await;
    let roots = [
        kw1.client(Some(&root_token)).await,
        kw2.client(Some(&root_token)).await,
    ];

    // ---- one member of three killed (etcd's raft leader), writes under way
    let writes = Arc::new(Mutex::new(Writes::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let under = unique("members");
    let writers = start_writers(&roots, &writes, &stop, &under);
    wait_for("some writes are acknowledged", || {
        let n = acked(&writes);
        async move { (n >= 40).then_some(()) }
    })
    .await;
    let status = kw1.client(None).await.status().await.unwrap();
    let raft_leader = status
        .etcd_endpoints
        .iter()
        .find(|e| e.detail.contains("raft leader"))
        .map(|e| e.endpoint.clone())
        .unwrap_or_else(|| panic!("no member says it is etcd's leader: {status:?}"));
    let first = etcd
        .members
        .iter()
        .position(|m| m.client_url == raft_leader)
        .unwrap();
    let (acked_before, failed_before) = {
        let w = writes.lock().unwrap();
        (w.acked.len(), w.failed.len())
    };
    // Both nodes' health, polled while the member is down: etcd elects a
    // new leader meanwhile, and a node's election loop may see its requests
    // fail for a moment.
    let polling = Arc::new(AtomicBool::new(true));
    let mut pollers = Vec::new();
    for node in [&kw1, &kw2] {
        let (client, polling) = (node.client(None).await, polling.clone());
        pollers.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut not_serving = Vec::new();
            while polling.load(Ordering::SeqCst) {
                if !client.health().await.unwrap_or(false) {
                    not_serving.push(started.elapsed().as_secs_f64());
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            not_serving
        }));
    }
    etcd.members[first].kill();
    let killed_at = Instant::now();
    wait_for("writes go on after one member was killed", || {
        let n = acked(&writes);
        async move { (n >= acked_before + 100).then_some(()) }
    })
    .await;
    println!(
        "one etcd member (the raft leader) killed: 100 more writes acknowledged {:.2} s later",
        killed_at.elapsed().as_secs_f64()
    );
    // Reads go on on both nodes; both say SERVING; status names the dead
    // member as unhealthy and the others as healthy.
    let some = writes.lock().unwrap().acked[acked_before].clone();
    for root in &roots {
        let read = root.get(&some.0).await.unwrap();
        assert_eq!(read.field_str("v"), Some(some.1.as_str()));
    }
    for node in [&kw1, &kw2] {
        wait_for("SERVING with one member down", || async move {
            serving(node).await.then_some(())
        })
        .await;
    }
    let dead_url = etcd.members[first].client_url.clone();
    let anonymous = kw2.client(None).await;
    wait_for("status shows the killed member unhealthy", || {
        let (anonymous, dead_url) = (anonymous.clone(), dead_url.clone());
        async move {
            let status = anonymous.status().await.ok()?;
            let (dead, alive): (Vec<_>, Vec<_>) = status
                .etcd_endpoints
                .iter()
                .partition(|e| e.endpoint == dead_url);
            (dead.len() == 1 && !dead[0].healthy && alive.iter().all(|e| e.healthy)).then_some(())
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }
    polling.store(false, Ordering::SeqCst);
    for (node, poller) in [&kw1, &kw2].into_iter().zip(pollers) {
        let seen = poller.await.unwrap();
        match (seen.first(), seen.last()) {
            (Some(from), Some(to)) => println!(
                "{} said NOT_SERVING in {} polls, from {from:.2} s to {to:.2} s after the kill",
                node.id,
                seen.len()
            ),
            _ => println!("{} said SERVING at every poll", node.id),
        }
    }
    let (acked_one_down, failed_one_down) = {
        let w = writes.lock().unwrap();
        (w.acked.clone(), w.failed[failed_before..].to_vec())
    };
    // What the refusals were, as each node logged them (operation and
    // etcd's reason only).
    for node in [&kw1, &kw2] {
        for line in node
            .log_text()
            .lines()
            .filter(|l| l.contains("internal error"))
        {
            println!("{} logged: {line}", node.id);
        }
    }
    println!(
        "with one member down: {} writes acknowledged in all, {} refused after the kill{}",
        acked_one_down.len(),
        failed_one_down.len(),
        failed_one_down
            .first()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    all_read_back(&acked_one_down, &roots).await;

    // ---- a second member killed: no quorum
    let second = (0..3)
        .find(|i| *i != first)
        .expect("a second running member");
    etcd.members[second].kill();
    let lost_at = Instant::now();
    // Both nodes' health, watched from now on while the calls below run.
    let mut not_serving = Vec::new();
    for node in [&kw1, &kw2] {
        let client = node.client(None).await;
        not_serving.push(tokio::spawn(async move {
            wait_for("NOT_SERVING without quorum", || {
                let client = client.clone();
                async move { (!client.health().await.unwrap_or(true)).then_some(()) }
            })
            .await;
            lost_at.elapsed()
        }));
    }
    // A write fails UNAVAILABLE, naming etcd, within the bound (no hang).
    let refused_key = unique("refused");
    let refused = tokio::time::timeout(
        BOUND,
        roots[1].put(
            &refused_key,
            &data(&[("v", "never acknowledged")]),
            PutOptions::default(),
        ),
    )
    .await
    .expect("a Put without quorum answers within the bound")
    .expect_err("a Put without quorum is refused");
    println!(
        "Put without quorum refused after {:.2} s: {refused}",
        lost_at.elapsed().as_secs_f64()
    );
    assert_eq!(refused.code(), Some(Code::Unavailable), "{refused}");
    assert!(refused.to_string().contains("etcd"), "{refused}");
    // Reads fail the same way (every read is a linearizable etcd read),
    // on both nodes, also for a key read before.
    for root in &roots {
        let started = Instant::now();
        let read = tokio::time::timeout(BOUND, root.get(&some.0))
            .await
            .expect("a Get without quorum answers within the bound")
            .expect_err("a Get without quorum is refused");
        println!(
            "Get without quorum refused after {:.2} s: {read}",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(read.code(), Some(Code::Unavailable), "{read}");
        assert!(read.to_string().contains("etcd"), "{read}");
    }
    // Both nodes say NOT_SERVING.
    for (node, seen) in [&kw1, &kw2].into_iter().zip(not_serving) {
        let after = seen.await.unwrap();
        println!(
            "{} says NOT_SERVING {:.2} s after the second member was killed",
            node.id,
            after.as_secs_f64()
        );
    }
    // A request now, with the quorum known lost, is refused at once.
    let started = Instant::now();
    let again = roots[0]
        .put(
            &unique("refused"),
            &data(&[("v", "x")]),
            PutOptions::default(),
        )
        .await
        .unwrap_err();
    println!(
        "a later Put refused after {:.2} s: {again}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(again.code(), Some(Code::Unavailable), "{again}");

    // ---- both members back
    etcd.members[first].restart();
    etcd.members[second].restart();
    etcd.wait_healthy();
    let back_at = Instant::now();
    for node in [&kw1, &kw2] {
        wait_for("SERVING once the members are back", || async move {
            serving(node).await.then_some(())
        })
        .await;
    }
    wait_for("a leader again", || {
        let (one, two) = (&kw1, &kw2);
        async move { (leads(one).await || leads(two).await).then_some(()) }
    })
    .await;
    println!(
        "SERVING on both nodes and a leader {:.2} s after both members were back",
        back_at.elapsed().as_secs_f64()
    );
    all_read_back(&acked_one_down, &roots).await;
    // The refused write said whether it may have been applied; when it
    // said nothing was, nothing was.
    if refused.to_string().contains("nothing was applied") {
        let code = roots[0].get(&refused_key).await.unwrap_err().code();
        assert_eq!(code, Some(Code::NotFound));
    }
    // Writes work again on both nodes.
    for (n, root) in roots.iter().enumerate() {
        let key = format!("{under}/after/{n}");
        root.put(&key, &data(&[("v", "back")]), PutOptions::default())
            .await
            .unwrap();
        let read = roots[1 - n].get(&key).await.unwrap();
        assert_eq!(read.field_str("v"), Some("back"));
    }
    println!(
        "{} acknowledged writes read back from both nodes after the members came back",
        acked_one_down.len()
    );
}
