//! Where a policy's text came from (a policy file, or a string in the config file), to turn a
//! position in the policy into the line and column of the file an operator edits.

use std::path::{Path, PathBuf};

/// The file a policy is in, and where in it the policy text starts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub path: PathBuf,
    /// 1-based line and column of the policy's first character in `path`.
    pub line: usize,
    pub column: usize,
}

impl Origin {
    /// A policy that is a whole file.
    pub fn file(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            line: 1,
            column: 1,
        }
    }

    /// A TOML string value starting at byte `start` of `toml_text` (its opening delimiter). A
    /// multi-line string (`'''` or `"""`) starts after the delimiter and the line break TOML trims
    /// right after it, so its lines map one to one onto the file's (exact for literal strings;
    /// escapes in basic strings may shift columns).
    pub fn toml_string(path: &Path, toml_text: &str, start: usize) -> Self {
        let rest = toml_text.get(start..).unwrap_or("");
        let mut skip = if rest.starts_with("'''") || rest.starts_with("\"\"\"") {
            3
        } else {
            1
        };
        if skip == 3 {
            if rest[3..].starts_with("\r\n") {
                skip += 2;
            } else if rest[3..].starts_with('\n') {
                skip += 1;
            }
        }
        let (line, column) = line_col(toml_text, start + skip);
        Self {
            path: path.to_owned(),
            line,
            column,
        }
    }

    /// The file position of byte `offset` of the policy `text`.
    pub fn locate(&self, text: &str, offset: usize) -> (usize, usize) {
        match line_col(text, offset) {
            (1, column) => (self.line, self.column + column - 1),
            (line, column) => (self.line + line - 1, column),
        }
    }
}

/// 1-based line and column (in bytes) of `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.len()
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_strings_map_lines_one_to_one() {
        let toml = "a = 1\npolicy = '''\n{\n  \"Version\": 1\n}'''\n";
        let start = toml.find("'''").unwrap();
        let origin = Origin::toml_string(Path::new("c.toml"), toml, start);
        assert_eq!((origin.line, origin.column), (3, 1));
        let text = "{\n  \"Version\": 1\n}";
        assert_eq!(origin.locate(text, text.find("\"V").unwrap()), (4, 3));
    }

    #[test]
    fn one_line_strings_shift_columns() {
        let toml = "policy = \"{}\"\n";
        let origin = Origin::toml_string(Path::new("c.toml"), toml, 9);
        assert_eq!((origin.line, origin.column), (1, 11));
        assert_eq!(origin.locate("{}", 1), (1, 12));
    }
}
