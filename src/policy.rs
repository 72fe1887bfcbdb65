//! Which app a caller is: the operator's `[[app]]` rules, evaluated in file order, first match
//! wins, and a caller that matches nothing gets nothing.

use crate::config::App;
use crate::identity::Caller;

/// The `match` table of one app. Every criterion that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    pub uid: Option<u32>,
}

impl Matcher {
    pub fn is_empty(&self) -> bool {
        self.uid.is_none()
    }

    pub fn matches(&self, caller: &Caller) -> bool {
        // Deny by default: a matcher with no criterion matches nobody, and only local callers
        // have a uid at all.
        if self.is_empty() {
            return false;
        }
        self.uid.is_none_or(|want| caller.uid() == Some(want))
    }
}

impl std::fmt::Display for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.uid {
            Some(uid) => write!(f, "uid={uid}"),
            None => f.write_str("(nothing)"),
        }
    }
}

/// The first app whose rule matches `caller`, if any.
pub fn find_app<'a>(apps: &'a [App], caller: &Caller) -> Option<&'a App> {
    apps.iter().find(|app| app.matcher.matches(caller))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(uid: u32) -> Caller {
        Caller::Local {
            uid,
            peer: "127.0.0.1:5000".parse().unwrap(),
        }
    }

    #[test]
    fn uid_rule_matches_only_that_uid() {
        let m = Matcher { uid: Some(1000) };
        assert!(m.matches(&local(1000)));
        assert!(!m.matches(&local(1001)));
        assert!(!m.matches(&Caller::Remote {
            peer: "10.0.0.1:1".parse().unwrap()
        }));
    }

    #[test]
    fn empty_matcher_matches_nobody() {
        assert!(!Matcher::default().matches(&local(0)));
    }
}
