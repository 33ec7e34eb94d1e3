//! The work that must run once per vault, and the supervisor that runs it
//! while this node leads (see `storage::cluster`).
//!
//! Leader-only tasks: the rotation scheduler and its workers, the token and
//! lease sweepers, identity expiry, OIDC signing-key rotation, decommission
//! runs and the recertifier. Each runs under the term's [`Fence`], so its
//! writes to etcd are refused once the term has ended.
//!
//! The supervisor follows the [`Leadership`] view: when this node becomes
//! leader it starts the tasks (with a shutdown of their own); when it stops
//! being leader, or the term changes, it stops them and waits for them
//! (rotation workers stop at a step boundary). It also sets
//! `keyward_cluster_leader` and tells the health service NOT_SERVING while
//! etcd cannot be reached.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;

use super::tasks::Tasks;
use crate::clock::{Shutdown, ShutdownTrigger};
use crate::config::GovernanceConfig;
use crate::core::Core;
use crate::identity::expiry::IdentityExpiry;
use crate::rotation::Broker;
use crate::storage::cluster::{self, Fence, Leadership};

/// How long the leader's tasks may take to stop when the term ends (less
/// than the server's own drain deadline, which waits for the supervisor).
const LEADER_DRAIN: Duration = Duration::from_secs(8);
/// How often NOT_SERVING is said again while etcd is lost (a seal or
/// unseal in between may have said otherwise).
const LOST_REPEAT: Duration = Duration::from_secs(1);

/// The handles the leader's tasks use.
#[derive(Clone)]
pub(super) struct LeaderWork {
    core: Arc<Core>,
    governance: GovernanceConfig,
}

/// Registers `keyward_cluster_leader` (1 on the leader).
pub(super) fn register_gauge(metrics: &crate::metrics::Metrics) -> Gauge {
    let gauge = Gauge::default();
    metrics.register(
        "cluster_leader",
        "1 while this node is the cluster leader (always 1 on a single node)",
        gauge.clone(),
    );
    gauge
}

impl LeaderWork {
    pub(super) fn new(core: &Arc<Core>, governance: GovernanceConfig) -> Self {
        Self {
            core: core.clone(),
            governance,
        }
    }

    /// Spawns every leader-only task into `tasks`, each under `fence`.
    pub(super) fn spawn_into(&self, tasks: &mut Tasks, fence: Option<Fence>) {
        let core = &self.core;
        let clock = core.clock().clone();
        // Token expiry: one sleeper over the time-ordered index.
        let tokens = core.tokens.clone();
        let f = fence.clone();
        tasks.spawn("token-sweeper", move |shutdown| {
            cluster::fenced(f, tokens.run_sweeper(shutdown))
        });
        // Lease expiry and revocation: one sleeper over the time-ordered index.
        let leases = core.leases.clone();
        let f = fence.clone();
        tasks.spawn("lease-sweeper", move |shutdown| {
            cluster::fenced(f, leases.run_sweeper(shutdown))
        });
        // Revokes the tokens of identities whose expiry passed, and their
        // certificates.
        let expiry = IdentityExpiry {
            identities: core.identities.clone(),
            tokens: Arc::new(core.tokens.clone()),
            certificates: core.pki.clone(),
            barrier: core.barrier.clone(),
            clock,
        };
        let f = fence.clone();
        tasks.spawn("identity-expiry", move |shutdown| {
            cluster::fenced(f, expiry.run(shutdown))
        });
        // OIDC signing keys: a new one every oidc_provider.rotation_period.
        let federation = core.federation.clone();
        let f = fence.clone();
        tasks.spawn("oidc-key-rotation", move |shutdown| {
            cluster::fenced(f, federation.run_rotation(shutdown))
        });
        // Rotation: the scheduler runs while unsealed; its task ends once its
        // workers have stopped at a step boundary. Workers inherit the fence
        // through the broker (`scheduler::spawn_run`).
        let broker = Broker::clone(&core.rotation);
        let f = fence.clone();
        tasks.spawn("rotation-scheduler", move |shutdown| {
            cluster::fenced(f, async move {
                if let Err(e) = crate::rotation::scheduler::start(broker, shutdown).await {
                    tracing::error!(error = %e, "rotation scheduler failed");
                }
            })
        });
        // Lifecycle (issue 13): unfinished decommissions after an unseal,
        // and the recertifier.
        let lifecycle = core.lifecycle.clone();
        let f = fence.clone();
        tasks.spawn("decommission-resume", move |shutdown| {
            cluster::fenced(f, lifecycle.run_resumer(shutdown))
        });
        let lifecycle = core.lifecycle.clone();
        let governance = self.governance;
        tasks.spawn("recertifier", move |shutdown| {
            cluster::fenced(
                fence,
                lifecycle.run_recertifier(
                    governance,
                    crate::lifecycle::attest::PASS_EVERY,
                    shutdown,
                ),
            )
        });
    }
}

/// The leader's running tasks and their own shutdown.
struct Running {
    trigger: ShutdownTrigger,
    tasks: Tasks,
    term: Option<i64>,
}

/// Stops the leader's tasks and waits for them.
async fn stop(running: Running, core: &Core) {
    running.trigger.trigger();
    // Wakes the rotation sleeper; its workers stop at a step boundary.
    core.rotation.on_seal();
    let late = running.tasks.drain(LEADER_DRAIN).await;
    if late.is_empty() {
        tracing::info!("leader tasks stopped");
    } else {
        tracing::warn!(?late, "leader tasks did not stop in time");
    }
}

/// Runs the leader's tasks while this node leads, and says NOT_SERVING
/// while etcd cannot be reached, until `shutdown`.
///
/// The two follow the view apart (`follow_leadership`, `follow_reach`):
/// stopping the leader's tasks may take up to [`LEADER_DRAIN`] when they
/// are waiting on a lost etcd, and health must not wait for that.
pub(super) async fn supervise(
    leadership: Arc<dyn Leadership>,
    work: LeaderWork,
    gauge: Gauge,
    core: Arc<Core>,
    health: tonic_health::server::HealthReporter,
    shutdown: Shutdown,
) {
    tokio::join!(
        follow_leadership(&*leadership, work, gauge, &core, shutdown.clone()),
        follow_reach(&*leadership, &core, &health, shutdown),
    );
    // Lets another node take over at once rather than after the lease.
    let _ = tokio::task::spawn_blocking(move || leadership.resign()).await;
}

/// Starts the leader's tasks when this node becomes leader, and stops them
/// (waiting for them) when it stops leading or the term changes.
async fn follow_leadership(
    leadership: &dyn Leadership,
    work: LeaderWork,
    gauge: Gauge,
    core: &Core,
    shutdown: Shutdown,
) {
    let mut view = leadership.watch();
    let mut running: Option<Running> = None;
    loop {
        let now = view.borrow_and_update().clone();
        gauge.set(i64::from(now.is_leader));
        let term = now.fence.as_ref().map(|f| f.revision);
        let changed_term = running.as_ref().is_some_and(|r| r.term != term);
        if running.is_some() && (!now.is_leader || changed_term) {
            if let Some(old) = running.take() {
                tracing::info!(
                    node = leadership.node_id(),
                    "no longer the cluster leader: stopping leader tasks"
                );
                stop(old, core).await;
            }
        }
        if now.is_leader && running.is_none() {
            tracing::info!(
                node = leadership.node_id(),
                "cluster leader: starting leader tasks"
            );
            let trigger = ShutdownTrigger::new();
            let mut tasks = Tasks::new(trigger.signal());
            work.spawn_into(&mut tasks, now.fence.clone());
            running = Some(Running {
                trigger,
                tasks,
                term,
            });
        }
        tokio::select! {
            () = shutdown.wait() => break,
            changed = view.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    if let Some(old) = running.take() {
        stop(old, core).await;
    }
    gauge.set(0);
}

/// Says NOT_SERVING while the view says etcd cannot be reached (again every
/// [`LOST_REPEAT`]), and the sealed state's health once it can.
async fn follow_reach(
    leadership: &dyn Leadership,
    core: &Core,
    health: &tonic_health::server::HealthReporter,
    shutdown: Shutdown,
) {
    let mut view = leadership.watch();
    let mut lost = false;
    loop {
        let reachable = view.borrow_and_update().reachable;
        if !reachable {
            crate::api::sys::publish_not_serving(health).await;
        } else if lost {
            crate::api::sys::publish_health(health, core.is_sealed()).await;
        }
        if reachable == lost {
            if reachable {
                tracing::info!("etcd reachable again: serving");
            } else {
                tracing::error!("etcd cannot be reached: health says NOT_SERVING");
            }
        }
        lost = !reachable;
        tokio::select! {
            () = shutdown.wait() => break,
            changed = view.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            () = tokio::time::sleep(LOST_REPEAT), if lost => {}
        }
    }
}
