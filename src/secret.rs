//! `Secret<T>`: a value that never reaches `Debug`, `Display` or logs.

use std::fmt;

/// Wraps passwords and tokens so that formatting them prints a placeholder.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The wrapped value; call sites are where secrets leave the wrapper, so keep them few.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_hides_the_value() {
        let s = super::Secret::new("hunter2".to_string());
        assert_eq!(format!("{s:?}"), "Secret(..)");
    }
}
