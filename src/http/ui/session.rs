//! The dashboard's sign-in sessions: a random id in a cookie, the token
//! kept on the server side only.
//!
//! An id is 32 random bytes (ring's system generator), sent to the browser
//! as 64 hex characters. The map is keyed by the SHA-256 of the id, so a
//! lookup compares digests of a secret rather than the secret itself, and a
//! dump of the map's keys gives no cookie away. The token is held in a
//! `Zeroizing` string and never printed (`Debug` says `[redacted]`).
//!
//! Bounds: a session lives [`SESSION_LIFETIME`] from sign-in (not renewed
//! by use), and never past its token's own expiry. At most
//! [`MAX_SESSIONS`] are kept; a sign-in over the bound first drops the
//! expired ones, then the oldest. Only a caller with a valid token can
//! create a session, and one token holds at most [`MAX_PER_TOKEN`]: a
//! sign-in past that ends the token's own oldest session. So a flood of
//! sign-ins with one token (or with bad ones, which make none) signs no one
//! else out; it would take [`MAX_SESSIONS`] / [`MAX_PER_TOKEN`] distinct
//! valid tokens, and even then memory stays bounded.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// How long a dashboard session lasts after sign-in.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// The most sessions kept at once.
pub const MAX_SESSIONS: usize = 1024;
/// The most sessions one token holds at once.
pub const MAX_PER_TOKEN: usize = 8;
/// The cookie's name.
pub const COOKIE: &str = "kw_ui";

struct Session {
    token: Zeroizing<String>,
    /// SHA-256 of the token, to count one token's sessions.
    token_digest: [u8; 32],
    created_ms: u64,
    expires_ms: u64,
}

/// The server-side half of the sessions.
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
    rng: SystemRandom,
    max: usize,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("count", &self.len())
            .field("tokens", &"[redacted]")
            .finish()
    }
}

impl Default for Sessions {
    fn default() -> Self {
        Self::with_bound(MAX_SESSIONS)
    }
}

fn digest(id: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Sessions {
    pub fn with_bound(max: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            rng: SystemRandom::new(),
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A new session for `token`, valid until `expires_ms`; returns the id
    /// for the cookie, or `None` if the system generator failed.
    pub fn create(&self, token: Zeroizing<String>, now_ms: u64, expires_ms: u64) -> Option<String> {
        let mut raw = Zeroizing::new([0u8; 32]);
        self.rng.fill(raw.as_mut()).ok()?;
        let id = hex::encode(raw.as_ref());
        let token_digest = digest(&token);
        let mut map = self.lock();
        // This token's own sessions first: past its share, its oldest go.
        loop {
            let own: Vec<([u8; 32], u64)> = map
                .iter()
                .filter(|(_, s)| s.token_digest == token_digest)
                .map(|(k, s)| (*k, s.created_ms))
                .collect();
            if own.len() < MAX_PER_TOKEN.min(self.max) {
                break;
            }
            match own.iter().min_by_key(|(_, at)| *at) {
                Some((k, _)) => {
                    map.remove(k);
                }
                None => break,
            }
        }
        if map.len() >= self.max {
            map.retain(|_, s| s.expires_ms > now_ms);
        }
        while map.len() >= self.max {
            let oldest = map
                .iter()
                .min_by_key(|(_, s)| s.created_ms)
                .map(|(k, _)| *k);
            match oldest {
                Some(k) => {
                    map.remove(&k);
                }
                None => break,
            }
        }
        map.insert(
            digest(&id),
            Session {
                token,
                token_digest,
                created_ms: now_ms,
                expires_ms,
            },
        );
        Some(id)
    }

    /// The token of the live session `id`; an expired one is dropped.
    pub fn token(&self, id: &str, now_ms: u64) -> Option<Zeroizing<String>> {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let key = digest(id);
        let mut map = self.lock();
        match map.get(&key) {
            Some(s) if s.expires_ms > now_ms => Some(s.token.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the session `id` (sign-out, or its token no longer works).
    pub fn remove(&self, id: &str) {
        self.lock().remove(&digest(id));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn tok(s: &str) -> Zeroizing<String> {
        Zeroizing::new(s.to_owned())
    }

    #[test]
    fn a_session_gives_its_token_until_it_expires_or_is_removed() {
        let s = Sessions::default();
        let id = s.create(tok("kwt_a"), 1_000, 2_000).unwrap();
        assert_eq!(id.len(), 64);
        assert_eq!(s.token(&id, 1_500).unwrap().as_str(), "kwt_a");
        assert!(s.token(&id, 2_000).is_none(), "expired");
        assert!(s.is_empty(), "an expired session is dropped when seen");
        let id = s.create(tok("kwt_b"), 1_000, 9_000).unwrap();
        s.remove(&id);
        assert!(s.token(&id, 1_001).is_none());
    }

    #[test]
    fn ids_are_random_and_look_alikes_find_nothing() {
        let s = Sessions::default();
        let a = s.create(tok("kwt_a"), 0, 10).unwrap();
        let b = s.create(tok("kwt_b"), 0, 10).unwrap();
        assert_ne!(a, b);
        let upper = a.to_uppercase();
        assert!(s.token(&upper, 1).is_none(), "upper-case hex is another id");
        assert!(s.token(&a[..63], 1).is_none());
        assert!(s.token("", 1).is_none());
        assert!(s.token(&"0".repeat(64), 1).is_none());
    }

    #[test]
    fn the_map_is_bounded_expired_first_then_oldest() {
        let s = Sessions::with_bound(3);
        let old = s.create(tok("1"), 1, 5).unwrap();
        let a = s.create(tok("2"), 2, 100).unwrap();
        let b = s.create(tok("3"), 3, 100).unwrap();
        // Full: the expired one goes first.
        let c = s.create(tok("4"), 10, 100).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.token(&old, 10).is_none());
        // Full again, none expired: the oldest (a) goes.
        let d = s.create(tok("5"), 11, 100).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.token(&a, 12).is_none());
        for id in [&b, &c, &d] {
            assert!(s.token(id, 12).is_some());
        }
    }

    #[test]
    fn one_token_floods_only_its_own_sessions() {
        let s = Sessions::with_bound(MAX_PER_TOKEN * 4);
        let victim = s.create(tok("kwt_victim"), 0, 1_000).unwrap();
        let mut mine = Vec::new();
        for t in 1..=(MAX_PER_TOKEN as u64 * 10) {
            mine.push(s.create(tok("kwt_attacker"), t, 1_000).unwrap());
        }
        assert_eq!(s.len(), MAX_PER_TOKEN + 1);
        assert_eq!(s.token(&victim, 999).unwrap().as_str(), "kwt_victim");
        for (i, id) in mine.iter().enumerate() {
            let live = s.token(id, 999).is_some();
            assert_eq!(live, i >= mine.len() - MAX_PER_TOKEN, "session {i}");
        }
    }

    #[test]
    fn debug_shows_no_token() {
        let s = Sessions::default();
        s.create(tok("kwt_secret_value"), 0, 10).unwrap();
        let text = format!("{s:?}");
        assert!(!text.contains("kwt_secret_value"), "{text}");
    }
}
