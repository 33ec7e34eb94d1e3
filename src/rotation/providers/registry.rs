//! The registry: providers by name, the built-in ones and the external
//! ones an operator registered (`keyward provider register`). The broker
//! keeps one and looks a provider up in it at every step; a policy is
//! checked against it when set. No storage: the broker persists the
//! registrations (`rotation/provider/<name>`).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::rotation::provider::Provider;

/// Errors of [`Registry::register`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("a provider named `{0}` is already registered")]
    NameTaken(String),
    #[error("a provider name must be 1 to 64 characters of [a-z0-9_-] starting with a letter")]
    InvalidName,
}

/// Providers by name.
#[derive(Clone, Default)]
pub struct Registry {
    providers: BTreeMap<String, Arc<dyn Provider>>,
}

impl Registry {
    /// A registry with no provider.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry with the built-in providers: `random`, `postgres`, `mysql`
    /// and `redis`.
    pub fn with_builtin() -> Self {
        let builtin: [Arc<dyn Provider>; 4] = [
            Arc::new(super::RandomProvider::new()),
            Arc::new(super::PostgresProvider::default()),
            Arc::new(super::MysqlProvider::default()),
            Arc::new(super::RedisProvider::default()),
        ];
        let providers = builtin
            .into_iter()
            .map(|p| (p.name().to_owned(), p))
            .collect();
        Self { providers }
    }

    /// Adds a provider under its own name; a name already taken (a built-in
    /// one included) is refused.
    pub fn register(&mut self, provider: Arc<dyn Provider>) -> Result<(), RegistryError> {
        let name = provider.name();
        Self::check_name(name)?;
        if self.providers.contains_key(name) {
            return Err(RegistryError::NameTaken(name.to_owned()));
        }
        self.providers.insert(name.to_owned(), provider);
        Ok(())
    }

    /// Refuses a name that is not 1 to 64 characters of `[a-z0-9_-]`
    /// starting with a letter; checked before anything is registered.
    pub fn check_name(name: &str) -> Result<(), RegistryError> {
        let well_formed = !name.is_empty()
            && name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
        if well_formed {
            Ok(())
        } else {
            Err(RegistryError::InvalidName)
        }
    }

    /// The provider named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Provider>> {
        self.providers.get(name).cloned()
    }

    /// The registered names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.providers.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_refuses_a_taken_name() {
        let mut registry = Registry::with_builtin();
        let names: Vec<_> = registry.names().collect();
        assert_eq!(names, ["mysql", "postgres", "random", "redis"]);
        let again = Arc::new(super::super::RandomProvider::new());
        assert_eq!(
            registry.register(again),
            Err(RegistryError::NameTaken("random".into()))
        );
    }
}
