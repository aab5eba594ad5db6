//! The times a source stamps its ticks with.
//!
//! A time-series database holds one sample per series and millisecond, so
//! two readings of one sensor in the same millisecond cannot both be stored
//! (a remote-write sink refuses such a request). A sensor gives at most one
//! reading a tick, and a tick comes at most once a millisecond on average
//! (SENSOR_VALUE_RATE_PER_SECOND is at most 1000; the timers skip missed
//! ticks rather than bunch them), but a late tick can fire in the same
//! millisecond as the next one. Each tick is therefore stamped at least one
//! millisecond after the tick before it, however fast ticks come (at one a
//! millisecond on average, a stamp runs ahead of the clock by no more than
//! the ticks that came early): also when the system's clock is set back (an
//! NTP step), within [`MOST_CREPT`], so that a reading never takes a
//! millisecond of its sensor that an earlier reading may already hold in the
//! database (VictoriaMetrics keeps one sample of a millisecond and answers
//! OK for both).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::warn;

/// Furthest a set-back of the clock is made up for: a clock set back by up
/// to this is crept up to (each tick a millisecond after the last until the
/// clock catches up: no reading lost, their times bunched for as long as
/// the clock was set back); one set back further is followed at once (it
/// was far wrong before, and creeping would stamp every reading in a time
/// that is not coming), and the readings of the next moments may then share
/// milliseconds with stored ones.
const MOST_CREPT: u64 = 60_000;

/// A set-back at least this long is logged.
const LOGGED: u64 = 1_000;

/// When a set-back was last logged, by any source's stamps: every lane sees
/// the same step of the clock, and it is logged once.
static LAST_LOGGED: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);

/// Whether no other source logged a set-back within the last second: this
/// one is the first to see the step.
fn first_to_see_the_step() -> bool {
    let mut last = LAST_LOGGED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = std::time::Instant::now();
    if last.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
        return false;
    }
    *last = Some(now);
    true
}

/// Tick times of one source: the system's clock, each in a later
/// millisecond than the one before.
#[derive(Debug, Default)]
pub(crate) struct Stamps {
    /// The millisecond (since 1970) of the last tick.
    last: Option<u64>,
    /// What the clock read at the last tick, in milliseconds.
    clock: Option<u64>,
    /// How far the clock was set back since the stamps were last at the
    /// clock.
    set_back: u64,
}

impl Stamps {
    /// The time of a tick taken now.
    pub(crate) fn next(&mut self) -> SystemTime {
        self.at(SystemTime::now())
    }

    /// The time of a tick taken when the system's clock read `now`.
    fn at(&mut self, now: SystemTime) -> SystemTime {
        let millis = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let back = self.clock.map_or(0, |clock| clock.saturating_sub(millis));
        self.clock = Some(millis);
        self.set_back = self.set_back.saturating_add(back);
        // At or behind the last stamp: ticks faster than the clock, or the
        // clock set back (crept up to unless set back too far).
        let creep = self.last.is_some_and(|last| last >= millis) && self.set_back <= MOST_CREPT;
        if back >= LOGGED && first_to_see_the_step() {
            if creep {
                warn!(
                    message = "The system clock was set back; readings are stamped a millisecond apart after the last until it catches up.",
                    back_ms = back,
                );
            } else {
                warn!(
                    message = "The system clock was set back by more than a minute; followed. Readings of the time set back may share milliseconds with stored ones, of which a database keeps one.",
                    back_ms = back,
                );
            }
        }
        match (creep, self.last) {
            (true, Some(last)) => {
                self.last = Some(last + 1);
                UNIX_EPOCH + Duration::from_millis(last + 1)
            }
            _ => {
                self.last = Some(millis);
                self.set_back = 0;
                now
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_of_the_clock_is_logged_by_the_first_lane_to_see_it_only() {
        // Three lanes seeing one step (another test's may have just been
        // logged: then none of them logs).
        let logged = [first_to_see_the_step(), first_to_see_the_step(), first_to_see_the_step()];
        assert!(logged.iter().filter(|&&logged| logged).count() <= 1, "{logged:?}");
    }

    fn at(millis: u64, micros: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(millis) + Duration::from_micros(micros)
    }

    #[test]
    fn ticks_in_later_milliseconds_keep_the_clock_to_the_nanosecond() {
        let mut stamps = Stamps::default();
        assert_eq!(stamps.at(at(1000, 123)), at(1000, 123));
        assert_eq!(stamps.at(at(1001, 5)), at(1001, 5));
        assert_eq!(stamps.at(at(1500, 999)), at(1500, 999));
    }

    #[test]
    fn a_tick_in_the_same_millisecond_moves_to_the_next() {
        let mut stamps = Stamps::default();
        assert_eq!(stamps.at(at(1000, 100)), at(1000, 100));
        assert_eq!(stamps.at(at(1000, 900)), at(1001, 0));
        // The clock still in the millisecond the last tick was moved to.
        assert_eq!(stamps.at(at(1001, 300)), at(1002, 0));
        // Then the clock is ahead again and taken as it is.
        assert_eq!(stamps.at(at(1003, 1)), at(1003, 1));
    }

    #[test]
    fn a_clock_set_back_up_to_a_minute_is_crept_up_to_and_further_followed() {
        let mut stamps = Stamps::default();
        stamps.at(at(100_000, 0));
        // Set back by 10 s (an NTP step): every tick still gets a millisecond
        // after the last, none the database may already hold ...
        assert_eq!(stamps.at(at(90_000, 0)), at(100_001, 0));
        assert_eq!(stamps.at(at(90_200, 0)), at(100_002, 0));
        assert_eq!(stamps.at(at(99_999, 0)), at(100_003, 0));
        // ... until the clock has caught up, and is taken as it is again.
        assert_eq!(stamps.at(at(100_003, 500)), at(100_004, 0));
        assert_eq!(stamps.at(at(100_200, 1)), at(100_200, 1));
        // Set back by exactly MOST_CREPT: still crept up to.
        assert_eq!(stamps.at(at(100_200 - MOST_CREPT, 0)), at(100_201, 0));
        assert_eq!(stamps.at(at(100_300, 0)), at(100_300, 0));
        // By more: the clock is followed.
        assert_eq!(stamps.at(at(40_000, 7)), at(40_000, 7));
        assert_eq!(stamps.at(at(40_000, 8)), at(40_001, 0));
    }

    fn millis(time: SystemTime) -> u64 {
        time.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap()
    }

    #[test]
    fn ticks_faster_than_the_clock_all_get_their_own_millisecond() {
        let mut stamps = Stamps::default();
        let now = at(5000, 0);
        let stamped: Vec<u64> = (0..100).map(|_| millis(stamps.at(now))).collect();
        assert_eq!(stamped, (5000..5100).collect::<Vec<_>>());
        // The clock catching up is taken as it is again.
        assert_eq!(stamps.at(at(5100, 7)), at(5100, 7));
    }

    proptest::proptest! {
        /// Whatever the clock does short of a set-back of more than
        /// MOST_CREPT (which is followed, and logged): ticks early or late,
        /// bunched in one millisecond, the clock stepped back: every stamp
        /// falls in a later millisecond than the one before.
        #[test]
        fn every_stamp_falls_in_a_later_millisecond_than_the_one_before(
            steps in proptest::collection::vec((0u8..10, 0u64..5_000, 0u64..1_000), 1..400),
        ) {
            let mut stamps = Stamps::default();
            let (mut clock, mut last, mut set_back) = (1_000_000_000u64, None, 0);
            for (kind, step, micros) in steps {
                clock = match kind {
                    // Set back, by at most MOST_CREPT in all.
                    0 if set_back + step * 12 <= MOST_CREPT => {
                        set_back += step * 12;
                        clock - step * 12
                    }
                    0 => clock,
                    // The same millisecond again, or a little later.
                    1..=5 => clock + step % 2,
                    _ => clock + step,
                };
                let stamp = millis(stamps.at(at(clock, micros)));
                if let Some(last) = last {
                    proptest::prop_assert!(stamp > last, "{stamp} after {last}");
                }
                last = Some(stamp);
            }
        }
    }
}
