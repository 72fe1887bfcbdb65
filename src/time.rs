//! Time, on the two clocks the daemon needs.
//!
//! - The wall clock (`SystemTime`) for instants other parties define: an STS `Expiration`, the
//!   timestamps the IMDS and container-credential protocols and the audit trail write.
//! - The boot clock ([`BootTime`], `CLOCK_BOOTTIME`) for every interval the daemon grants and
//!   measures itself: IMDSv2 token TTLs, container-token rotation and grace, idleness. An NTP
//!   step or an operator's `date -s` moves the wall clock by any amount, either way; the boot
//!   clock is never stepped, and unlike `CLOCK_MONOTONIC` it counts time the host spent
//!   suspended, so an interval measured on it is the real time that passed. It restarts at
//!   each boot, so a reading is kept together with the boot it was taken in ([`BootId`]), and
//!   readings from different boots are never compared.

use std::ops::Add;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// `YYYY-MM-DDTHH:MM:SSZ`, the only timestamp form every SDK parses.
pub fn imds_time(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
    ))
    .expect("UTC timestamps always format")
}

const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";

/// Which boot of the host a [`BootTime`] belongs to: the kernel's random boot id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BootId([u8; 16]);

impl std::fmt::Debug for BootId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BootId({})", hex::encode(self.0))
    }
}

impl BootId {
    /// This boot's id, read once. Without `/proc` a random id stands in: what is measured on
    /// the boot clock then does not outlive this process (tokens are refused after a restart),
    /// which fails safe.
    pub fn current() -> BootId {
        static CURRENT: OnceLock<BootId> = OnceLock::new();
        *CURRENT.get_or_init(|| {
            match std::fs::read_to_string(BOOT_ID_FILE)
                .ok()
                .and_then(|text| BootId::parse(&text))
            {
                Some(id) => id,
                None => {
                    tracing::warn!(
                        file = BOOT_ID_FILE,
                        "cannot read the boot id; session and container tokens will not survive a restart"
                    );
                    let mut id = [0u8; 16];
                    rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
                    BootId(id)
                }
            }
        })
    }

    /// The kernel's form: a UUID, 32 hex digits and four dashes.
    pub fn parse(text: &str) -> Option<BootId> {
        let digits: String = text.trim().chars().filter(|c| *c != '-').collect();
        let mut id = [0u8; 16];
        hex::decode_to_slice(&digits, &mut id).ok()?;
        Some(BootId(id))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// 32 hex digits, which [`BootId::parse`] reads back.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    #[cfg(test)]
    pub fn from_bytes(bytes: [u8; 16]) -> BootId {
        BootId(bytes)
    }
}

/// A reading of the boot clock, with the boot it was taken in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BootTime {
    pub boot: BootId,
    pub since_boot: Duration,
}

impl BootTime {
    pub fn now() -> BootTime {
        let since_boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(Duration::from)
            // Linux has had CLOCK_BOOTTIME since 2.6.39; this is never reached there.
            .expect("CLOCK_BOOTTIME is readable");
        BootTime {
            boot: BootId::current(),
            since_boot,
        }
    }

    /// Real time from `earlier` to `self` (zero if `earlier` is later); `None` if they were
    /// taken in different boots, where it cannot be known.
    pub fn since(&self, earlier: BootTime) -> Option<Duration> {
        (self.boot == earlier.boot).then(|| self.since_boot.saturating_sub(earlier.since_boot))
    }
}

impl Add<Duration> for BootTime {
    type Output = BootTime;
    fn add(self, d: Duration) -> BootTime {
        BootTime {
            boot: self.boot,
            since_boot: self.since_boot.saturating_add(d),
        }
    }
}

/// One moment on both clocks: the boot clock measures intervals, the wall clock names the
/// moment to people and to other boots (an interval that spans a reboot falls back to it).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Moment {
    pub wall: SystemTime,
    pub boot: BootTime,
}

impl Moment {
    pub fn now() -> Moment {
        Moment {
            wall: SystemTime::now(),
            boot: BootTime::now(),
        }
    }

    /// Real time from `earlier` to `self`, zero if `earlier` is not before it: on the boot
    /// clock, or on the wall clock if `earlier` is from another boot.
    pub fn since(&self, earlier: Moment) -> Duration {
        self.boot
            .since(earlier.boot)
            .unwrap_or_else(|| self.wall.duration_since(earlier.wall).unwrap_or_default())
    }

    /// Whether `deadline` has come (see [`Moment::since`] for the clock used).
    pub fn reached(&self, deadline: Moment) -> bool {
        self.until(deadline).is_zero()
    }

    /// Real time left until `deadline`, zero once it has come.
    pub fn until(&self, deadline: Moment) -> Duration {
        deadline
            .boot
            .since(self.boot)
            .unwrap_or_else(|| deadline.wall.duration_since(self.wall).unwrap_or_default())
    }

    /// The moment a saved boot-clock reading (`since_boot` in boot `id`) or, when that is
    /// another boot than `now`'s, `wall_secs` stands for: how a moment saved by an earlier run
    /// is read back. Readings of this boot keep their boot-clock value (a wall-clock step
    /// between the runs does not move them); others are placed by their wall-clock time.
    pub fn restore(now: Moment, wall_secs: u64, boot: Option<(BootId, Duration)>) -> Moment {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(wall_secs);
        let since_boot = match boot {
            Some((id, since_boot)) if id == now.boot.boot => since_boot,
            // Its offset from now on the wall clock, carried onto this boot's clock.
            _ => match wall.duration_since(now.wall) {
                Ok(ahead) => now.boot.since_boot.saturating_add(ahead),
                Err(behind) => now.boot.since_boot.saturating_sub(behind.duration()),
            },
        };
        Moment {
            wall,
            boot: BootTime {
                boot: now.boot.boot,
                since_boot,
            },
        }
    }
}

impl Add<Duration> for Moment {
    type Output = Moment;
    fn add(self, d: Duration) -> Moment {
        Moment {
            wall: self.wall + d,
            boot: self.boot + d,
        }
    }
}

/// How far the wall clock may drift from the boot clock between two readings before it counts
/// as stepped: NTP slews at most 0.5 ms/s, so over the seconds between readings anything near
/// a second is a step.
pub const STEP_TOLERANCE: Duration = Duration::from_secs(1);

/// Notices wall-clock steps by comparing how far each clock moved between two readings.
#[derive(Debug, Clone, Copy)]
pub struct StepWatch {
    last: Option<Moment>,
}

impl StepWatch {
    pub fn new() -> Self {
        Self { last: None }
    }

    /// Takes a reading; returns the step since the previous one, in seconds (positive: the
    /// wall clock jumped forward), when it exceeds [`STEP_TOLERANCE`].
    pub fn observe(&mut self, now: Moment) -> Option<f64> {
        let last = self.last.replace(now)?;
        let real = now.boot.since(last.boot)?.as_secs_f64();
        let wall = match now.wall.duration_since(last.wall) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        let step = wall - real;
        (step.abs() > STEP_TOLERANCE.as_secs_f64()).then_some(step)
    }
}

impl Default for StepWatch {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_second_precision_utc_with_z() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_494_976_194_999);
        assert_eq!(imds_time(t), "2017-05-16T23:09:54Z");
    }

    #[test]
    fn the_boot_clock_is_read_with_this_boots_id() {
        let a = BootTime::now();
        let b = BootTime::now();
        assert_eq!(a.boot, b.boot);
        assert!(b.since(a).is_some());
        let text = std::fs::read_to_string(BOOT_ID_FILE).unwrap();
        assert_eq!(Some(a.boot), BootId::parse(&text));
        assert_eq!(BootId::parse("not a uuid"), None);
    }

    fn moment(wall: u64, boot: BootId, since_boot: u64) -> Moment {
        Moment {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(wall),
            boot: BootTime {
                boot,
                since_boot: Duration::from_secs(since_boot),
            },
        }
    }

    #[test]
    fn intervals_follow_the_boot_clock_whatever_the_wall_clock_does() {
        let boot = BootId::from_bytes([1; 16]);
        let t0 = moment(1_000_000, boot, 100);
        let deadline = t0 + Duration::from_secs(60);
        // 10 s of real time later the wall clock reads an hour earlier: 50 s are left, not 3650.
        let back = moment(1_000_000 - 3600 + 10, boot, 110);
        assert_eq!(back.until(deadline), Duration::from_secs(50));
        assert_eq!(back.since(t0), Duration::from_secs(10));
        assert!(!back.reached(deadline));
        // ...or an hour later: still 50 s left, not gone.
        let fwd = moment(1_000_000 + 3600 + 10, boot, 110);
        assert_eq!(fwd.until(deadline), Duration::from_secs(50));
        assert!(!fwd.reached(deadline));
        assert!(moment(0, boot, 160).reached(deadline));
    }

    #[test]
    fn across_a_reboot_intervals_fall_back_to_the_wall_clock() {
        let t0 = moment(1_000_000, BootId::from_bytes([1; 16]), 100_000);
        let deadline = t0 + Duration::from_secs(60);
        let rebooted = moment(1_000_030, BootId::from_bytes([2; 16]), 5);
        assert_eq!(rebooted.until(deadline), Duration::from_secs(30));
        assert_eq!(rebooted.since(t0), Duration::from_secs(30));
    }

    #[test]
    fn saved_moments_keep_their_boot_reading_in_the_same_boot_only() {
        let boot = BootId::from_bytes([1; 16]);
        // Saved at wall 1_000_000 / boot 100 s; read back at boot 160 s after a -1 h step.
        let now = moment(1_000_060 - 3600, boot, 160);
        let same = Moment::restore(now, 1_000_000, Some((boot, Duration::from_secs(100))));
        assert_eq!(now.since(same), Duration::from_secs(60));
        // A reading from another boot is placed by the wall clock.
        let other = Moment::restore(
            now,
            1_000_060 - 3600 - 20,
            Some((BootId::from_bytes([9; 16]), Duration::from_secs(1))),
        );
        assert_eq!(other.boot.boot, boot);
        assert_eq!(now.since(other), Duration::from_secs(20));
        let none = Moment::restore(now, 1_000_060 - 3600 + 30, None);
        assert_eq!(now.until(none), Duration::from_secs(30));
    }

    #[test]
    fn a_step_is_the_wall_clock_moving_apart_from_the_boot_clock() {
        let boot = BootId::from_bytes([1; 16]);
        let mut watch = StepWatch::new();
        assert_eq!(watch.observe(moment(1_000_000, boot, 100)), None);
        // 10 s on both clocks: no step.
        assert_eq!(watch.observe(moment(1_000_010, boot, 110)), None);
        // 10 s of real time, the wall clock 3610 s on: +3600.
        assert_eq!(watch.observe(moment(1_003_620, boot, 120)), Some(3600.0));
        // 10 s of real time, the wall clock 3590 s back: -3600.
        assert_eq!(watch.observe(moment(1_000_030, boot, 130)), Some(-3600.0));
        assert_eq!(watch.observe(moment(1_000_040, boot, 140)), None);
    }
}
