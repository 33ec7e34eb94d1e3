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
//! So [`Detach`] runs the handler of a change as its own task, and the
//! transport's future only waits for that task. Dropped, it leaves the task
//! to finish: the change, its durability wait and its outcome record stay
//! one sequence, and the answer is thrown away. Reads are served in place,
//! with no task and no allocation added.
//!
//! **Bound.** At most [`MAX_DETACHED`] changes run this way at once (one
//! count for the gRPC and HTTPS listeners of a server, [`Changes`]). Past
//! that a change is served in place, as before this existed, so a flood of
//! changes whose clients leave holds at most that many tasks (and their
//! request bodies) beyond what the connection limits allow anyway.
//! [`Changes::settled`] lets shutdown wait for the running ones before the
//! audit log is closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tonic::codegen::http;
use tower::Service;

/// How many changes may run as their own task at once, per server.
pub const MAX_DETACHED: usize = 1024;

/// An error of the transport's service, as tonic and hyper take it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request got no answer from [`Detach`]: the inner service's error
/// (none of keyward's routers has one), or a detached change's task that
/// ended without an answer (the runtime shutting down). A concrete type,
/// so hyper's bound on service errors holds for every lifetime.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DetachError(String);

/// Decides from the request line whether a request may change state.
pub type IsChange = fn(&http::Method, &http::Uri) -> bool;

/// The slots of detached changes, shared by a server's listeners.
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

    /// Changes running as their own task now.
    pub fn running(&self) -> usize {
        self.limit - self.slots.available_permits()
    }

    /// Waits until no detached change runs, at most `deadline`; false if
    /// some still ran then.
    pub async fn settled(&self, deadline: Duration) -> bool {
        let Ok(count) = u32::try_from(self.limit) else {
            return false;
        };
        matches!(
            tokio::time::timeout(deadline, self.slots.acquire_many(count)).await,
            Ok(Ok(_))
        )
    }

    /// `inner` with its changes (as `is_change` tells) detached.
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
    let method = uri.path().trim_start_matches('/');
    crate::core::call::class(method) == crate::core::call::Class::Change
}

/// An HTTPS request may change state unless its method only reads (`GET`,
/// `HEAD`, `OPTIONS`, and Vault's `LIST`).
pub fn http_is_change(method: &http::Method, _: &http::Uri) -> bool {
    !matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS" | "LIST")
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

    fn layer(&self, inner: S) -> Detach<S> {
        self.detach(inner, grpc_is_change)
    }
}

impl<S, B> Service<http::Request<B>> for Detach<S>
where
    S: Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = DetachError;
    type Future = DetachFuture<S::Future, S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(detach_error)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let permit = if (self.is_change)(req.method(), req.uri()) {
            self.changes.slots.clone().try_acquire_owned().ok()
        } else {
            None
        };
        let Some(permit) = permit else {
            return DetachFuture::Inline {
                inner: self.inner.call(req),
            };
        };
        // The service that was made ready is the one called (tower's rule);
        // its clone takes its place for the next request.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let task = tokio::spawn(async move {
            let answer = ready.call(req).await;
            drop(permit);
            answer
        });
        DetachFuture::Detached { task }
    }
}

fn detach_error(e: impl Into<BoxError>) -> DetachError {
    DetachError(e.into().to_string())
}

pin_project_lite::pin_project! {
    /// The answer of a request served in place, or of a detached change.
    #[project = DetachProj]
    pub enum DetachFuture<F, T, E> {
        Inline { #[pin] inner: F },
        Detached { task: JoinHandle<Result<T, E>> },
    }
}

impl<F, T, E> Future for DetachFuture<F, T, E>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, DetachError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            DetachProj::Inline { inner } => inner.poll(cx).map_err(detach_error),
            DetachProj::Detached { task } => Poll::Ready(match ready!(Pin::new(task).poll(cx)) {
                Ok(answer) => answer.map_err(detach_error),
                // The runtime is shutting down (or the handler panicked):
                // the client sees the stream reset.
                Err(e) => Err(DetachError(format!(
                    "the change's task ended without an answer: {e}"
                ))),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::oneshot;

    use super::*;

    /// A handler that waits for `go`, then counts itself finished.
    #[derive(Clone)]
    struct Waits {
        go: Arc<tokio::sync::Mutex<Option<oneshot::Receiver<()>>>>,
        finished: Arc<AtomicUsize>,
    }

    impl Service<http::Request<()>> for Waits {
        type Response = &'static str;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<&'static str, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
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

    fn request(method: &str, path: &str) -> http::Request<()> {
        http::Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn a_change_whose_caller_leaves_runs_to_its_end() {
        let (service, go) = waits();
        let finished = service.finished.clone();
        let changes = Changes::new(4);
        let mut detach = changes.detach(service, grpc_is_change);
        let call = detach.call(request("POST", "/keyward.v1.Secrets/Put"));
        assert_eq!(changes.running(), 1);
        drop(call); // the client went away while the handler waited
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
    async fn a_read_whose_caller_leaves_is_dropped_in_place() {
        let (service, go) = waits();
        let finished = service.finished.clone();
        let changes = Changes::new(4);
        let mut detach = changes.detach(service, grpc_is_change);
        let mut call = Box::pin(detach.call(request("POST", "/keyward.v1.Secrets/Get")));
        assert!(futures_poll_once(call.as_mut()).await.is_none());
        assert_eq!(changes.running(), 0, "a read takes no slot");
        drop(call);
        let _ = go.send(());
        tokio::task::yield_now().await;
        assert_eq!(finished.load(Ordering::SeqCst), 0, "a dropped read stops");
    }

    #[tokio::test]
    async fn past_the_bound_a_change_is_served_in_place() {
        let (service, go) = waits();
        let changes = Changes::new(1);
        let mut detach = changes.detach(service.clone(), http_is_change);
        let first = detach.call(request("PUT", "/v1/secret/data/a"));
        assert_eq!(changes.running(), 1);
        // The second finds no slot: it is served in place, and answers.
        let mut other = changes.detach(
            Waits {
                go: Arc::new(tokio::sync::Mutex::new(None)),
                finished: service.finished.clone(),
            },
            http_is_change,
        );
        assert_eq!(
            other
                .call(request("PUT", "/v1/secret/data/b"))
                .await
                .unwrap(),
            "answered"
        );
        assert_eq!(changes.running(), 1);
        go.send(()).unwrap();
        assert_eq!(first.await.unwrap(), "answered");
        assert!(changes.settled(Duration::from_secs(30)).await);
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
    async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut f).poll(cx) {
                Poll::Ready(v) => Some(v),
                Poll::Pending => None,
            })
        })
        .await
    }
}
