//! The validator: collects every problem with its file, line and field instead of stopping
//! at the first, runs the sections in order, and holds the helpers they share.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::app::AppDefaults;
use super::raw::{RawConfig, RawDuration};
use super::{App, Config, Problem};

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) path: &'a Path,
    pub(super) problems: Vec<Problem>,
    pub(super) warnings: Vec<Problem>,
}

impl Validator<'_> {
    /// A problem in another file (a policy file) at a known position.
    pub(super) fn push_at(
        &mut self,
        at: (&Path, usize, usize),
        field: &str,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            path: at.0.to_owned(),
            line: at.1,
            column: at.2,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    pub(super) fn push(&mut self, span: Range<usize>, field: &str, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.problems.push(Problem {
            path: self.path.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// Something that does not make the file invalid but that the daemon will refuse.
    pub(super) fn warn(&mut self, span: Range<usize>, field: &str, message: impl Into<String>) {
        let before = self.problems.len();
        self.push(span, field, message);
        self.warnings.extend(self.problems.drain(before..));
    }

    pub(super) fn validate(&mut self, raw: RawConfig) -> Config {
        let server = self.server(raw.server);
        let container = self.container(raw.container, &server.listen);
        let containers = self.containers(raw.containers);
        let admin = self.admin(raw.admin, &server.state_dir);
        let audit = self.audit(raw.audit, &server.state_dir);
        let (sts, credentials) = self.sts(&raw.sts, raw.credentials);
        let source = self.source(raw.source, &sts.region);
        let instance = self.instance(raw.instance, &sts.region);
        let limits = self.limits(raw.limits);
        self.check_servable(
            raw.sts.default_duration.as_ref(),
            "sts.default_duration",
            sts.default_duration,
            credentials,
        );

        let mut apps: Vec<App> = Vec::with_capacity(raw.apps.len());
        for (i, raw_app) in raw.apps.into_iter().enumerate() {
            let defaults = AppDefaults {
                sts: &sts,
                policy: credentials,
                hostname: &instance.hostname,
                container: container.as_ref(),
                containers: containers.is_some(),
                chained: source.is_role_session(),
            };
            if let Some(app) = self.app(i, raw_app, defaults, &apps) {
                apps.push(app);
            }
        }

        Config {
            path: self.path.to_owned(),
            server,
            sts,
            credentials,
            instance,
            audit,
            admin,
            limits,
            container,
            containers,
            source,
            apps,
            warnings: std::mem::take(&mut self.warnings),
        }
    }

    /// A numeric id or a name resolved now (uid/user, gid/group); not both.
    pub(super) fn id_or_name(
        &mut self,
        id: Option<u32>,
        name: Option<Spanned<String>>,
        field: &str,
        keys: (&str, &str),
        lookup: impl Fn(&str) -> nix::Result<Option<u32>>,
    ) -> Option<u32> {
        match (id, name) {
            (Some(_), Some(name)) => {
                self.push(
                    name.span(),
                    &format!("{field}.{}", keys.1),
                    format!("give either {} or {}, not both", keys.0, keys.1),
                );
                None
            }
            (Some(id), None) => Some(id),
            (None, Some(name)) => match lookup(name.get_ref()) {
                Ok(Some(id)) => Some(id),
                Ok(None) => {
                    self.push(
                        name.span(),
                        &format!("{field}.{}", keys.1),
                        format!("no such {} {:?} on this host", keys.1, name.get_ref()),
                    );
                    None
                }
                Err(e) => {
                    self.push(
                        name.span(),
                        &format!("{field}.{}", keys.1),
                        format!("cannot look up {} {:?}: {e}", keys.1, name.get_ref()),
                    );
                    None
                }
            },
            (None, None) => None,
        }
    }

    pub(super) fn positive(
        &mut self,
        raw: Option<&Spanned<u32>>,
        field: &str,
        default: u32,
    ) -> u32 {
        match raw {
            None => default,
            Some(v) if *v.get_ref() == 0 => {
                self.push(v.span(), field, "must be at least 1");
                default
            }
            Some(v) => *v.get_ref(),
        }
    }

    pub(super) fn duration(
        &mut self,
        raw: Option<&Spanned<RawDuration>>,
        field: &str,
        default: Duration,
    ) -> Duration {
        let Some(raw) = raw else { return default };
        match raw.get_ref() {
            RawDuration::Seconds(s) => Duration::from_secs(*s),
            RawDuration::Human(h) => match humantime::parse_duration(h) {
                Ok(d) => d,
                Err(e) => {
                    self.push(
                        raw.span(),
                        field,
                        format!(
                            "{h:?} is not a duration ({e}); use seconds or e.g. \"1h\", \"45m\""
                        ),
                    );
                    default
                }
            },
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let text = "a\nbc\nd";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 3), (2, 2));
        assert_eq!(line_col(text, 5), (3, 1));
    }
}
