//! A wrapper for values that must never reach a log line, an error message or a panic.

use std::fmt;

/// Holds a secret string. `Debug` prints a placeholder and there is deliberately no `Display`,
/// so the only way to the value is an explicit [`Secret::expose`] at the one place that needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("wJalrXUtnFEMI/K7MDENG");
        let printed = format!("{s:?} {:#?}", Some(&s));
        assert!(!printed.contains("wJalr"), "{printed}");
        assert_eq!(s.expose(), "wJalrXUtnFEMI/K7MDENG");
    }
}
