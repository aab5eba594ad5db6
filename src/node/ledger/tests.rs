use std::{sync::Arc, time::Duration};

use proptest::prelude::*;

use super::*;

/// What becomes of one batch in a generated history.
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// Acknowledged on its first trip.
    Acked,
    /// Refused for good by the sink.
    Refused,
    /// Given up after every attempt.
    Exhausted,
    /// Pushed out of a full queue before it was sent.
    Overflowed,
    /// Still in a lane when the drain ran out of time.
    Held,
    /// Spooled, then replayed and acknowledged.
    SpooledAcked,
    /// Spooled, then refused on replay.
    SpooledRefused,
    /// Spooled, then evicted by a newer batch.
    SpooledEvicted,
    /// Spooled, and still there at the end.
    SpooledKept,
    /// An earlier run's batch, replayed and acknowledged.
    EarlierAcked,
    /// An earlier run's batch, refused on replay.
    EarlierRefused,
    /// An earlier run's batch, evicted.
    EarlierEvicted,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        Just(Fate::Acked),
        Just(Fate::Refused),
        Just(Fate::Exhausted),
        Just(Fate::Overflowed),
        Just(Fate::Held),
        Just(Fate::SpooledAcked),
        Just(Fate::SpooledRefused),
        Just(Fate::SpooledEvicted),
        Just(Fate::SpooledKept),
        Just(Fate::EarlierAcked),
        Just(Fate::EarlierRefused),
        Just(Fate::EarlierEvicted),
    ]
}

/// Reports `fate` for a batch of `n` readings the way the stages do.
/// Returns the readings of this run the stages left unaccounted.
fn report(ledger: &Ledger, fate: Fate, n: u64) -> u64 {
    let code = tonic::Code::InvalidArgument;
    let this_run = !matches!(fate, Fate::EarlierAcked | Fate::EarlierRefused | Fate::EarlierEvicted);
    if this_run {
        ledger.produced(n);
    }
    match fate {
        Fate::Acked => ledger.acked(n as usize),
        Fate::Refused => ledger.refused(code, n),
        Fate::Exhausted => ledger.dropped(DropReason::RetriesExhausted, n),
        Fate::Overflowed => ledger.dropped(DropReason::OverflowOldest, n),
        Fate::Held => return n,
        Fate::SpooledAcked => {
            ledger.spooled(n as usize);
            ledger.replay_acked(Run::This, n as usize);
        }
        Fate::SpooledRefused => {
            ledger.spooled(n as usize);
            ledger.replay_refused(Run::This, code, n);
        }
        Fate::SpooledEvicted => {
            ledger.spooled(n as usize);
            ledger.evicted(Run::This, n);
        }
        Fate::SpooledKept => ledger.spooled(n as usize),
        Fate::EarlierAcked => ledger.replay_acked(Run::Earlier, n as usize),
        Fate::EarlierRefused => ledger.replay_refused(Run::Earlier, code, n),
        Fate::EarlierEvicted => ledger.evicted(Run::Earlier, n),
    }
    0
}

proptest! {
    #[test]
    fn every_reading_of_this_run_is_acked_dropped_or_spooled(
        history in prop::collection::vec((fate(), 1u64..100), 0..60),
    ) {
        let ledger = Ledger::default();
        let mut unaccounted = 0;
        for (fate, n) in &history {
            unaccounted += report(&ledger, *fate, *n);
        }
        prop_assert_eq!(ledger.settle(), unaccounted);
        let s = ledger.snapshot();
        prop_assert_eq!(s.produced, s.acked + s.dropped + s.in_spool);
        prop_assert_eq!(s.dropped_by.iter().sum::<u64>(), s.dropped);
        let total = |wanted: &[Fate]| -> u64 {
            history.iter().filter(|(fate, _)| wanted.iter().any(|w| std::mem::discriminant(w) == std::mem::discriminant(fate))).map(|(_, n)| n).sum()
        };
        prop_assert_eq!(s.in_spool, total(&[Fate::SpooledKept]));
        prop_assert_eq!(s.earlier_acked, total(&[Fate::EarlierAcked]));
        prop_assert_eq!(s.earlier_dropped, total(&[Fate::EarlierRefused, Fate::EarlierEvicted]));
        prop_assert_eq!(s.replayed, total(&[Fate::SpooledAcked, Fate::EarlierAcked]));
        prop_assert_eq!(s.dropped_by[2], unaccounted, "drops at shutdown are the readings held");
        // Settled books stay settled: a second settle finds nothing.
        prop_assert_eq!(ledger.settle(), 0);
    }
}

#[test]
fn an_earlier_runs_readings_leave_this_runs_books_alone() {
    let ledger = Ledger::default();
    ledger.produced(10);
    ledger.acked(10);
    ledger.evicted(Run::Earlier, 7);
    ledger.replay_refused(Run::Earlier, tonic::Code::InvalidArgument, 3);
    ledger.replay_acked(Run::Earlier, 5);
    let s = ledger.snapshot();
    assert_eq!((s.produced, s.acked, s.dropped, s.dropped_by), (10, 10, 0, [0; 6]));
    assert_eq!((s.earlier_acked, s.earlier_dropped, s.replayed), (5, 10, 5));
    let text = s.to_string();
    assert!(text.contains("earlier_acked=5 earlier_dropped=10"), "{text}");
}

#[test]
fn the_metrics_break_drops_down_by_run_and_reason() {
    let ledger = Arc::new(Ledger::default());
    ledger.produced(4);
    ledger.spooled(4);
    ledger.evicted(Run::This, 4);
    ledger.evicted(Run::Earlier, 9);
    let mut registry = Registry::default();
    ledger.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains("telemetry_node_readings_dropped_total{reason=\"spool_full\"} 4"), "{text}");
    assert!(text.contains("telemetry_node_earlier_run_readings_dropped_total{reason=\"spool_full\"} 9"), "{text}");
    assert!(text.contains("telemetry_node_earlier_run_readings_dropped_total{reason=\"refused\"} 0"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn the_drain_wakes_when_the_spool_empties_and_not_before() {
    let ledger = Arc::new(Ledger::default());
    ledger.produced(5);
    ledger.spooled(5);
    let waiting = tokio::spawn({
        let ledger = Arc::clone(&ledger);
        async move { ledger.spool_emptied().await }
    });
    tokio::task::yield_now().await;
    ledger.replay_acked(Run::This, 2);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!waiting.is_finished(), "three readings are still in the spool");
    ledger.evicted(Run::This, 3);
    tokio::time::timeout(Duration::from_millis(1), waiting).await.unwrap().unwrap();
}

#[test]
fn a_scrape_shows_balanced_books() {
    let ledger = Arc::new(Ledger::default());
    ledger.produced(10);
    ledger.acked(3);
    ledger.dropped(DropReason::OverflowNewest, 2);
    ledger.spooled(4);
    let mut registry = Registry::default();
    ledger.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let value = |line: &str| -> u64 {
        let found = text.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("{line} in {text}"));
        found.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let dropped: u64 = DropReason::ALL
        .iter()
        .map(|reason| value(&format!("telemetry_node_readings_dropped_total{{reason=\"{}\"}}", reason.name())))
        .sum();
    let produced = value("telemetry_node_readings_produced_total ");
    let (acked, in_spool) = (value("telemetry_node_readings_acked_total "), value("telemetry_node_readings_in_spool "));
    let held = value("telemetry_node_readings_held ");
    assert_eq!((produced, acked, dropped, in_spool, held), (10, 3, 2, 4, 1));
}
