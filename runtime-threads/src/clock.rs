//! The process clock, mapped onto the core's [`Instant`] (milliseconds since an origin).
//! The core never reads a clock (STYLE.md habit 2); every runtime thread asks this one, so all
//! sessions of a process share one origin.

use std::sync::OnceLock;
use std::time::{Duration, Instant as StdInstant};

use nowconnect_core::Instant;

fn origin() -> StdInstant {
    static ORIGIN: OnceLock<StdInstant> = OnceLock::new();
    *ORIGIN.get_or_init(StdInstant::now)
}

/// Now, as the core's instant. Create sessions with it (`Session::new_hub(config, now())`).
pub fn now() -> Instant {
    let ms = origin().elapsed().as_millis();
    Instant::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// How long from now until the core instant `at` (zero if it has passed). Precise to the
/// nanosecond so a poll(2) timeout never wakes a millisecond early and spins.
pub fn until(at: Instant) -> Duration {
    let target = origin() + Duration::from_millis(at.as_millis());
    target.saturating_duration_since(StdInstant::now())
}
