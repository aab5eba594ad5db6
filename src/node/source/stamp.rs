//! The times a source stamps its ticks with.
//!
//! A time-series database holds one sample per series and millisecond, so
//! two readings of one sensor in the same millisecond cannot both be stored
//! (a remote-write sink refuses such a request). A sensor gives at most one
//! reading a tick, and a tick comes at most once a millisecond on average,
//! but a late tick can fire in the same millisecond as the next one. Each
//! tick is therefore stamped at least one millisecond after the tick before
//! it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Furthest a tick is stamped ahead of the system's clock. Ticks at most
/// once a millisecond on average stay within a millisecond or two of it; a
/// clock set back by more than this is followed at once (its times are the
/// truth), not crept up to.
const MOST_AHEAD: u64 = 10;

/// Tick times of one source: the system's clock, each in a later
/// millisecond than the one before.
#[derive(Debug, Default)]
pub(crate) struct Stamps {
    /// The millisecond (since 1970) of the last tick.
    last: Option<u64>,
}

impl Stamps {
    /// The time of a tick taken now.
    pub(crate) fn next(&mut self) -> SystemTime {
        self.at(SystemTime::now())
    }

    /// The time of a tick taken when the system's clock read `now`.
    fn at(&mut self, now: SystemTime) -> SystemTime {
        let millis = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let (stamp, millis) = match self.last {
            Some(last) if millis <= last && last - millis < MOST_AHEAD => {
                (UNIX_EPOCH + Duration::from_millis(last + 1), last + 1)
            }
            _ => (now, millis),
        };
        self.last = Some(millis);
        stamp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_clock_set_back_a_little_is_crept_up_to_and_a_lot_followed() {
        let mut stamps = Stamps::default();
        stamps.at(at(2000, 0));
        assert_eq!(stamps.at(at(1995, 0)), at(2001, 0));
        assert_eq!(stamps.at(at(1996, 0)), at(2002, 0));
        // Set back by more than MOST_AHEAD: the clock is followed.
        assert_eq!(stamps.at(at(1000, 7)), at(1000, 7));
        assert_eq!(stamps.at(at(1000, 8)), at(1001, 0));
    }

    #[test]
    fn ticks_faster_than_the_clock_all_get_their_own_millisecond() {
        let mut stamps = Stamps::default();
        let now = at(5000, 0);
        let millis: Vec<u64> = (0..MOST_AHEAD)
            .map(|_| stamps.at(now).duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap())
            .collect();
        assert_eq!(millis, (5000..5000 + MOST_AHEAD).collect::<Vec<_>>());
    }
}
