//! IAM Roles Anywhere: temporary credentials from `CreateSession`, signed with the host's
//! X.509 certificate and private key (no long-term AWS key on the host).
