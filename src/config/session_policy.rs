//! Session policies: an app's inline `policy` or `policy_file` (read only if nobody else may
//! write it) checked as STS would, its managed `policy_arns`, and the texts `lint` reads.

use std::path::Path;

use toml::Spanned;

use super::load::check_permissions;
use super::raw::{RawApp, RawConfig, RawDropIn};
use super::{ConfigError, Problem, Validator};
use crate::iam::source::Origin;
use crate::iam::{self, SessionPolicy};

/// STS accepts at most this many managed session policies (`PolicyArns`) per AssumeRole.
pub const MAX_POLICY_ARNS: usize = 10;

/// One app's session policy text as written and where it is, for `imds-broker lint` (which
/// also reads policies the daemon would refuse, to say why).
#[derive(Debug, Clone)]
pub struct PolicyText {
    /// `app[N].policy` or `app[N].policy_file`.
    pub field: String,
    pub text: String,
    pub origin: Origin,
}

/// The session policy text of every app of the config file at `path`, and the problems met
/// reaching them (a missing or writable policy file). Nothing else is validated.
pub fn policy_texts(path: &Path) -> Result<(Vec<PolicyText>, Vec<Problem>), ConfigError> {
    let text = read(path)?;
    let raw: RawConfig = parse(&text, path)?;
    let include = raw
        .server
        .include
        .map(|list| {
            list.into_inner()
                .into_iter()
                .map(|p| p.into_inner())
                .collect()
        })
        .unwrap_or_else(|| vec![super::DEFAULT_INCLUDE.to_owned()]);
    let (mut texts, mut problems) = texts_of(&text, path, raw.apps);
    // The drop-ins' apps too, each under its own file's name.
    let base = path.parent().unwrap_or(Path::new("."));
    for file in super::include::files(base, &include)? {
        let text = read(&file)?;
        let raw: RawDropIn = parse(&text, &file)?;
        let (more, more_problems) = texts_of(&text, &file, raw.apps);
        texts.extend(more);
        problems.extend(more_problems);
    }
    Ok((texts, problems))
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let mut v = Validator {
            text,
            path,
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        v.push(e.span().unwrap_or(0..0), "(file)", e.message().trim_end());
        ConfigError::Invalid {
            problems: v.problems,
        }
    })
}

/// The session policies of `apps`, written in the file `path` with `text`.
fn texts_of(
    text: &str,
    path: &Path,
    apps: Vec<Spanned<RawApp>>,
) -> (Vec<PolicyText>, Vec<Problem>) {
    let mut v = Validator {
        text,
        path,
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    let mut texts = Vec::new();
    for (i, app) in apps.into_iter().enumerate() {
        let app = app.into_inner();
        let field = policy_field(i, app.policy.is_some(), app.policy_file.is_some());
        if let Some((text, origin)) = v.policy_text(i, app.policy, app.policy_file) {
            texts.push(PolicyText {
                field,
                text,
                origin,
            });
        }
    }
    (texts, v.problems)
}

/// The field a session policy's problems are reported under.
pub(super) fn policy_field(index: usize, inline: bool, file: bool) -> String {
    if file && !inline {
        format!("app[{index}].policy_file")
    } else {
        format!("app[{index}].policy")
    }
}

impl Validator<'_> {
    /// The app's session policy text and where it is: inline `policy`, or `policy_file`
    /// (relative to the config file's directory, refused if others may write it).
    pub(super) fn policy_text(
        &mut self,
        index: usize,
        policy: Option<Spanned<String>>,
        policy_file: Option<Spanned<String>>,
    ) -> Option<(String, Origin)> {
        match (policy, policy_file) {
            (None, None) => None,
            (Some(_), Some(file)) => {
                self.push(
                    file.span(),
                    &format!("app[{index}].policy_file"),
                    "give either policy or policy_file, not both",
                );
                None
            }
            (Some(inline), None) => Some((
                inline.get_ref().clone(),
                Origin::toml_string(self.path, self.text, inline.span().start),
            )),
            (None, Some(file)) => {
                let field = format!("app[{index}].policy_file");
                let dir = self.path.parent().unwrap_or(Path::new("."));
                let path = dir.join(file.get_ref());
                // Whoever can write the policy decides what the app may do, as with the config.
                let read = check_permissions(&path).and_then(|()| {
                    std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                        path: path.clone(),
                        source,
                    })
                });
                match read {
                    Ok(text) => Some((text, Origin::file(&path))),
                    Err(e) => {
                        self.push(file.span(), &field, e.to_string());
                        None
                    }
                }
            }
        }
    }

    /// A policy STS will accept (JSON, IAM grammar, size); problems name the policy's own line.
    pub(super) fn session_policy(
        &mut self,
        field: &str,
        text: String,
        origin: Origin,
    ) -> Option<SessionPolicy> {
        match SessionPolicy::new(text.clone(), origin.clone()) {
            Ok(policy) => Some(policy),
            Err(e) => {
                let (line, column) = origin.locate(&text, e.offset);
                self.push_at((&origin.path, line, column), field, e.message);
                None
            }
        }
    }

    pub(super) fn policy_arns(
        &mut self,
        raw: Option<Spanned<Vec<Spanned<String>>>>,
        field: &str,
    ) -> Vec<String> {
        let Some(list) = raw else { return Vec::new() };
        if list.get_ref().len() > MAX_POLICY_ARNS {
            self.push(
                list.span(),
                field,
                format!("at most {MAX_POLICY_ARNS} managed session policies (STS limit)"),
            );
        }
        let mut arns = Vec::new();
        for arn in list.into_inner() {
            if !iam::is_policy_arn(arn.get_ref()) {
                self.push(
                    arn.span(),
                    field,
                    format!(
                        "{:?} is not a managed policy ARN (arn:aws:iam::aws:policy/NAME or arn:aws:iam::123456789012:policy/[PATH/]NAME)",
                        arn.get_ref()
                    ),
                );
            }
            arns.push(arn.into_inner());
        }
        arns
    }
}
