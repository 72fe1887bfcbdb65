//! Drop-in files (`[server] include`, default `apps.d/*.toml` beside the config file): one
//! `[[app]]` file per package or configuration-management role. They are read after the main
//! file in lexical order, each checked like it (nobody but root or the daemon's user may
//! write it, nor the directory it is in), and their apps follow the main file's in rule
//! order, with names unique across all files.

use std::path::{Path, PathBuf};

use super::app::AppDefaults;
use super::load::check_permissions;
use super::raw::RawDropIn;
use super::validate::Validator;
use super::{Config, ConfigError};
use crate::glob::Glob;

/// Why `pattern` cannot be an include glob, if it cannot: only its last component may have
/// wildcards, and it must name files (`dir/*.toml`), not walk trees.
pub(super) fn pattern_problem(pattern: &str) -> Option<&'static str> {
    let (dir, file) = split(pattern);
    if file.is_empty() {
        Some("must end in a file name or glob, e.g. \"apps.d/*.toml\"")
    } else if dir.contains(['*', '?']) || file.contains("**") {
        Some("only the file name may have wildcards (* and ?), e.g. \"apps.d/*.toml\"")
    } else {
        None
    }
}

fn split(pattern: &str) -> (&str, &str) {
    match pattern.rsplit_once('/') {
        Some((dir, file)) => (if dir.is_empty() { "/" } else { dir }, file),
        None => (".", pattern),
    }
}

/// The drop-in files `patterns` name, relative to `base`: existing regular files, each once,
/// in lexical order of their paths. A directory that does not exist names none; one that
/// others may write is refused, since whoever can add a file there adds an app.
pub(super) fn files(base: &Path, patterns: &[String]) -> Result<Vec<PathBuf>, ConfigError> {
    let mut found = Vec::new();
    for pattern in patterns {
        let (dir, file) = split(pattern);
        let dir = base.join(dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(ConfigError::Read { path: dir, source }),
        };
        check_permissions(&dir)?;
        let glob = Glob::new(file);
        for entry in entries {
            let entry = entry.map_err(|source| ConfigError::Read {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // Editors' and package managers' leftovers are not config.
            if name.starts_with('.') || !glob.matches(name) {
                continue;
            }
            let path = entry.path();
            if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) && !found.contains(&path) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

impl Config {
    /// Adds the apps of the drop-in files to this config, read from the main file at
    /// `self.path`; every problem in any of them makes the whole set invalid.
    pub(super) fn add_drop_ins(&mut self) -> Result<(), ConfigError> {
        let base = self.path.parent().unwrap_or(Path::new(".")).to_owned();
        let mut problems = Vec::new();
        for file in files(&base, &self.server.include)? {
            check_permissions(&file)?;
            let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
                path: file.clone(),
                source,
            })?;
            let mut v = Validator {
                text: &text,
                path: &file,
                problems: Vec::new(),
                warnings: Vec::new(),
            };
            match toml::from_str::<RawDropIn>(&text) {
                Ok(raw) => {
                    for (i, raw_app) in raw.apps.into_iter().enumerate() {
                        let defaults = AppDefaults {
                            sts: &self.sts,
                            policy: self.credentials,
                            hostname: &self.instance.hostname,
                            container: self.container.as_ref(),
                            containers: self.containers.is_some(),
                            chained: self.source.is_role_session(),
                        };
                        if let Some(app) = v.app(i, raw_app, defaults, &self.apps) {
                            self.apps.push(app);
                        }
                    }
                }
                Err(e) => {
                    let span = e.span().unwrap_or(0..0);
                    v.push(span, "(file)", e.message().trim_end());
                }
            }
            problems.append(&mut v.problems);
            self.warnings.append(&mut v.warnings);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_file_name_may_be_a_glob() {
        assert_eq!(pattern_problem("apps.d/*.toml"), None);
        assert_eq!(pattern_problem("/etc/imds-broker/apps.d/*.toml"), None);
        assert_eq!(pattern_problem("extra.toml"), None);
        assert!(pattern_problem("apps.d/").is_some());
        assert!(pattern_problem("*/x.toml").is_some());
        assert!(pattern_problem("apps.d/**").is_some());
    }
}
