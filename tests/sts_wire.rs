//! The AssumeRole request on the wire, through the real aws-sdk-sts client against a test STS
//! endpoint on loopback that records each request and answers with real STS XML: what the
//! daemon sends (role, session name, duration, SourceIdentity, session tags, signed with its
//! own source key), how it reads the answer, and how STS errors are classified.

mod common;

use std::time::{Duration, SystemTime};

use imds_broker::credentials::{AssumeRoleInput, CredentialSource, StsError, StsSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A recorded request: its head and its (form-encoded) body.
struct Recorded {
    head: String,
    body: String,
}

/// Serves `responses` in order, one per connection, and reports each request.
async fn fake_sts(responses: Vec<(u16, String)>) -> (String, mpsc::UnboundedReceiver<Recorded>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for (status, body) in responses {
            let (mut s, _) = listener.accept().await.unwrap();
            let request = read_request(&mut s).await;
            let _ = tx.send(request);
            reply(&mut s, status, &body).await;
        }
    });
    (url, rx)
}

/// One request off `s`: its head, then as much body as Content-Length says.
async fn read_request(s: &mut tokio::net::TcpStream) -> Recorded {
    let mut buf = Vec::new();
    let (head, rest) = loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break (
                String::from_utf8_lossy(&buf[..i]).into_owned(),
                buf[i + 4..].to_vec(),
            );
        }
    };
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut req_body = rest;
    while req_body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        req_body.extend_from_slice(&chunk[..n]);
    }
    Recorded {
        head,
        body: String::from_utf8(req_body).unwrap(),
    }
}

async fn reply(s: &mut tokio::net::TcpStream, status: u16, body: &str) {
    let reason = if status == 200 { "OK" } else { "Error" };
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(reply.as_bytes()).await.unwrap();
}

/// An STS stand-in that enforces what real STS does for role chaining (moto does not): the
/// caller's own credentials are a role session that already has a SourceIdentity, so an
/// AssumeRole that sends another, or asks for more than an hour, is refused.
async fn role_chaining_sts(requests: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        for _ in 0..requests {
            let (mut s, _) = listener.accept().await.unwrap();
            let request = read_request(&mut s).await;
            let form = form_decode(&request.body);
            let duration: u64 = form
                .split('&')
                .find_map(|kv| kv.strip_prefix("DurationSeconds="))
                .map_or(3600, |v| v.parse().unwrap());
            let (status, body) = if form.contains("SourceIdentity=") {
                (
                    400,
                    error(
                        "ValidationError",
                        "The source identity of a role session cannot be changed",
                    ),
                )
            } else if duration > 3600 {
                (
                    400,
                    error(
                        "ValidationError",
                        "The requested DurationSeconds exceeds the 1 hour session limit for roles assumed by role chaining.",
                    ),
                )
            } else {
                (200, OK.to_owned())
            };
            reply(&mut s, status, &body).await;
        }
    });
    url
}

fn source(url: &str) -> StsSource {
    common::sts_client(url, aws_config::BehaviorVersion::latest())
}

fn input() -> AssumeRoleInput {
    AssumeRoleInput {
        role_arn: "arn:aws:iam::111122223333:role/team/app-a".parse().unwrap(),
        session_name: "app-a@web-1".into(),
        duration: Duration::from_secs(3600),
        source_identity: Some("app-a".into()),
        tags: vec![
            ("imds-broker:app".into(), "app-a".into()),
            ("imds-broker:host".into(), "web-1".into()),
        ],
        policy: Some(POLICY.into()),
        policy_arns: vec![
            "arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess".into(),
            "arn:aws:iam::111122223333:policy/team/deny-deletes".into(),
        ],
    }
}

/// A minified session policy, as the config produces it.
const POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:PutObject","Resource":"arn:aws:s3:::b/client-a/uploads/*"}]}"#;

const OK: &str = r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <SourceIdentity>app-a</SourceIdentity>
    <AssumedRoleUser>
      <AssumedRoleId>AROAWIRETEST:app-a@web-1</AssumedRoleId>
      <Arn>arn:aws:sts::111122223333:assumed-role/app-a/app-a@web-1</Arn>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIAWIRETEST</AccessKeyId>
      <SecretAccessKey>wire-secret-key</SecretAccessKey>
      <SessionToken>wire-session-token</SessionToken>
      <Expiration>2099-01-01T00:00:00Z</Expiration>
    </Credentials>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>0</RequestId></ResponseMetadata>
</AssumeRoleResponse>"#;

fn error(code: &str, message: &str) -> String {
    format!(
        r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>0</RequestId></ErrorResponse>"#
    )
}

#[tokio::test]
async fn assume_role_sends_every_input_signed_with_the_source_key() {
    let (url, mut requests) = fake_sts(vec![(200, OK.into())]).await;
    let creds = source(&url).assume_role(input()).await.unwrap();
    assert_eq!(creds.access_key_id, "ASIAWIRETEST");
    assert_eq!(creds.secret_access_key.expose(), "wire-secret-key");
    assert_eq!(creds.session_token.expose(), "wire-session-token");
    assert_eq!(
        creds.expiration,
        SystemTime::UNIX_EPOCH + Duration::from_secs(4_070_908_800)
    );

    let r = requests.recv().await.unwrap();
    let body = r.body;
    for part in [
        "Action=AssumeRole",
        "RoleArn=arn%3Aaws%3Aiam%3A%3A111122223333%3Arole%2Fteam%2Fapp-a",
        "RoleSessionName=app-a%40web-1",
        "DurationSeconds=3600",
        "SourceIdentity=app-a",
        "Tags.member.1.Key=imds-broker%3Aapp",
        "Tags.member.1.Value=app-a",
        "Tags.member.2.Key=imds-broker%3Ahost",
        "Tags.member.2.Value=web-1",
        // The session policy, inline and managed.
        "PolicyArns.member.1.arn=arn%3Aaws%3Aiam%3A%3Aaws%3Apolicy%2FAmazonS3ReadOnlyAccess",
        "PolicyArns.member.2.arn=arn%3Aaws%3Aiam%3A%3A111122223333%3Apolicy%2Fteam%2Fdeny-deletes",
    ] {
        assert!(
            body.split('&').any(|p| p == part),
            "{part} missing from {body}"
        );
    }
    let policy = body
        .split('&')
        .find_map(|p| p.strip_prefix("Policy="))
        .expect("Policy= in the body");
    assert_eq!(form_decode(policy), POLICY);
    // SigV4 with the daemon's own source credentials.
    let auth = r
        .head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
        .unwrap();
    assert!(
        auth.contains("AWS4-HMAC-SHA256 Credential=ANOTREAL/"),
        "{auth}"
    );
}

#[tokio::test]
async fn no_session_policy_sends_no_policy_parameters() {
    let (url, mut requests) = fake_sts(vec![(200, OK.into())]).await;
    let mut plain = input();
    plain.policy = None;
    plain.policy_arns.clear();
    source(&url).assume_role(plain).await.unwrap();
    let body = requests.recv().await.unwrap().body;
    assert!(
        !body.contains("Policy=") && !body.contains("PolicyArns"),
        "{body}"
    );
}

/// `application/x-www-form-urlencoded` value decoding (`%XX`, `+`).
fn form_decode(s: &str) -> String {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn sts_errors_are_classified_for_retry_decisions() {
    let (url, mut requests) = fake_sts(vec![
        (400, error("Throttling", "Rate exceeded")),
        (
            403,
            error("AccessDenied", "not authorized to perform sts:AssumeRole"),
        ),
        (400, error("MalformedPolicyDocument", "bad policy")),
        (503, error("ServiceUnavailable", "try later")),
    ])
    .await;
    let sts = source(&url);
    let outcomes = [
        sts.assume_role(input()).await.unwrap_err(),
        sts.assume_role(input()).await.unwrap_err(),
        sts.assume_role(input()).await.unwrap_err(),
        sts.assume_role(input()).await.unwrap_err(),
    ];
    assert!(
        matches!(&outcomes[0], StsError::Throttled { code } if code == "Throttling"),
        "{:?}",
        outcomes[0]
    );
    assert!(
        matches!(&outcomes[1], StsError::Refused { code, .. } if code == "AccessDenied"),
        "{:?}",
        outcomes[1]
    );
    assert!(
        matches!(&outcomes[2], StsError::Refused { code, .. } if code == "MalformedPolicyDocument"),
        "{:?}",
        outcomes[2]
    );
    assert!(
        matches!(&outcomes[3], StsError::Unavailable(_)),
        "{:?}",
        outcomes[3]
    );
    // The SDK retries nothing itself (the cache owns retries): one request per call.
    let mut seen = 0;
    while requests.try_recv().is_ok() {
        seen += 1;
    }
    assert_eq!(seen, 4);
}

/// With `[source] kind = "roles_anywhere"`, the AssumeRole the config makes for an app is one
/// STS accepts as role chaining; the same app under the default chain would be refused there.
#[tokio::test]
async fn with_roles_anywhere_the_apps_assume_role_is_valid_role_chaining() {
    let app = "[[app]]\nname = \"app-a\"\nrole_arn = \"arn:aws:iam::111122223333:role/app-a\"\nmatch = { uid = 1001 }\nduration = \"4h\"\n";
    let section = "[source]\nkind = \"roles_anywhere\"\ncertificate = \"/c.pem\"\nprivate_key = \"/c.key\"\n\
        trust_anchor_arn = \"arn:aws:rolesanywhere:us-east-1:111122223333:trust-anchor/a1\"\n\
        profile_arn = \"arn:aws:rolesanywhere:us-east-1:111122223333:profile/p1\"\n\
        role_arn = \"arn:aws:iam::111122223333:role/imds-broker-source\"\n";
    let parse = |text: String| {
        imds_broker::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap()
    };
    let chained = parse(format!("[sts]\nregion = \"us-east-1\"\n{section}{app}"));
    let plain = parse(format!("[sts]\nregion = \"us-east-1\"\n{app}"));
    let url = role_chaining_sts(2).await;
    let sts = source(&url);
    let served = sts
        .assume_role(chained.apps[0].assume_role_input().clone())
        .await;
    assert!(served.is_ok(), "{served:?}");
    let refused = sts
        .assume_role(plain.apps[0].assume_role_input().clone())
        .await;
    assert!(
        matches!(&refused, Err(StsError::Refused { code, .. }) if code == "ValidationError"),
        "the stand-in enforces role chaining: {refused:?}"
    );
}
