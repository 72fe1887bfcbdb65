//! An access key in a file the daemon owns (shared-credentials format), rotated by the daemon
//! itself when `rotate_every` is set.
