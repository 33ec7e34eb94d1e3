//! Tokens: the bearer credentials keyward hands out.
//!
//! Only the text format lives here so far (pure: no storage, no clock); the
//! token store, under its own `tokens/` prefix, comes later.

pub mod format;
