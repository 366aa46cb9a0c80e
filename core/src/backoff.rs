//! The one retry backoff of edge-agent: every reconnect loop and every "the log is full, try again"
//! loop draws its delays from a [`Backoff`].
//!
//! A backoff keeps a *step* that starts at `min` and doubles after every delay up to `max`;
//! [`Backoff::reset`] puts it back to `min` (call it when the peer worked again). The delay drawn
//! from a step depends on the [`Jitter`]:
//!
//! * [`Jitter::Spread`]: the step times a factor uniform in `[1 - spread, 1 + spread]`; the default
//!   is `Spread(0.25)`, i.e. +-25 % (the Kafka links).
//! * [`Jitter::Full`]: uniform in `[min, step]`, so many devices that failed together do not retry
//!   together (the device drivers).
//! * [`Jitter::None`]: the step itself (a local resource such as a full log, where there is no herd
//!   to spread).
//!
//! A delay never exceeds `max`, unless [`Backoff::may_exceed_max`] lets a spread jitter go above it
//! (the step itself still stops at `max`).

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How a delay is drawn from the current step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    /// The step itself.
    None,
    /// Uniformly random in `[min, step]`.
    Full,
    /// The step times a factor uniformly random in `[1 - spread, 1 + spread]` (`spread` in 0..=1).
    Spread(f64),
}

/// Jittered exponential backoff. See the module docs.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    jitter: Jitter,
    capped: bool,
}

impl Backoff {
    /// Doubles from `min` to `max`, with +-25 % jitter ([`Jitter::Spread`] of 0.25). A `max`
    /// below `min` caps every delay (and every step after the first) at `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            step: min,
            jitter: Jitter::Spread(0.25),
            capped: true,
        }
    }

    pub fn with_jitter(mut self, jitter: Jitter) -> Backoff {
        self.jitter = match jitter {
            Jitter::Spread(s) => Jitter::Spread(s.clamp(0.0, 1.0)),
            j => j,
        };
        self
    }

    /// Lets a [`Jitter::Spread`] delay go above `max` (up to `max * (1 + spread)`); the step itself
    /// still stops at `max`.
    pub fn may_exceed_max(mut self) -> Backoff {
        self.capped = false;
        self
    }

    pub fn min(&self) -> Duration {
        self.min
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    /// The next delay, drawn from the current step; then the step doubles (up to `max`).
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.max);
        let d = match self.jitter {
            Jitter::None => step,
            Jitter::Full => {
                let lo = self.min.as_millis() as u64;
                let hi = (step.as_millis() as u64).max(lo);
                Duration::from_millis(fastrand::u64(lo..=hi))
            }
            Jitter::Spread(s) => step.mul_f64(1.0 - s + fastrand::f64() * 2.0 * s),
        };
        if self.capped { d.min(self.max) } else { d }
    }

    /// Back to `min`: the next delay is short again.
    pub fn reset(&mut self) {
        self.step = self.min;
    }

    /// Sleeps for the next delay. Returns `false`, at once, when `cancel` fires first.
    pub async fn sleep(&mut self, cancel: &CancellationToken) -> bool {
        let d = self.next_delay();
        sleep_unless_cancelled(d, cancel).await
    }
}

/// Sleeps for `delay` (a delay drawn earlier, e.g. to show it in a status line). Returns `false`,
/// at once, when `cancel` fires first.
pub async fn sleep_unless_cancelled(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn full_jitter_is_bounded_varies_grows_and_resets() {
        let mut b = Backoff::new(100 * MS, 800 * MS).with_jitter(Jitter::Full);
        let mut seen = Vec::new();
        for i in 0..40 {
            let d = b.next_delay();
            // The step is min * 2^i, capped at max; the delay is between min and the step.
            let step = (100 * MS * 2u32.pow(i.min(3))).min(800 * MS);
            assert!(
                d >= 100 * MS && d <= step,
                "delay {i}: {d:?} outside 100 ms..={step:?}"
            );
            seen.push(d);
        }
        assert!(
            seen.windows(2).any(|w| w[0] != w[1]),
            "jitter varies delays"
        );
        assert!(
            seen[10..].iter().any(|d| *d > 400 * MS),
            "the ceiling grew to max: {seen:?}"
        );
        b.reset();
        assert_eq!(
            b.next_delay(),
            100 * MS,
            "after a reset the first delay is min"
        );
    }

    #[test]
    fn spread_jitter_stays_around_the_step_and_under_max() {
        // The default: +-25 %.
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        let d1 = b.next_delay();
        assert!(d1 >= 75 * MS && d1 <= 125 * MS, "{d1:?}");
        let d2 = b.next_delay();
        assert!(d2 >= 150 * MS && d2 <= 250 * MS, "{d2:?}");
        for _ in 0..20 {
            assert!(b.next_delay() <= 1000 * MS);
        }
        // At the top the delays spread below max (never above it).
        let top: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(
            top.iter().all(|d| *d >= 750 * MS && *d <= 1000 * MS),
            "{top:?}"
        );
        b.reset();
        assert!(b.next_delay() <= 125 * MS);
    }

    #[test]
    fn spread_may_exceed_max_when_allowed() {
        // The MQTT reconnect loop: 0.5..1.5 times a doubling step, the step capped at max.
        let mut b = Backoff::new(100 * MS, 400 * MS)
            .with_jitter(Jitter::Spread(0.5))
            .may_exceed_max();
        for _ in 0..3 {
            b.next_delay();
        }
        let top: Vec<_> = (0..200).map(|_| b.next_delay()).collect();
        assert!(
            top.iter().all(|d| *d >= 200 * MS && *d <= 600 * MS),
            "{top:?}"
        );
        assert!(top.iter().any(|d| *d > 400 * MS), "some delays above max");
    }

    #[test]
    fn no_jitter_doubles_exactly() {
        let mut b = Backoff::new(100 * MS, 500 * MS).with_jitter(Jitter::None);
        let got: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(got, [100 * MS, 200 * MS, 400 * MS, 500 * MS, 500 * MS]);
        b.reset();
        assert_eq!(b.next_delay(), 100 * MS);
    }

    #[test]
    fn a_max_below_min_caps_every_delay() {
        for jitter in [Jitter::None, Jitter::Full, Jitter::Spread(0.25)] {
            let mut b = Backoff::new(200 * MS, 100 * MS).with_jitter(jitter);
            for _ in 0..10 {
                let d = b.next_delay();
                assert!(d <= 100 * MS, "{jitter:?}: {d:?}");
            }
        }
    }

    #[test]
    fn zero_backoff_never_waits() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!((0..5).all(|_| b.next_delay() == Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_waits_the_delay_or_stops_on_cancel() {
        let cancel = CancellationToken::new();
        let mut b = Backoff::new(100 * MS, 100 * MS).with_jitter(Jitter::None);
        let t = tokio::time::Instant::now();
        assert!(b.sleep(&cancel).await);
        assert_eq!(t.elapsed(), 100 * MS);
        cancel.cancel();
        let t = tokio::time::Instant::now();
        assert!(!b.sleep(&cancel).await);
        assert_eq!(
            t.elapsed(),
            Duration::ZERO,
            "a cancelled sleep returns at once"
        );
    }
}
