//! Tests: code a test runs once inside an operation, at a named point, to
//! interleave two stores (two nodes) deterministically.

use std::sync::{Mutex, PoisonError};

type Run = Box<dyn FnOnce() + Send>;

#[derive(Default)]
pub struct Hook(Mutex<Option<Run>>);

impl Hook {
    /// Runs `f` the next time the operation reaches this point.
    pub fn set(&self, f: impl FnOnce() + Send + 'static) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::new(f));
    }

    /// Runs what was set, if anything (once).
    pub fn run(&self) {
        let run = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(run) = run {
            run();
        }
    }

    /// Whether something set has not run yet.
    pub fn is_set(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
}
