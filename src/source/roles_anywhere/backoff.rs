//! The pause after a failed CreateSession. The SDK's identity cache asks for credentials again
//! on the next use after a failure, and every app request is a use: without a pause, a refused
//! certificate (expired, revoked, wrong profile) would send Roles Anywhere a signed request per
//! app request, and a throttled endpoint would be kept throttled. Within the pause the last
//! error is returned at once; the pause doubles with each failure in a row, from
//! [`FIRST_PAUSE`] up to [`MAX_PAUSE`], and ends on a success or on a reloaded certificate.

use std::time::Duration;

use tokio::time::Instant;

pub const FIRST_PAUSE: Duration = Duration::from_secs(1);
pub const MAX_PAUSE: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
    until: Option<Instant>,
    last: String,
}

impl Backoff {
    /// `Err((time left, last error))` while a pause runs.
    pub fn check(&self, now: Instant) -> Result<(), (Duration, String)> {
        match self.until {
            Some(until) if now < until => Err((until - now, self.last.clone())),
            _ => Ok(()),
        }
    }

    pub fn failed(&mut self, now: Instant, error: String) {
        let pause = FIRST_PAUSE
            .saturating_mul(1u32 << self.failures.min(16))
            .min(MAX_PAUSE);
        self.failures = self.failures.saturating_add(1);
        self.until = Some(now + pause);
        self.last = error;
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_a_success_ends_them() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert!(b.check(t0).is_ok());
        let mut now = t0;
        for expected in [1, 2, 4, 8, 16, 32, 60, 60] {
            b.failed(now, format!("refused at {expected}"));
            let (left, last) = b.check(now).unwrap_err();
            assert_eq!(left, Duration::from_secs(expected));
            assert_eq!(last, format!("refused at {expected}"));
            assert!(
                b.check(now + Duration::from_secs(expected) - Duration::from_millis(1))
                    .is_err()
            );
            now += Duration::from_secs(expected);
            assert!(b.check(now).is_ok(), "over after {expected}s");
        }
        b.reset();
        b.failed(now, "again".into());
        assert_eq!(b.check(now).unwrap_err().0, FIRST_PAUSE);
    }
}
