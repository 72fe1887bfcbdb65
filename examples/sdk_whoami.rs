//! Prints the caller ARN that STS reports for the credentials that aws-sdk-rust's
//! default chain resolves. The e2e suite (`tests/e2e`) runs it as different uids
//! against the broker, so only the environment decides where credentials come from.
//!
//! Exit codes: 0 and the ARN on stdout on success; 1 and the error chain on stderr
//! otherwise (the suite matches on the text to tell a credentials error apart).

use std::error::Error;
use std::process::ExitCode;

use aws_config::BehaviorVersion;

#[tokio::main]
async fn main() -> ExitCode {
    let config = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let sts = aws_sdk_sts::Client::new(&config);
    match sts.get_caller_identity().send().await {
        Ok(identity) => {
            println!("{}", identity.arn().unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(err) => {
            // The SDK's Display is terse ("dispatch failure"); print the whole chain.
            let mut message = err.to_string();
            let mut source = err.source();
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
