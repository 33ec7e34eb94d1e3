//! Role-ids and secret-ids: random text. A secret-id is `kws_` + 43 base64url
//! characters (256 random bits), so secret scanners can recognise a leaked
//! one; it lives in a zeroized buffer and its `Debug` is redacted.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::IdentityError;

pub const SECRET_ID_PREFIX: &str = "kws_";
const SECRET_ID_BODY: usize = 43;

fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>, IdentityError> {
    let mut bytes = Zeroizing::new([0u8; N]);
    SystemRandom::new()
        .fill(&mut bytes[..])
        .map_err(|_| IdentityError::Invalid("the system random source failed".into()))?;
    Ok(bytes)
}

/// A new role-id: 128 random bits as 32 hex characters. Not a secret on its
/// own (the secret-id is), but not guessable either.
pub(crate) fn new_role_id() -> Result<String, IdentityError> {
    Ok(hex::encode(&random::<16>()?[..]))
}

/// The text of a secret-id.
pub struct SecretIdText(Zeroizing<String>);

impl SecretIdText {
    pub fn generate() -> Result<Self, IdentityError> {
        let bytes = random::<32>()?;
        let mut text = Zeroizing::new(String::with_capacity(48));
        text.push_str(SECRET_ID_PREFIX);
        text.push_str(&Zeroizing::new(URL_SAFE_NO_PAD.encode(&bytes[..])));
        Ok(Self(text))
    }

    /// Accepts the shape only (prefix, length, alphabet); whether it exists
    /// is for the store to say.
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let ok = text.strip_prefix(SECRET_ID_PREFIX).is_some_and(|body| {
            body.len() == SECRET_ID_BODY
                && body
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
        if ok {
            Ok(Self(Zeroizing::new(text.to_owned())))
        } else {
            Err(IdentityError::Invalid("not a secret-id".into()))
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretIdText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretIdText([redacted])")
    }
}
