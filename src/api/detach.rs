//! Changes that run to their end when the client goes away.
//!
//! A client that leaves mid-call (HTTP/2 `RST_STREAM`, a closed connection,
//! a `grpc-timeout` that ran out) makes the transport drop the handler's
//! future at its next `.await`. For a read that is harmless: its record
//! says `CANCELLED`, and nothing happened. For a change it was not: a Put
//! dropped while it waited for durability or for its outcome record had
//! already written its version, yet its record said `CANCELLED`, with none
//! of the values' HMACs, so the audit trail told a reader the change had
//! not happened. A client could choose that on purpose.
//!
//! So [`Detach`] polls a change's handler in place, as any other, but
//! boxed, and hands it an [`Acting`] mark (in the request's extensions)
//! that its call sets once it acts: once its request record is written or
//! queued (`core::call`). If the transport drops the handler after that and
//! before its end, the box is handed to a task of its own, which runs it
//! out: the change, its durability wait and its outcome record stay one
//! sequence, and only the answer is thrown away. The call learns that its
//! client left (`Call::client_left`), so a wait that only served the client
//! (a Rotate's `wait`) ends. A change dropped before it acts (still reading
//! its request, waiting for a key set, refused) is dropped where it stands
//! and recorded `CANCELLED`: it changed nothing. gRPC reads are served in
//! place with nothing added (the method's class is known from the path);
//! over HTTPS the route names the method, so every request gets the box
//! and the mark, and only a change sets it. A change pays one allocation,
//! and a task only when orphaned.
//!
//! **Bound.** At most [`MAX_DETACHED`] orphaned changes run at once (one
//! count for the gRPC and HTTPS listeners of a server, [`Changes`]). Past
//! that an orphaned change is dropped where it stands, as before this
//! existed, and the server log says so (at the 1st, 2nd, 4th, 8th, ...
//! such drop, so a flood cannot flood the log). [`Changes::settled`] lets
//! shutdown wait for them before the audit log is closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;
use tonic::codegen::http;
use tower::Service;

use crate::core::call::{class, Acting, Class};
use crate::metrics::Metrics;

/// How many orphaned changes may run on at once, per server.
pub const MAX_DETACHED: usize = 1024;

/// An error of the transport's service, as tonic and hyper take it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The inner service's error (none of keyward's routers has one), as a
/// concrete type, so hyper's bound on service errors holds for every
/// lifetime.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DetachError(String);

/// Decides from the request line whether a request may change state.
pub type IsChange = fn(&http::Method, &http::Uri) -> bool;

/// The slots of orphaned changes, shared by a server's listeners.
#[derive(Clone)]
pub struct Changes {
    slots: Arc<Semaphore>,
    limit: usize,
    /// Orphans run to their end.
    orphaned: Counter,
    /// Orphans stopped where they stood (no slot, or shutting down).
    dropped: Counter,
}

impl Changes {
    pub fn new(limit: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            orphaned: Counter::default(),
            dropped: Counter::default(),
        }
    }

    /// Publishes the counts as `keyward_changes_orphaned_total` and
    /// `keyward_changes_orphan_dropped_total`.
    pub fn register(&self, metrics: &Metrics) {
        metrics.register(
            "changes_orphaned",
            "Changes whose client left once they acted, run to their end on a task of their own",
            self.orphaned.clone(),
        );
        metrics.register(
            "changes_orphan_dropped",
            "Changes whose client left once they acted, stopped where they stood (no slot free, \
             or shutting down); their record says that what they changed is not known",
            self.dropped.clone(),
        );
    }

    /// Orphans run so far.
    pub fn orphaned(&self) -> u64 {
        self.orphaned.get()
    }

    /// Orphaned changes running now.
    pub fn running(&self) -> usize {
        self.limit - self.slots.available_permits()
    }

    /// Orphaned changes stopped where they stood so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// At shutdown: waits until no orphaned change runs, at most
    /// `deadline` (false if some still ran then), and from then on orphans
    /// no more, so none runs on past the audit log's last flush. While it
    /// waits, a change whose client leaves is dropped where it stands.
    pub async fn settled(&self, deadline: Duration) -> bool {
        let Ok(count) = u32::try_from(self.limit) else {
            self.slots.close();
            return false;
        };
        let all = tokio::time::timeout(deadline, self.slots.acquire_many(count)).await;
        self.slots.close();
        matches!(all, Ok(Ok(_)))
    }

    /// `inner`, whose changes (as `is_change` tells) run to their end.
    pub fn detach<S>(&self, inner: S, is_change: IsChange) -> Detach<S> {
        Detach {
            inner,
            changes: self.clone(),
            is_change,
        }
    }
}

/// A gRPC request is a change when its method's class says so
/// (`core::call::class`; the path is `/package.Service/Method`).
pub fn grpc_is_change(_: &http::Method, uri: &http::Uri) -> bool {
    class(uri.path().trim_start_matches('/')) == Class::Change
}

/// Over HTTPS the route, not the request line, names the seam's method
/// (Vault makes a database user on a `GET` of `database/creds/<role>`), so
/// every request gets the mark. Only a call whose method is a change ever
/// sets it (`core::call::class`, the one table), so a read is never kept;
/// it pays the box and the mark.
pub fn every_request(_: &http::Method, _: &http::Uri) -> bool {
    true
}

/// See the module documentation.
#[derive(Clone)]
pub struct Detach<S> {
    inner: S,
    changes: Changes,
    is_change: IsChange,
}

impl<S> tower::Layer<S> for Changes {
    type Service = Detach<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.detach(inner, grpc_is_change)
    }
}

impl<S, B> Service<http::Request<B>> for Detach<S>
where
    S: Service<http::Request<B>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = DetachError;
    type Future = DetachFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(detach_error)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if !(self.is_change)(req.method(), req.uri()) {
            return DetachFuture::Inline {
                inner: self.inner.call(req),
            };
        }
        let acting = Acting::new();
        req.extensions_mut().insert(acting.clone());
        // For the log line of an orphan: a gRPC method's name, or the HTTP
        // method alone (an HTTPS path names secrets and identities).
        let what = if req.uri().path().starts_with("/keyward.") {
            Describe::Grpc(req.uri().clone())
        } else {
            Describe::Http(req.method().clone())
        };
        DetachFuture::Change {
            inner: Orphanable {
                fut: Some(Box::pin(self.inner.call(req))),
                acting,
                changes: self.changes.clone(),
                what,
            },
        }
    }
}

fn detach_error(e: impl Into<BoxError>) -> DetachError {
    DetachError(e.into().to_string())
}

pin_project_lite::pin_project! {
    /// The answer of a read served in place, or of a change.
    #[project = DetachProj]
    pub enum DetachFuture<F>
    where
        F: Future,
        F: Send,
        F: 'static,
    {
        Inline { #[pin] inner: F },
        Change { inner: Orphanable<F> },
    }
}

impl<F, T, E> Future for DetachFuture<F>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    E: Into<BoxError>,
{
    type Output = Result<T, DetachError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            DetachProj::Inline { inner } => inner.poll(cx).map_err(detach_error),
            DetachProj::Change { inner } => Pin::new(inner).poll(cx).map_err(detach_error),
        }
    }
}

/// A change's handler, polled in place. Dropped once its call acts and
/// before its end, it is handed to a task of its own that runs it out, if
/// one of the [`Changes`] slots is free (the task holds it until the end).
pub struct Orphanable<F>
where
    F: Future + Send + 'static,
{
    fut: Option<Pin<Box<F>>>,
    acting: Acting,
    changes: Changes,
    what: Describe,
}

/// What an orphaned change was, for the server log.
enum Describe {
    Grpc(http::Uri),
    Http(http::Method),
}

impl std::fmt::Display for Describe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Grpc(uri) => f.write_str(uri.path().trim_start_matches('/')),
            Self::Http(method) => write!(f, "HTTPS {method}"),
        }
    }
}

impl<F> Future for Orphanable<F>
where
    F: Future + Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(fut) = self.fut.as_mut() else {
            // Polled again after its answer: a caller's bug; never ready.
            return Poll::Pending;
        };
        let answer = ready!(fut.as_mut().poll(cx));
        self.fut = None;
        Poll::Ready(answer)
    }
}

impl<F> Drop for Orphanable<F>
where
    F: Future + Send + 'static,
{
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else {
            return; // answered
        };
        if !self.acting.is_acting() || std::thread::panicking() {
            // It changed nothing yet (its call records `CANCELLED`), or its
            // handler panicked and cannot be polled again.
            return;
        }
        let slot = self.changes.slots.clone().try_acquire_owned();
        let runtime = tokio::runtime::Handle::try_current();
        let (Ok(slot), Ok(runtime)) = (slot, runtime) else {
            // Its call's record, written as `fut` drops below, says that
            // what it changed is not known.
            self.acting.stopped();
            let dropped = self.changes.dropped.inc() + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    change = %self.what,
                    dropped,
                    "a change whose client left was stopped where it stood (no slot free, \
                     api::detach::MAX_DETACHED, or shutting down)"
                );
            }
            return;
        };
        self.changes.orphaned.inc();
        tracing::debug!(
            change = %self.what,
            "a change whose client left runs to its end; its answer will not be sent"
        );
        self.acting.client_left();
        runtime.spawn(async move {
            drop(fut.await);
            drop(slot);
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::oneshot;

    use super::*;

    /// A handler that acts at once (as a change's call marks it) if `acts`,
    /// then waits for `go`, then counts itself finished.
    #[derive(Clone)]
    struct Waits {
        acts: bool,
        go: Arc<tokio::sync::Mutex<Option<oneshot::Receiver<()>>>>,
        finished: Arc<AtomicUsize>,
        /// The mark of the last change it was given.
        seen: Arc<std::sync::Mutex<Option<Acting>>>,
    }

    impl Service<http::Request<()>> for Waits {
        type Response = &'static str;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<&'static str, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            let this = self.clone();
            let acting = req.extensions().get::<Acting>().cloned();
            self.seen.lock().unwrap().clone_from(&acting);
            Box::pin(async move {
                if let (true, Some(acting)) = (this.acts, &acting) {
                    acting.set_acting();
                }
                let go = this.go.lock().await.take();
                if let Some(go) = go {
                    let _ = go.await;
                }
                this.finished.fetch_add(1, Ordering::SeqCst);
                Ok("answered")
            })
        }
    }

    fn waits(acts: bool) -> (Waits, oneshot::Sender<()>) {
        let (tx, rx) = oneshot::channel();
        let service = Waits {
            acts,
            go: Arc::new(tokio::sync::Mutex::new(Some(rx))),
            finished: Arc::new(AtomicUsize::new(0)),
            seen: Arc::new(std::sync::Mutex::new(None)),
        };
        (service, tx)
    }

    fn request(method: &str, path: &str) -> http::Request<()> {
        http::Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
    }

    /// Polls `f` once: `Some` if it was ready.
    async fn poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut f).poll(cx) {
                Poll::Ready(v) => Some(v),
                Poll::Pending => None,
            })
        })
        .await
    }

    const PUT: &str = "/keyward.v1.Secrets/Put";

    #[tokio::test]
    async fn a_change_whose_caller_leaves_once_it_acts_runs_to_its_end() {
        let (service, go) = waits(true);
        let (finished, seen) = (service.finished.clone(), service.seen.clone());
        let changes = Changes::new(4);
        let mut detach = changes.detach(service, grpc_is_change);
        let mut call = Box::pin(detach.call(request("POST", PUT)));
        assert!(
            poll_once(call.as_mut()).await.is_none(),
            "the handler waits"
        );
        assert_eq!(
            changes.running(),
            0,
            "served in place while its caller waits"
        );
        let acting = seen
            .lock()
            .unwrap()
            .clone()
            .expect("a change is given the mark");
        assert!(!acting.has_left());
        drop(call); // the client went away while the handler waited
        assert_eq!(changes.running(), 1, "orphaned: runs on as its own task");
        assert!(acting.has_left(), "the call is told its client left");
        go.send(()).unwrap();
        assert!(changes.settled(Duration::from_secs(30)).await);
        assert_eq!(
            finished.load(Ordering::SeqCst),
            1,
            "the handler ran to its end"
        );
        assert_eq!(changes.dropped(), 0);
    }

    #[tokio::test]
    async fn a_change_dropped_before_it_acts_is_dropped_where_it_stands() {
        let (service, go) = waits(false);
        let finished = service.finished.clone();
        let changes = Changes::new(4);
        let mut detach = changes.detach(service, grpc_is_change);
        // Before its first poll, and after one that did not act (a login
        // waiting for a key set, a request body still arriving).
        drop(detach.call(request("POST", PUT)));
        let mut call = Box::pin(detach.call(request("POST", PUT)));
        assert!(poll_once(call.as_mut()).await.is_none());
        drop(call);
        assert_eq!(changes.running(), 0);
        assert!(go.send(()).is_err(), "its wait was dropped with it");
        assert_eq!(finished.load(Ordering::SeqCst), 0);
        assert_eq!(changes.dropped(), 0, "nothing to count: it changed nothing");
    }

    #[tokio::test]
    async fn a_read_whose_caller_leaves_is_dropped_in_place() {
        let (service, go) = waits(true);
        let (finished, seen) = (service.finished.clone(), service.seen.clone());
        let changes = Changes::new(4);
        let mut detach = changes.detach(service, grpc_is_change);
        let mut call = Box::pin(detach.call(request("POST", "/keyward.v1.Secrets/Get")));
        assert!(poll_once(call.as_mut()).await.is_none());
        assert!(seen.lock().unwrap().is_none(), "a read gets no mark");
        drop(call);
        assert_eq!(changes.running(), 0, "a read is never orphaned");
        assert!(go.send(()).is_err(), "the dropped read let go of its wait");
        assert_eq!(finished.load(Ordering::SeqCst), 0, "a dropped read stops");
    }

    #[tokio::test]
    async fn past_the_bound_an_orphaned_change_is_dropped_and_counted() {
        let (first, go_first) = waits(true);
        let (second, go_second) = waits(true);
        let changes = Changes::new(1);
        let mut a = changes.detach(first.clone(), every_request);
        let mut b = changes.detach(second.clone(), every_request);
        let mut call_a = Box::pin(a.call(request("PUT", "/v1/secret/data/a")));
        let mut call_b = Box::pin(b.call(request("DELETE", "/v1/secret/data/b")));
        assert!(poll_once(call_a.as_mut()).await.is_none());
        assert!(poll_once(call_b.as_mut()).await.is_none());
        drop(call_a);
        drop(call_b);
        assert_eq!(changes.running(), 1, "one slot: the second is not kept");
        assert_eq!((changes.orphaned(), changes.dropped()), (1, 1));
        assert!(go_second.send(()).is_err(), "the second was dropped");
        go_first.send(()).unwrap();
        assert!(changes.settled(Duration::from_secs(30)).await);
        assert_eq!(first.finished.load(Ordering::SeqCst), 1);
        assert_eq!(second.finished.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn settled_says_when_an_orphan_outlived_the_deadline_and_then_orphans_no_more() {
        let (held, _go_held) = waits(true);
        let (late, go_late) = waits(true);
        let changes = Changes::new(4);
        let mut a = changes.detach(held, grpc_is_change);
        let mut call = Box::pin(a.call(request("POST", PUT)));
        assert!(poll_once(call.as_mut()).await.is_none());
        drop(call);
        assert_eq!(changes.running(), 1);
        assert!(
            !changes.settled(Duration::from_secs(10)).await,
            "still running"
        );
        // Shutting down: a change whose client leaves now is not kept.
        let mut b = changes.detach(late, grpc_is_change);
        let mut call = Box::pin(b.call(request("POST", PUT)));
        assert!(poll_once(call.as_mut()).await.is_none());
        drop(call);
        assert_eq!(changes.dropped(), 1);
        assert!(go_late.send(()).is_err());
    }

    #[test]
    fn which_requests_are_changes() {
        let uri = |p: &str| p.parse::<http::Uri>().unwrap();
        assert!(grpc_is_change(&http::Method::POST, &uri(PUT)));
        assert!(grpc_is_change(
            &http::Method::POST,
            &uri("/keyward.v1.Auth/Login")
        ));
        assert!(!grpc_is_change(
            &http::Method::POST,
            &uri("/keyward.v1.Secrets/Get")
        ));
        assert!(!grpc_is_change(
            &http::Method::POST,
            &uri("/grpc.health.v1.Health/Check")
        ));
    }
}
