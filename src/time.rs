//! Timestamps as the IMDS and container-credential protocols (and the audit trail) write them.

use std::time::SystemTime;

/// `YYYY-MM-DDTHH:MM:SSZ`, the only timestamp form every SDK parses.
pub fn imds_time(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
    ))
    .expect("UTC timestamps always format")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_second_precision_utc_with_z() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_494_976_194_999);
        assert_eq!(imds_time(t), "2017-05-16T23:09:54Z");
    }
}
