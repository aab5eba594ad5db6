//! The stop signals both binaries obey: SIGINT (Ctrl-C) and SIGTERM, and
//! for the node SIGHUP too (a closed terminal or SSH session), which would
//! otherwise kill it without a flush or a summary. The sink keeps SIGHUP
//! for reopening its output.

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// The first and the second SIGINT or SIGTERM: the first starts a clean
/// shutdown, the second cuts its waiting short. Listened for from the call
/// on (call it before any slow start-up work, such as reading back an
/// output file or a spool), so that a signal during start-up stops the
/// program cleanly once it runs, instead of killing it. A signal that
/// cannot be listened for is never seen (the default action applies).
///
/// With `hangup`, SIGHUP counts as a stop signal too.
pub fn stop_signals(
    hangup: bool,
) -> (impl Future<Output = ()> + Send + 'static, impl Future<Output = ()> + Send + 'static) {
    let mut term = signal(SignalKind::terminate()).ok();
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    let mut hang_up = if hangup { signal(SignalKind::hangup()).ok() } else { None };
    let (count, counted) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = next(&mut term) => {}
                Some(()) = next(&mut interrupt) => {}
                Some(()) = next(&mut hang_up) => {}
                else => std::future::pending::<()>().await,
            }
            count.send_modify(|n| *n += 1);
        }
    });
    let nth = move |n: u32| {
        let mut counted = counted.clone();
        async move {
            if counted.wait_for(|seen| *seen >= n).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    (nth(1), nth(2))
}

/// The next delivery of a signal, if it could be listened for.
async fn next(signal: &mut Option<Signal>) -> Option<()> {
    signal.as_mut()?.recv().await
}
