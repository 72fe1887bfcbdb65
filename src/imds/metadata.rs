//! The metadata tree as one caller sees it: instance facts for everyone, and the `iam/` subtree
//! only for a caller that maps to an app, exactly as on an instance with or without a profile.

use crate::time::imds_time;
use std::net::IpAddr;
use std::time::SystemTime;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{App, InstanceInfo};

/// What a path resolves to.
#[derive(Debug, PartialEq, Eq)]
pub enum Node {
    /// A directory: entries one per line, subtrees suffixed `/`, no trailing newline.
    Dir(Vec<String>),
    Text(String),
    /// Role credentials; rendered by the caller after the (async) cache lookup.
    Credentials,
}

/// Everything the tree depends on for one request.
pub struct View<'a> {
    pub instance: &'a InstanceInfo,
    pub app: Option<&'a App>,
    pub started_at: SystemTime,
    pub local_ip: IpAddr,
}

/// Splits the part of a path below a tree root into segments. `""` and `"/"` are the root; one
/// trailing `/` is accepted on any node (botocore asks for `placement/availability-zone/`); an
/// empty segment elsewhere is not a path.
pub fn segments(rest: &str) -> Option<Vec<&str>> {
    let rest = match rest {
        "" => return Some(Vec::new()),
        r => r.strip_prefix('/')?,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Some(Vec::new());
    }
    let parts: Vec<&str> = rest.split('/').collect();
    parts.iter().all(|p| !p.is_empty()).then_some(parts)
}

fn dir(entries: &[&str]) -> Node {
    Node::Dir(entries.iter().map(|e| (*e).to_owned()).collect())
}

/// Resolves `/latest/meta-data/<segments>`.
pub fn meta_data(view: &View<'_>, path: &[&str]) -> Option<Node> {
    let i = view.instance;
    let node = match path {
        [] => {
            let mut entries = vec![
                "ami-id",
                "hostname",
                "iam/",
                "instance-id",
                "instance-type",
                "local-hostname",
                "local-ipv4",
                "placement/",
            ];
            if view.app.is_none() {
                entries.retain(|e| *e != "iam/");
            }
            dir(&entries)
        }
        ["ami-id"] => Node::Text(i.ami_id.clone()),
        ["hostname"] | ["local-hostname"] => Node::Text(i.hostname.clone()),
        ["instance-id"] => Node::Text(i.instance_id.clone()),
        ["instance-type"] => Node::Text(i.instance_type.clone()),
        ["local-ipv4"] => Node::Text(view.local_ip.to_string()),
        ["placement"] => dir(&["availability-zone", "region"]),
        ["placement", "availability-zone"] => Node::Text(i.availability_zone.clone()),
        ["placement", "region"] => Node::Text(i.region.clone()),
        ["iam", rest @ ..] => return iam(view.app?, view.started_at, rest),
        _ => return None,
    };
    Some(node)
}

fn iam(app: &App, started_at: SystemTime, path: &[&str]) -> Option<Node> {
    let role = app.role_arn().role_name();
    let node = match path {
        [] => dir(&["info", "security-credentials/"]),
        ["info"] => Node::Text(instance_profile_info(app, started_at)),
        ["security-credentials" | "security-credentials-extended"] => {
            Node::Dir(vec![role.to_owned()])
        }
        [
            "security-credentials" | "security-credentials-extended",
            name,
        ] if *name == role => Node::Credentials,
        _ => return None,
    };
    Some(node)
}

/// Resolves `/latest/dynamic/<segments>`.
pub fn dynamic(view: &View<'_>, path: &[&str]) -> Option<Node> {
    match path {
        [] => Some(dir(&["instance-identity/"])),
        ["instance-identity"] => Some(dir(&["document"])),
        ["instance-identity", "document"] => Some(Node::Text(identity_document(view))),
        _ => None,
    }
}

fn instance_profile_info(app: &App, started_at: SystemTime) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Info {
        code: &'static str,
        last_updated: String,
        instance_profile_arn: String,
        instance_profile_id: String,
    }
    let digest = Sha256::digest(format!("{}|{}", app.name, app.role_arn()));
    // Instance profile ids are "AIPA" plus 17 upper-case alphanumerics.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let suffix: String = digest[..17]
        .iter()
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect();
    let info = Info {
        code: "Success",
        last_updated: imds_time(started_at),
        instance_profile_arn: format!(
            "arn:{}:iam::{}:instance-profile/{}",
            app.role_arn().partition(),
            app.role_arn().account_id(),
            app.role_arn().role_name()
        ),
        instance_profile_id: format!("AIPA{suffix}"),
    };
    serde_json::to_string_pretty(&info).expect("plain struct serializes")
}

fn identity_document(view: &View<'_>) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Document<'a> {
        account_id: &'a str,
        architecture: &'static str,
        availability_zone: &'a str,
        billing_products: Option<()>,
        devpay_product_codes: Option<()>,
        marketplace_product_codes: Option<()>,
        image_id: &'a str,
        instance_id: &'a str,
        instance_type: &'a str,
        kernel_id: Option<()>,
        pending_time: String,
        private_ip: String,
        ramdisk_id: Option<()>,
        region: &'a str,
        version: &'static str,
    }
    let i = view.instance;
    let doc = Document {
        // The account is the caller's own role's; an unmapped caller learns none.
        account_id: view
            .app
            .map_or("000000000000", |a| a.role_arn().account_id()),
        architecture: match std::env::consts::ARCH {
            "aarch64" => "arm64",
            other => other,
        },
        availability_zone: &i.availability_zone,
        billing_products: None,
        devpay_product_codes: None,
        marketplace_product_codes: None,
        image_id: &i.ami_id,
        instance_id: &i.instance_id,
        instance_type: &i.instance_type,
        kernel_id: None,
        pending_time: imds_time(view.started_at),
        private_ip: view.local_ip.to_string(),
        ramdisk_id: None,
        region: &i.region,
        version: "2017-09-30",
    };
    serde_json::to_string_pretty(&doc).expect("plain struct serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_accept_one_trailing_slash_only() {
        assert_eq!(segments(""), Some(vec![]));
        assert_eq!(segments("/"), Some(vec![]));
        assert_eq!(segments("/iam/info"), Some(vec!["iam", "info"]));
        assert_eq!(segments("/iam/info/"), Some(vec!["iam", "info"]));
        assert_eq!(segments("/iam//info"), None);
        assert_eq!(segments("/iam/info//"), None);
        assert_eq!(segments("x"), None);
    }
}
