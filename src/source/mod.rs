//! The daemon's own credentials, the ones it calls STS with (`[source]`): the aws-config
//! default chain, IAM Roles Anywhere with an X.509 certificate, or an access key in a file the
//! daemon owns and rotates.

pub mod access_key;
pub mod roles_anywhere;
