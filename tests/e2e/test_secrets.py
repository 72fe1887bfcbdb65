"""The broker must never write a credential secret to its output, even at trace level."""

from harness import APP_A, CLIENTS, MAPPED_APPS, ROLE_LISTING_PATH, Callers, describe, issued_credentials, start_broker


def test_no_secret_in_broker_output_at_trace_level(built, moto_sts, client_homes, tmp_path):
    with start_broker(tmp_path, sts_endpoint=moto_sts.endpoint, rust_log="trace") as broker:
        callers = Callers(client_homes, sts_endpoint=moto_sts.endpoint, imds_endpoint=broker.endpoint)
        for app in MAPPED_APPS:
            for client in CLIENTS:
                result = callers.whoami(client, app.uid)
                assert result.returncode == 0, describe(result)
        _, served = callers.probe(APP_A.uid, ROLE_LISTING_PATH + APP_A.name)
    # The broker has stopped, so its output is complete. Moto's record of every
    # AssumeRole it answered covers whatever the clients received.
    issued = issued_credentials(moto_sts.endpoint)
    assert any(cred["session_token"] in served["body"] for cred in issued), served
    secret_values = {value for cred in issued for value in (cred["secret_access_key"], cred["session_token"])}
    output = {"stderr": broker.stderr_text(), "stdout": broker.stdout_text()}
    assert output["stderr"], "the broker logged nothing at trace level; is RUST_LOG honoured?"

    leaks = [
        (stream, secret[:6] + "...") for stream, text in output.items() for secret in secret_values if secret in text
    ]
    assert not leaks, f"credential secrets in broker output: {leaks}\n{broker.stderr_tail()}"
