//! The credential cache against a fake STS and a hand-moved clock: one STS call per cold entry
//! however many callers wait, refresh before `min_remaining`, last good credentials served while
//! STS fails but nothing short-lived or expired ever served, and a failing STS not hammered.
//! Time-driven rotation (background refresher, retries, budget) is in `tests/rotation.rs`.

mod common;

use std::time::Duration;

use common::{Behavior, cache_with_fake_sts, input};
use imds_broker::config::DEFAULT_MIN_REMAINING;
use imds_broker::credentials::{CacheError, REFRESH_MARGIN, RETRY_BASE, StsError};

#[tokio::test]
async fn different_inputs_never_share_credentials() {
    let (cache, sts, _) = cache_with_fake_sts();
    let a = cache.get(&input("a")).await.unwrap();
    let b = cache.get(&input("b")).await.unwrap();
    let mut longer = input("a");
    longer.duration = Duration::from_secs(7200);
    let c = cache.get(&longer).await.unwrap();
    assert_eq!(sts.calls(), 3);
    assert_ne!(a.access_key_id, b.access_key_id);
    assert_ne!(a.access_key_id, c.access_key_id);
    // Cached: no further call.
    assert_eq!(
        cache.get(&input("a")).await.unwrap().access_key_id,
        a.access_key_id
    );
    assert_eq!(sts.calls(), 3);
}

#[tokio::test]
async fn refresh_starts_ahead_and_served_credentials_keep_min_remaining() {
    let (cache, sts, clock) = cache_with_fake_sts();
    let first = cache.get(&input("a")).await.unwrap();
    let now = imds_broker::credentials::Clock::now(&clock);
    let at = cache
        .next_refresh(&input("a"))
        .expect("a refresh is scheduled");
    // Scheduled before min_remaining is reached, with the margin.
    assert!(at >= now);
    assert!(at <= first.expiration - DEFAULT_MIN_REMAINING - REFRESH_MARGIN);
    // Just before that point nothing happens (the first refresh after a cold fetch may be due
    // almost at once: see `Phase::Spread`).
    let lead = at.duration_since(now).unwrap();
    if lead >= Duration::from_secs(1) {
        clock.advance(lead - Duration::from_secs(1));
        assert_eq!(
            cache.get(&input("a")).await.unwrap().access_key_id,
            first.access_key_id
        );
        assert_eq!(sts.calls(), 1);
    }
    // Once it is due the old credentials are still served while a refresh runs.
    clock.advance(lead.min(Duration::from_secs(1)));
    sts.close();
    let during = cache.get(&input("a")).await.unwrap();
    assert_eq!(
        during.access_key_id, first.access_key_id,
        "no caller waits for the refresh"
    );
    sts.wait_for_calls(2).await;
    sts.open();
    // Once it lands, the new credentials are served (bounded: the refresh task needs a few polls).
    let mut after = None;
    for _ in 0..1000 {
        let c = cache.get(&input("a")).await.unwrap();
        if c.access_key_id != first.access_key_id {
            after = Some(c);
            break;
        }
        tokio::task::yield_now().await;
    }
    let after = after.expect("the background refresh landed");
    let now = imds_broker::credentials::Clock::now(&clock);
    assert!(after.remaining(now) > DEFAULT_MIN_REMAINING);
    assert_eq!(sts.calls(), 2, "one background refresh");
}

#[tokio::test]
async fn a_failing_sts_serves_last_good_credentials_but_never_below_the_degraded_floor() {
    let (cache, sts, clock) = cache_with_fake_sts();
    let first = cache.get(&input("a")).await.unwrap();
    // Past the floor (31 min old, 29 min left) and STS is down: the last good ones (degraded).
    clock.advance(Duration::from_secs(31 * 60));
    sts.set(Behavior::Fail(StsError::Unavailable("down".into())));
    let degraded = cache.get(&input("a")).await.unwrap();
    assert_eq!(degraded.access_key_id, first.access_key_id);
    assert_eq!(cache.stats().degraded_entries, 1);
    // 5 minutes before expiry: an error, never the old ones.
    clock.advance(Duration::from_secs(24 * 60));
    let err = cache.get(&input("a")).await.unwrap_err();
    assert_eq!(err, CacheError::Sts(StsError::Unavailable("down".into())));
}

#[tokio::test(start_paused = true)]
async fn a_failing_sts_is_not_called_at_request_rate() {
    let (cache, sts, _) = cache_with_fake_sts();
    sts.set(Behavior::Fail(StsError::Throttled {
        code: "Throttling".into(),
    }));
    for _ in 0..50 {
        assert!(cache.get(&input("a")).await.is_err());
    }
    assert_eq!(
        sts.calls(),
        1,
        "callers get the failure while a retry waits"
    );
    // The retry comes from the backoff, not from callers.
    tokio::time::advance(RETRY_BASE).await;
    sts.wait_for_calls(2).await;
    for _ in 0..50 {
        assert!(cache.get(&input("a")).await.is_err());
    }
    assert_eq!(sts.calls(), 2);
}

#[tokio::test]
async fn short_sessions_from_sts_are_refused() {
    let (cache, sts, _) = cache_with_fake_sts();
    sts.set(Behavior::Issue {
        lifetime: Some(Duration::from_secs(20 * 60)),
    });
    let err = cache.get(&input("a")).await.unwrap_err();
    assert!(
        matches!(err, CacheError::Sts(StsError::Unusable(_))),
        "{err}"
    );
}

#[tokio::test]
async fn retain_drops_only_entries_not_kept() {
    let (cache, sts, _) = cache_with_fake_sts();
    cache.get(&input("a")).await.unwrap();
    cache.get(&input("b")).await.unwrap();
    cache.retain(|i| i.role_arn.role_name() == "a");
    cache.get(&input("a")).await.unwrap();
    assert_eq!(sts.calls(), 2, "a kept");
    cache.get(&input("b")).await.unwrap();
    assert_eq!(sts.calls(), 3, "b dropped and fetched again");
}
