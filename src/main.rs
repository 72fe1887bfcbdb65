use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    imds_broker::cli::main().await
}
