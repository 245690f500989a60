//! The one retry policy of every loop that waits for something to heal (a broker, a database,
//! a transaction): capped exponential backoff with jitter, from `backon`, so that instances
//! that failed together do not retry in lockstep, and failures are logged at a bounded rate.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays that double from `min` up to `max` (each plus a random jitter of up to itself),
/// forever; [`Backoff::reset`] after a success starts again from `min`.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
}

impl Backoff {
    /// From `min`, doubling, capped at `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
        }
    }

    /// The usual policy of a stage: 200 ms up to 10 s.
    pub fn stage() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(10))
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(Duration::from_secs(10))
    }

    /// After a success: the next delay is `min` again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(100) && first < Duration::from_millis(200));
        for _ in 0..20 {
            // Jitter adds at most the delay itself.
            assert!(b.next_delay() < Duration::from_secs(2));
        }
        assert!(b.next_delay() >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(200));
    }
}
