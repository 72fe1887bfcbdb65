//! `imds-broker check`: validates a config file and prints what it sets up, with warnings
//! about rules that are shadowed or reach further than they seem.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
use crate::policy;

/// This host as `check` judges the rules against it: its addresses in this network namespace
/// and its cgroup subtrees that someone other than root controls.
fn host_view() -> policy::HostView {
    policy::HostView {
        addresses: crate::identity::host_addresses(),
        foreign_subtrees: crate::identity::cgroup::CgroupIndex::new().foreign_subtrees(),
    }
}

pub(super) fn check(path: PathBuf) -> ExitCode {
    match Config::load(&path) {
        Ok(config) => {
            outln!("{}: OK, {} app(s)", path.display(), config.apps.len());
            for warning in &config.warnings {
                outln!("warning: {warning}");
            }
            for (i, j) in policy::shadowed(&config.apps) {
                outln!(
                    "warning: app[{j}] {:?} is shadowed by app[{i}] {:?}: every caller it matches is matched earlier",
                    config.apps[j].name,
                    config.apps[i].name
                );
            }
            for warning in policy::rule_warnings(&config.apps, &host_view()) {
                outln!("{warning}");
            }
            for app in &config.apps {
                outln!(
                    "  {}: {} -> {} ({}s, session {})",
                    app.name,
                    app.matcher
                        .as_ref()
                        .map_or_else(|| "container endpoint only".into(), |m| m.to_string()),
                    app.role_arn(),
                    app.assume_role_input().duration.as_secs(),
                    app.assume_role_input().session_name
                );
                if app.source != config.path {
                    outln!("    from {}", app.source.display());
                }
                if let Some(c) = &app.container {
                    outln!(
                        "    container endpoint: token {} (owner {}:{}, 0400)",
                        c.token_file.display(),
                        c.uid,
                        c.gid
                    );
                }
            }
            if let Some(c) = &config.containers {
                let sockets: Vec<String> = c
                    .runtime_sockets
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                outln!(
                    "containers: callers in other network namespaces identified; runtime API at {}",
                    sockets.join(" or ")
                );
                let asks_runtime = config.apps.iter().any(|a| {
                    a.matcher
                        .as_ref()
                        .is_some_and(policy::Matcher::needs_runtime)
                });
                if asks_runtime && !c.runtime_sockets.iter().any(|p| p.exists()) {
                    outln!(
                        "warning: containers: no runtime socket exists here ({}): callers in containers that a container_label, container_image or container_name rule decides are refused",
                        sockets.join(", ")
                    );
                }
            }
            if !matches!(config.source, crate::config::SourceConfig::Chain) {
                // The files themselves: readable, private, a key that matches its certificate.
                match crate::source::Source::load(&config.source) {
                    Ok(own) => {
                        let status = own.status(std::time::SystemTime::now());
                        let mut line = format!("source: {}", status.kind);
                        if let Some(c) = &status.certificate {
                            line.push_str(&format!(
                                ", certificate serial {} ({}), not after {}",
                                c.serial,
                                c.subject_cn.as_deref().unwrap_or("no CN"),
                                c.not_after
                            ));
                            if c.expires_in_secs <= 0 {
                                line.push_str(" (EXPIRED)");
                            }
                        }
                        if let Some(key) = &status.access_key_id {
                            line.push_str(&format!(", key {key}"));
                        }
                        outln!("{line}");
                        if config.source.is_role_session() {
                            outln!(
                                "  role chaining: apps' sessions last at most 1h, and carry no SourceIdentity of their own (the Roles Anywhere session's, the certificate's CN, stays); the app is in the session name and the imds-broker:app tag"
                            );
                        }
                    }
                    Err(e) => {
                        eprintln!("{}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
            }
            if let Some(c) = &config.container {
                let listen: Vec<String> = c.listen.iter().map(|a| a.to_string()).collect();
                outln!(
                    "container endpoint on {}, tokens rotated every {}",
                    listen.join(", "),
                    humantime::format_duration(c.rotate_every)
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
