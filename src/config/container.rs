//! The container credentials endpoint's settings: `[container]` (where it listens, where token
//! files go, how often they rotate) and each app's `[app.container]` (who may read its token).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::Matcher;
use super::Validator;
use super::raw::{RawAppContainer, RawContainer};
use crate::safe_dir::SafeDir;

/// The address EKS Pod Identity uses; every SDK's plain-HTTP allow-list has it.
pub const DEFAULT_CONTAINER_LISTEN: &str = "169.254.170.23:80";
/// Outside the state directory (0700): app users must be able to reach their own file.
pub const DEFAULT_TOKEN_DIR: &str = "/run/imds-broker-tokens";
pub const DEFAULT_ROTATE_EVERY: Duration = Duration::from_secs(60 * 60);
/// How long a token replaced on schedule is still accepted: SDKs read the token file on every
/// fetch, so this only covers a fetch that read the file just before it was replaced.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
const MIN_ROTATE_EVERY: Duration = Duration::from_secs(60);
const MAX_ROTATE_EVERY: Duration = Duration::from_secs(30 * 24 * 60 * 60);
const MAX_GRACE: Duration = Duration::from_secs(60 * 60);

/// `[container]`: present only when the endpoint is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerConfig {
    pub listen: Vec<SocketAddr>,
    /// Where token files go unless an app names its own `token_file`.
    pub token_dir: PathBuf,
    pub rotate_every: Duration,
    pub grace: Duration,
}

/// `[app.container]`: the app's token file and who may read it (mode 0400, owned by `uid`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppContainer {
    pub token_file: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

impl Validator<'_> {
    pub(super) fn container(
        &mut self,
        raw: Option<Spanned<RawContainer>>,
        server_listen: &[SocketAddr],
    ) -> Option<ContainerConfig> {
        let raw = raw?;
        let section = raw.span();
        let raw = raw.into_inner();
        let mut listen = Vec::new();
        match raw.listen {
            None => listen.push(
                DEFAULT_CONTAINER_LISTEN
                    .parse()
                    .expect("constant address parses"),
            ),
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.push(
                        list.span(),
                        "container.listen",
                        "needs at least one address",
                    );
                }
                for entry in list.into_inner() {
                    match entry.get_ref().parse::<SocketAddr>() {
                        Ok(addr) if server_listen.contains(&addr) && addr.port() != 0 => self.push(
                            entry.span(),
                            "container.listen",
                            format!("{addr} is already an IMDS address (server.listen)"),
                        ),
                        Ok(addr) => listen.push(addr),
                        Err(_) => self.push(
                            entry.span(),
                            "container.listen",
                            format!(
                                "{:?} is not an IP:port address (e.g. 169.254.170.23:80, 127.0.0.1:8023)",
                                entry.get_ref()
                            ),
                        ),
                    }
                }
            }
        }
        let (token_dir, token_dir_span) = match raw.token_dir {
            None => (PathBuf::from(DEFAULT_TOKEN_DIR), section),
            Some(dir) => {
                if !dir.get_ref().starts_with('/') {
                    self.push(
                        dir.span(),
                        "container.token_dir",
                        "must be an absolute path",
                    );
                }
                (PathBuf::from(dir.get_ref()), dir.span())
            }
        };
        if token_dir.is_absolute()
            && let Some(refusal) = token_dir_refusal(&token_dir)
        {
            self.warn(token_dir_span, "container.token_dir", refusal);
        }
        let rotate_every = self.duration(
            raw.rotate_every.as_ref(),
            "container.rotate_every",
            DEFAULT_ROTATE_EVERY,
        );
        if let Some(r) = &raw.rotate_every
            && !(MIN_ROTATE_EVERY..=MAX_ROTATE_EVERY).contains(&rotate_every)
        {
            self.push(
                r.span(),
                "container.rotate_every",
                "must be between 1m and 30days",
            );
        }
        let grace = self.duration(raw.grace.as_ref(), "container.grace", DEFAULT_GRACE);
        if let Some(g) = &raw.grace
            && (grace > MAX_GRACE || grace >= rotate_every)
        {
            self.push(
                g.span(),
                "container.grace",
                "must be at most 1h and shorter than container.rotate_every",
            );
        }
        Some(ContainerConfig {
            listen,
            token_dir,
            rotate_every,
            grace,
        })
    }

    /// An app's `[app.container]`. The token file's owner is `uid`/`user`, or else the uid the
    /// app's match rule pins: a token nobody in particular owns would be nobody's secret.
    pub(super) fn app_container(
        &mut self,
        field: &str,
        name: &str,
        raw: Option<Spanned<RawAppContainer>>,
        endpoint: Option<&ContainerConfig>,
        matcher: Option<&Matcher>,
    ) -> Option<AppContainer> {
        let raw = raw?;
        let span = raw.span();
        let raw = raw.into_inner();
        let before = self.problems.len();
        let Some(endpoint) = endpoint else {
            self.push(
                span,
                field,
                "the container endpoint is off: add a [container] section",
            );
            return None;
        };
        let uid = self.id_or_name(raw.uid, raw.user, field, ("uid", "user"), |name| {
            nix::unistd::User::from_name(name).map(|u| u.map(|u| u.uid.as_raw()))
        });
        let gid = self.id_or_name(raw.gid, raw.group, field, ("gid", "group"), |name| {
            nix::unistd::Group::from_name(name).map(|g| g.map(|g| g.gid.as_raw()))
        });
        let uid = uid.or_else(|| matcher.and_then(|m| m.uid));
        let Some(uid) = uid else {
            if self.problems.len() == before {
                self.push(
                    span,
                    field,
                    "needs uid or user: who may read the token file (the match rule pins no uid)",
                );
            }
            return None;
        };
        let gid = gid.unwrap_or_else(|| primary_group(uid));
        let token_file = match raw.token_file {
            None => endpoint.token_dir.join(format!("{name}.token")),
            Some(path) => {
                let file = Path::new(path.get_ref());
                if !path.get_ref().starts_with('/') || file.file_name().is_none() {
                    self.push(
                        path.span(),
                        &format!("{field}.token_file"),
                        "must be an absolute file path",
                    );
                } else if file.parent() != Some(endpoint.token_dir.as_path())
                    && let Err(refusal) = SafeDir::open_parent(file)
                {
                    // One in token_dir is covered by container.token_dir's warning.
                    self.warn(
                        path.span(),
                        &format!("{field}.token_file"),
                        refusal.to_string(),
                    );
                }
                PathBuf::from(path.into_inner())
            }
        };
        (self.problems.len() == before).then_some(AppContainer {
            token_file,
            uid,
            gid,
        })
    }
}

/// Why the daemon would not make or use `dir` as its token directory (see [`SafeDir`]), as
/// far as this process can tell: it judges ownership by its own user, not necessarily the
/// daemon's. A missing `dir` is fine (the daemon makes it) if its parent is.
fn token_dir_refusal(dir: &Path) -> Option<String> {
    match SafeDir::open(dir) {
        Ok(_) => None,
        Err(e) if e.is_not_found() => SafeDir::open(dir.parent()?).err(),
        Err(e) => Some(e),
    }
    .map(|e| e.to_string())
}

/// The user's primary group, or a group numbered like the uid when the user has no passwd entry
/// (a container's mapped uid): the file is 0400, so the group grants nothing either way.
fn primary_group(uid: u32) -> u32 {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or(uid, |u| u.gid.as_raw())
}
