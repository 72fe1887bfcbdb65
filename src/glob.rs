//! Path globs for match rules: `*` and `?` stay within one `/`-separated segment, `**` crosses
//! segments. Small on purpose: operators write these by hand and must be able to predict them.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
}

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Self {
            pattern: pattern.to_owned(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether the pattern has no wildcard, i.e. matches exactly one string.
    pub fn is_literal(&self) -> bool {
        !self.pattern.contains(['*', '?'])
    }

    pub fn matches(&self, text: &str) -> bool {
        matches_from(self.pattern.as_bytes(), text.as_bytes())
    }

    /// Whether the pattern matches `dir` or some path below it: the question `check` asks
    /// about subtrees someone other than root controls. Not on any request path.
    pub fn reaches_into(&self, dir: &str) -> bool {
        self.matches(dir)
            || !viable_states(self.pattern.as_bytes(), format!("{dir}/").as_bytes()).is_empty()
    }
}

/// The pattern positions a match can be at after reading all of `text`; empty when no string
/// starting with `text` can match (any remaining pattern can be met by text yet to come).
fn viable_states(p: &[u8], text: &[u8]) -> Vec<usize> {
    // After a star, the matcher may also be just past it.
    fn closure(p: &[u8], states: &mut Vec<usize>) {
        let mut i = 0;
        while i < states.len() {
            let at = states[i];
            if p.get(at) == Some(&b'*') {
                let past = if p.get(at + 1) == Some(&b'*') {
                    at + 2
                } else {
                    at + 1
                };
                if !states.contains(&past) {
                    states.push(past);
                }
            }
            i += 1;
        }
    }
    let mut states = vec![0];
    closure(p, &mut states);
    for &c in text {
        let mut next = Vec::new();
        for &at in &states {
            let to = match p.get(at) {
                Some(b'*') if p.get(at + 1) == Some(&b'*') => Some(at),
                Some(b'*') if c != b'/' => Some(at),
                Some(b'?') if c != b'/' => Some(at + 1),
                Some(&l) if l != b'*' && l != b'?' && l == c => Some(at + 1),
                _ => None,
            };
            if let Some(to) = to.filter(|to| !next.contains(to)) {
                next.push(to);
            }
        }
        closure(p, &mut next);
        states = next;
    }
    states
}

fn matches_from(p: &[u8], t: &[u8]) -> bool {
    // Iterative matcher with backtracking to the last star; `**` may consume '/'.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize, bool)> = None; // (pattern after star, text pos, crosses '/')
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    let double = p.get(pi + 1) == Some(&b'*');
                    pi += if double { 2 } else { 1 };
                    star = Some((pi, ti, double));
                    continue;
                }
                b'?' if t[ti] != b'/' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                c if c != b'?' && c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st, crosses)) if crosses || t[st] != b'/' => {
                pi = sp;
                ti = st + 1;
                star = Some((sp, st + 1, crosses));
            }
            _ => return false,
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_stays_in_one_segment() {
        let g = Glob::new("/opt/*/bin/app");
        assert!(g.matches("/opt/billing/bin/app"));
        assert!(!g.matches("/opt/a/b/bin/app"));
        assert!(Glob::new("/usr/bin/*").matches("/usr/bin/python3"));
        assert!(!Glob::new("/usr/bin/*").matches("/usr/bin/x/python3"));
        assert!(Glob::new("*.service").matches("billing.service"));
        assert!(!Glob::new("*.service").matches("billing.scope"));
    }

    #[test]
    fn double_star_crosses_segments() {
        let g = Glob::new("/system.slice/**");
        assert!(g.matches("/system.slice/a.service/sub"));
        assert!(Glob::new("/**/billing.service").matches("/x/system.slice/billing.service"));
        assert!(!Glob::new("/**/billing.service").matches("/x/billing.scope"));
    }

    #[test]
    fn reaches_into_subtrees() {
        let user = "/user.slice/user-1000.slice/user@1000.service";
        assert!(Glob::new("/**/billing.service").reaches_into(user));
        assert!(Glob::new("/user.slice/*/*/app.slice/x.service").reaches_into(user));
        assert!(Glob::new("/user.slice/**").reaches_into(user));
        assert!(Glob::new(user).reaches_into(user));
        assert!(!Glob::new("/system.slice/*").reaches_into(user));
        assert!(!Glob::new("/system.slice/**").reaches_into(user));
        assert!(!Glob::new("/user.slice/*").reaches_into(user));
        assert!(!Glob::new("/user.slice/user-1001.slice/**").reaches_into(user));
    }

    #[test]
    fn question_mark_and_literals() {
        assert!(Glob::new("app-?").matches("app-a"));
        assert!(!Glob::new("app-?").matches("app-ab"));
        assert!(!Glob::new("a?b").matches("a/b"));
        assert!(Glob::new("/exact/path").matches("/exact/path"));
        assert!(!Glob::new("/exact/path").matches("/exact/path2"));
        assert!(Glob::new("/exact/path").is_literal());
        assert!(!Glob::new("/x/*").is_literal());
        assert!(Glob::new("*").matches(""));
        assert!(!Glob::new("a*").matches("b"));
    }
}
