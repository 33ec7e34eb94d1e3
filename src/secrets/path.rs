//! `SecretPath` and the limits on a version's data: parsed once at the edge,
//! so the rest of the module never sees an invalid path or oversize value.

use crate::secrecy::SecretData;

/// Most segments a path may have.
pub const MAX_SEGMENTS: usize = 32;
/// Most bytes a path may have.
pub const MAX_PATH_BYTES: usize = 512;
/// Most bytes a field name may have.
pub const MAX_FIELD_NAME_BYTES: usize = 128;

/// Why a path or a version's data was refused; each variant names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("path must not be empty")]
    EmptyPath,
    #[error("path must be at most {MAX_PATH_BYTES} bytes")]
    PathTooLong,
    #[error("path must have at most {MAX_SEGMENTS} segments")]
    TooManySegments,
    #[error("path must not start or end with '/'")]
    EdgeSlash,
    #[error("path segment {0} is empty, '.' or '..'")]
    BadSegment(usize),
    #[error("path segment {0} has a character outside [A-Za-z0-9._-]")]
    BadCharacter(usize),
    #[error("a version must have at least one field")]
    NoFields,
    #[error("a version may have at most {0} fields")]
    TooManyFields(usize),
    #[error("a version may hold at most {0} bytes in all")]
    TooLarge(usize),
    #[error("field names must be 1 to {MAX_FIELD_NAME_BYTES} characters of [A-Za-z0-9._-]")]
    BadFieldName,
    #[error("max_versions must be between 1 and {0}")]
    BadMaxVersions(u32),
    #[error("stage must be one of current, previous, pending")]
    BadStage,
    #[error("version must be 1 or more")]
    BadVersion,
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// A valid secret path: 1 to 32 segments of `[A-Za-z0-9._-]` joined by `/`,
/// at most 512 bytes, no empty, `.` or `..` segment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretPath(String);

impl SecretPath {
    pub fn parse(text: &str) -> Result<Self, InputError> {
        if text.is_empty() {
            return Err(InputError::EmptyPath);
        }
        if text.len() > MAX_PATH_BYTES {
            return Err(InputError::PathTooLong);
        }
        if text.starts_with('/') || text.ends_with('/') {
            return Err(InputError::EdgeSlash);
        }
        let mut count = 0;
        for (i, segment) in text.split('/').enumerate() {
            count += 1;
            if count > MAX_SEGMENTS {
                return Err(InputError::TooManySegments);
            }
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(InputError::BadSegment(i + 1));
            }
            if !segment.bytes().all(is_name_byte) {
                return Err(InputError::BadCharacter(i + 1));
            }
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path as text, without a copy.
    pub fn into_string(self) -> String {
        self.0
    }

    /// The policy resource this path is, e.g. `secret/app/db`.
    pub fn resource(&self) -> String {
        // By hand, not `format!`: this is made on every request.
        let mut resource = String::with_capacity(7 + self.0.len());
        resource.push_str("secret/");
        resource.push_str(&self.0);
        resource
    }
}

impl std::fmt::Display for SecretPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A list prefix: empty (everything) or a valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPrefix(Option<SecretPath>);

impl ListPrefix {
    pub fn parse(text: &str) -> Result<Self, InputError> {
        let trimmed = text.trim_end_matches('/');
        if trimmed.is_empty() {
            Ok(Self(None))
        } else {
            SecretPath::parse(trimmed).map(|p| Self(Some(p)))
        }
    }

    pub fn path(&self) -> Option<&SecretPath> {
        self.0.as_ref()
    }

    /// The policy resource a list of this prefix is checked against.
    pub fn resource(&self) -> String {
        match &self.0 {
            Some(p) => p.resource(),
            None => "secret".to_owned(),
        }
    }
}

/// Limits on what one version may hold; configurable per server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataLimits {
    pub max_fields: usize,
    pub max_bytes: usize,
    pub default_max_versions: u32,
    pub max_max_versions: u32,
}

impl Default for DataLimits {
    fn default() -> Self {
        Self {
            max_fields: 256,
            max_bytes: 512 * 1024,
            default_max_versions: 10,
            max_max_versions: 1000,
        }
    }
}

impl DataLimits {
    /// Checks a version's fields: count, names and total size (names and values).
    pub fn check(&self, data: &SecretData) -> Result<(), InputError> {
        if data.is_empty() {
            return Err(InputError::NoFields);
        }
        if data.len() > self.max_fields {
            return Err(InputError::TooManyFields(self.max_fields));
        }
        let mut total = 0usize;
        for (name, value) in data {
            if name.is_empty()
                || name.len() > MAX_FIELD_NAME_BYTES
                || !name.bytes().all(is_name_byte)
            {
                return Err(InputError::BadFieldName);
            }
            total = total.saturating_add(name.len()).saturating_add(value.len());
        }
        if total > self.max_bytes {
            return Err(InputError::TooLarge(self.max_bytes));
        }
        Ok(())
    }

    pub fn check_max_versions(&self, n: u32) -> Result<u32, InputError> {
        if n == 0 || n > self.max_max_versions {
            return Err(InputError::BadMaxVersions(self.max_max_versions));
        }
        Ok(n)
    }
}

/// A rotation stage a version can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Current,
    Previous,
    Pending,
}

impl Stage {
    pub fn parse(text: &str) -> Result<Self, InputError> {
        match text {
            "" | "current" => Ok(Self::Current),
            "previous" => Ok(Self::Previous),
            "pending" => Ok(Self::Pending),
            _ => Err(InputError::BadStage),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Current => "current",
            Self::Previous => "previous",
            Self::Pending => "pending",
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::secrecy::SecretBytes;

    #[test]
    fn paths_follow_the_rules() {
        for ok in [
            "a",
            "app/db",
            "A.b_c-d/e",
            &"x/".repeat(31).to_string().add_last(),
        ] {
            assert!(SecretPath::parse(ok).is_ok(), "{ok}");
        }
        let cases: &[(&str, InputError)] = &[
            ("", InputError::EmptyPath),
            ("/a", InputError::EdgeSlash),
            ("a/", InputError::EdgeSlash),
            ("a//b", InputError::BadSegment(2)),
            ("a/./b", InputError::BadSegment(2)),
            ("a/../b", InputError::BadSegment(2)),
            ("a/b c", InputError::BadCharacter(2)),
            ("a/é", InputError::BadCharacter(2)),
        ];
        for (text, want) in cases {
            assert_eq!(SecretPath::parse(text).unwrap_err(), *want, "{text}");
        }
        let deep = vec!["s"; 33].join("/");
        assert_eq!(
            SecretPath::parse(&deep).unwrap_err(),
            InputError::TooManySegments
        );
        let long = "a".repeat(513);
        assert_eq!(
            SecretPath::parse(&long).unwrap_err(),
            InputError::PathTooLong
        );
    }

    trait AddLast {
        fn add_last(self) -> String;
    }
    impl AddLast for String {
        fn add_last(mut self) -> String {
            self.push('z');
            self
        }
    }

    #[test]
    fn data_limits() {
        let limits = DataLimits::default();
        let mut data = SecretData::new();
        assert_eq!(limits.check(&data).unwrap_err(), InputError::NoFields);
        data.insert("password".into(), SecretBytes::from("x"));
        assert!(limits.check(&data).is_ok());
        data.insert("bad name".into(), SecretBytes::from("x"));
        assert_eq!(limits.check(&data).unwrap_err(), InputError::BadFieldName);
        let mut many = SecretData::new();
        for i in 0..257 {
            many.insert(format!("f{i}"), SecretBytes::from("v"));
        }
        assert_eq!(
            limits.check(&many).unwrap_err(),
            InputError::TooManyFields(256)
        );
        let mut big = SecretData::new();
        big.insert("blob".into(), SecretBytes::new(vec![0; 512 * 1024]));
        assert_eq!(
            limits.check(&big).unwrap_err(),
            InputError::TooLarge(512 * 1024)
        );
    }
}
