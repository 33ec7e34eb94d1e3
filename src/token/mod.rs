//! Tokens: the bearer credentials keyward hands out.
//!
//! - `format`: the `kwt_` text format (pure: no storage, no clock).
//! - `store`: the token store under the `tokens/` prefix.
//! - `cache`: tokens already verified, so a use skips storage (no prefix).

pub mod cache;
pub mod format;
pub mod store;

pub use store::{
    Delegation, IssuedToken, LongLived, PolicyNames, RevokeListener, SweepOutcome, TokenError,
    TokenInfo, TokenRecord, TokenRequest, TokenStore, TokenUse,
};
