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
//! boxed: if the transport drops it after it began and before its end, the
//! box is handed to a task of its own, which runs it out. The change, its
//! durability wait and its outcome record stay one sequence, and only the
//! answer is thrown away. A change dropped before its first poll never
//! began and is simply dropped. Reads are served in place with nothing
//! added; a change pays one allocation, and a task only when orphaned.
//!
//! **Bound.** At most [`MAX_DETACHED`] orphaned changes run at once (one
//! count for the gRPC and HTTPS listeners of a server, [`Changes`]). Past
//! that an orphaned change is dropped where it stands, as before this
//! existed, so a flood of changes whose clients leave holds at most that
//! many tasks beyond what the connection and stream limits allow anyway.
//! [`Changes::settled`] lets shutdown wait for them before the audit log
//! is closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::codegen::http;
use tower::Service;

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
}

impl Changes {
    pub fn new(limit: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// Orphaned changes running now.
    pub fn running(&self) -> usize {
        self.limit - self.slots.available_permits()
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

    /// `inner`, whose changes (as `is_change` tells) run to their end;
    /// `rebody` makes the inner service's body type of a [`Received`].
    pub fn detach<S, B>(
        &self,
        inner: S,
        is_change: IsChange,
        rebody: fn(Received<B>) -> B,
    ) -> Detach<S, B> {
        Detach {
            inner,
            changes: self.clone(),
            is_change,
            rebody,
        }
    }
}

/// A gRPC request is a change when its method's class says so
/// (`core::call::class`; the path is `/package.Service/Method`).
pub fn grpc_is_change(_: &http::Method, uri: &http::Uri) -> bool {
    let method = uri.path().trim_start_matches('/');
    crate::core::call::class(method) == crate::core::call::Class::Change
}

/// An HTTPS request may change state unless its method only reads (`GET`,
/// `HEAD`, `OPTIONS`, and Vault's `LIST`). The one Vault read that makes
/// something is a `GET` of `database/creds/<role>` (a database user under
/// a lease); the path is compared as the router matches it, undecoded.
pub fn http_is_change(method: &http::Method, uri: &http::Uri) -> bool {
    match method.as_str() {
        "GET" | "HEAD" => uri.path().starts_with("/v1/database/creds/"),
        "OPTIONS" | "LIST" => false,
        _ => true,
    }
}

/// See the module documentation.
pub struct Detach<S, B> {
    inner: S,
    changes: Changes,
    is_change: IsChange,
    /// Puts a change's request body, wrapped in [`Received`], back into the
    /// body type the inner service takes.
    rebody: fn(Received<B>) -> B,
}

impl<S: Clone, B> Clone for Detach<S, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            changes: self.changes.clone(),
            is_change: self.is_change,
            rebody: self.rebody,
        }
    }
}

impl<S> tower::Layer<S> for Changes {
    type Service = Detach<S, tonic::body::Body>;

    fn layer(&self, inner: S) -> Self::Service {
        self.detach(inner, grpc_is_change, tonic::body::Body::new)
    }
}

impl<S, B> Service<http::Request<B>> for Detach<S, B>
where
    S: Service<http::Request<B>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body,
{
    type Response = S::Response;
    type Error = DetachError;
    type Future = DetachFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(detach_error)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !(self.is_change)(req.method(), req.uri()) {
            return DetachFuture::Inline {
                inner: self.inner.call(req),
            };
        }
        let whole = Arc::new(AtomicBool::new(false));
        let rebody = self.rebody;
        let req = req.map(|inner| {
            whole.store(inner.is_end_stream(), Ordering::Release);
            rebody(Received {
                inner,
                whole: whole.clone(),
            })
        });
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
                began: false,
                whole,
                slots: self.changes.slots.clone(),
                what,
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// A change's request body, which says when the client has sent all of
    /// it. Until then the handler cannot have begun (a unary gRPC handler
    /// and keyward's HTTPS handlers take the whole body first), so a change
    /// dropped before is not run on: a client that never ends its body
    /// holds no task.
    pub struct Received<B> {
        #[pin]
        inner: B,
        whole: Arc<AtomicBool>,
    }
}

impl<B: hyper::body::Body> hyper::body::Body for Received<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let whole = match &frame {
            None => true,
            Some(Ok(frame)) => frame.is_trailers() || this.inner.is_end_stream(),
            Some(Err(_)) => false,
        };
        if whole {
            this.whole.store(true, Ordering::Release);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
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

/// A change's handler, polled in place. Dropped after its first poll,
/// with its whole request received, and before its end, it is handed to a
/// task of its own that runs it out, if one of the [`Changes`] slots is
/// free (the task holds it until the end).
pub struct Orphanable<F>
where
    F: Future + Send + 'static,
{
    fut: Option<Pin<Box<F>>>,
    began: bool,
    /// Set by [`Received`].
    whole: Arc<AtomicBool>,
    slots: Arc<Semaphore>,
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
        self.began = true;
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
        if !self.began || !self.whole.load(Ordering::Acquire) {
            return; // never began, or still reading its request
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return; // over the bound: dropped where it stands
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime left to run it on
        };
        tracing::info!(
            change = %self.what,
            "a change whose client left runs to its end; its answer will not be sent"
        );
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
    use tonic::body::Body;

    use super::*;

    /// A handler that waits for `go`, then counts itself finished.
    #[derive(Clone)]
    struct Waits {
        go: Arc<tokio::sync::Mutex<Option<oneshot::Receiver<()>>>>,
        finished: Arc<AtomicUsize>,
    }

    impl Service<http::Request<Body>> for Waits {
        type Response = &'static str;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<&'static str, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            let this = self.clone();
            Box::pin(async move {
                let go = this.go.lock().await.take();
                if let Some(go) = go {
                    let _ = go.await;
                }
                this.finished.fetch_add(1, Ordering::SeqCst);
                Ok("answered")
            })
        }
    }

    fn waits() -> (Waits, oneshot::Sender<()>) {
        let (tx, rx) = oneshot::channel();
        let service = Waits {
            go: Arc::new(tokio::sync::Mutex::new(Some(rx))),
            finished: Arc::new(AtomicUsize::new(0)),
        };
        (service, tx)
    }

    /// A request whose body has all arrived.
    fn request(method: &str, path: &str) -> http::Request<Body> {
        http::Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap()
    }

    /// A body whose client never sends its end.
    struct NeverEnds;

    impl hyper::body::Body for NeverEnds {
        type Data = tonic::codegen::Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<tonic::codegen::Bytes>, tonic::Status>>>
        {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_change_whose_caller_leaves_runs_to_its_end() {
        let (service, go) = waits();
        let finished = service.finished.clone();
        let changes = Changes::new(4);
        let mut detach = changes.detach(service, grpc_is_change, Body::new);
        let mut call = Box::pin(detach.call(request("POST", "/keyward.v1.Secrets/Put")));
        assert!(
            poll_once(call.as_mut()).await.is_none(),
            "the handler waits"
        );
        assert_eq!(
            changes.running(),
            0,
            "served in place while its caller waits"
        );
        drop(call); // the client went away while the handler waited
        assert_eq!(changes.running(), 1, "orphaned: runs on as its own task");
        go.send(()).unwrap();
        assert!(changes.settled(Duration::from_secs(30)).await);
        assert_eq!(
            finished.load(Ordering::SeqCst),
            1,
            "the handler ran to its end"
        );
        assert_eq!(changes.running(), 0);
    }

    #[tokio::test]
    async fn a_change_dropped_before_it_began_does_not_run() {
        let (service, _go) = waits();
        let finished = service.finished.clone();
        let changes = Changes::new(4);
        let mut detach = changes.detach(service, grpc_is_change, Body::new);
        drop(detach.call(request("POST", "/keyward.v1.Secrets/Put")));
        assert_eq!(changes.running(), 0);
        tokio::task::yield_now().await;
        assert_eq!(finished.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_change_dropped_while_its_request_is_still_arriving_does_not_run_on() {
        let (service, go) = waits();
        let finished = service.finished.clone();
        let changes = Changes::new(4);
        let mut detach = changes.detach(service, grpc_is_change, Body::new);
        let arriving = http::Request::builder()
            .method("POST")
            .uri("/keyward.v1.Auth/Login")
            .body(Body::new(NeverEnds))
            .unwrap();
        let mut call = Box::pin(detach.call(arriving));
        assert!(poll_once(call.as_mut()).await.is_none());
        drop(call); // say, tonic's grpc-timeout ran out
        assert_eq!(
            changes.running(),
            0,
            "no task holds a request that never ends"
        );
        assert!(go.send(()).is_err(), "dropped where it stood");
        assert_eq!(finished.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_read_whose_caller_leaves_is_dropped_in_place() {
        let (service, go) = waits();
        let finished = service.finished.clone();
        let changes = Changes::new(4);
        let mut detach = changes.detach(service, grpc_is_change, Body::new);
        let mut call = Box::pin(detach.call(request("POST", "/keyward.v1.Secrets/Get")));
        assert!(poll_once(call.as_mut()).await.is_none());
        drop(call);
        assert_eq!(changes.running(), 0, "a read is never orphaned");
        assert!(go.send(()).is_err(), "the dropped read let go of its wait");
        assert_eq!(finished.load(Ordering::SeqCst), 0, "a dropped read stops");
    }

    #[tokio::test]
    async fn past_the_bound_an_orphaned_change_is_dropped_where_it_stands() {
        let (first, go_first) = waits();
        let (second, go_second) = waits();
        let changes = Changes::new(1);
        let mut a = changes.detach(first.clone(), http_is_change, Body::new);
        let mut b = changes.detach(second.clone(), http_is_change, Body::new);
        let mut call_a = Box::pin(a.call(request("PUT", "/v1/secret/data/a")));
        let mut call_b = Box::pin(b.call(request("DELETE", "/v1/secret/data/b")));
        assert!(poll_once(call_a.as_mut()).await.is_none());
        assert!(poll_once(call_b.as_mut()).await.is_none());
        drop(call_a);
        drop(call_b);
        assert_eq!(changes.running(), 1, "one slot: the second is not kept");
        assert!(go_second.send(()).is_err(), "the second was dropped");
        go_first.send(()).unwrap();
        assert!(changes.settled(Duration::from_secs(30)).await);
        assert_eq!(first.finished.load(Ordering::SeqCst), 1);
        assert_eq!(second.finished.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn which_requests_are_changes() {
        let get = http::Method::GET;
        let uri = |p: &str| p.parse::<http::Uri>().unwrap();
        assert!(grpc_is_change(
            &http::Method::POST,
            &uri("/keyward.v1.Secrets/Put")
        ));
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
        assert!(!http_is_change(&get, &uri("/v1/secret/data/a")));
        assert!(!http_is_change(
            &"LIST".parse().unwrap(),
            &uri("/v1/secret/metadata/")
        ));
        assert!(http_is_change(
            &http::Method::POST,
            &uri("/v1/secret/data/a")
        ));
        assert!(http_is_change(
            &http::Method::DELETE,
            &uri("/v1/secret/data/a")
        ));
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
}
