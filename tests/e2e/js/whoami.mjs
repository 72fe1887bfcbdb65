// Prints the caller ARN that STS reports for the credentials resolved by the
// AWS SDK for JavaScript v3 default provider chain. The e2e suite runs it as
// different uids against the broker; only the environment says where
// credentials and the STS endpoint come from.
//
// Exit codes: 0 with the ARN on stdout; 1 with "<error name>: <message>" on stderr.
import { STSClient, GetCallerIdentityCommand } from "@aws-sdk/client-sts";

try {
  const sts = new STSClient({});
  const identity = await sts.send(new GetCallerIdentityCommand({}));
  console.log(identity.Arn);
} catch (err) {
  console.error(`${err.name}: ${err.message}`);
  process.exitCode = 1;
}
