//! IAM wildcard matching: `*` matches any run of characters (none included) and `?` exactly
//! one, across `:` and `/` alike, unlike the path globs of `[[app]] match`. Actions compare
//! case-insensitively, resources (ARNs) case-sensitively, as IAM does.

/// Whether the action pattern `pattern` (e.g. `s3:Get*`) matches `action` (e.g. `s3:GetObject`).
pub fn action_matches(pattern: &str, action: &str) -> bool {
    wildcard_matches(pattern, action, true)
}

/// Whether the resource pattern `pattern` (an ARN with wildcards, or `*`) matches `resource`.
pub fn resource_matches(pattern: &str, resource: &str) -> bool {
    wildcard_matches(pattern, resource, false)
}

/// Whether `s` has an IAM wildcard in it.
pub fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// Whether `s` uses a policy variable (`${aws:username}`), which only IAM can resolve.
pub fn has_variable(s: &str) -> bool {
    s.contains("${")
}

/// Greedy matching with one backtrack point (the last `*`): linear in practice, and never
/// worse than the product of the two lengths.
fn wildcard_matches(pattern: &str, text: &str, ignore_case: bool) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let same = |a: char, b: char| {
        if ignore_case {
            a.to_lowercase().eq(b.to_lowercase())
        } else {
            a == b
        }
    };
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || same(p[pi], t[ti])) {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            // Let the last `*` swallow one more character and retry from there.
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_and_question_marks_cross_separators() {
        assert!(resource_matches("arn:aws:s3:::b/*", "arn:aws:s3:::b/x/y/z"));
        assert!(resource_matches("arn:aws:s3:::*", "arn:aws:s3:::b/key"));
        assert!(resource_matches("arn:aws:s3:::b/a?c", "arn:aws:s3:::b/a/c"));
        assert!(!resource_matches("arn:aws:s3:::b/a?c", "arn:aws:s3:::b/ac"));
        assert!(resource_matches("*a*b*", "xxaxxbxx"));
        assert!(!resource_matches("*a*b", "xxaxxbxxc"));
        assert!(resource_matches("", ""));
        assert!(!resource_matches("", "x"));
        assert!(resource_matches("***", ""));
    }

    #[test]
    fn case_rules() {
        assert!(action_matches("S3:getobject", "s3:GetObject"));
        assert!(action_matches("s3:get*", "s3:GetObject"));
        assert!(!resource_matches("arn:aws:s3:::B/*", "arn:aws:s3:::b/k"));
    }
}
