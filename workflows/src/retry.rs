//! When a failed attempt runs again: exponential backoff with jitter, from `backon`. The next
//! attempt's time is stored on the job and on its queue task, so no process holds it in memory.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delay before the attempt after `failed_attempts` failures (1 = after the first failure).
/// Doubles from `base` each time, capped at `max`, plus a random jitter of up to one more delay.
pub fn delay(failed_attempts: u32, base: Duration, max: Duration) -> Duration {
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(base)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build();
    let n = failed_attempts.max(1) as usize;
    backoff.nth(n - 1).unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_stays_within_bounds() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for n in 1..12u32 {
            let d = delay(n, base, max);
            let floor = (base * 2u32.pow(n - 1)).min(max);
            assert!(d >= floor, "attempt {n}: {d:?} < {floor:?}");
            assert!(d <= floor * 2, "attempt {n}: {d:?} > 2x{floor:?}");
        }
    }
}
