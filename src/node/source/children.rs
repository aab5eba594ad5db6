//! The exec source's processes, and what they leave behind.
//!
//! A command that starts a process in the background and exits leaves it to
//! whoever adopts orphans: in a container that is the node itself (PID 1,
//! with no init to reap), so every such process would stay a zombie until
//! the pod can no longer fork. A node with an exec source therefore adopts
//! its descendants' orphans ([`adopt_orphans`], a child subreaper), reaps
//! each as it exits, and, when no command is running, kills any that are
//! still alive (a daemon that left the command's process group, which the
//! timeout's group kill does not reach). Processes the node is waiting for
//! itself are never touched: reaping one would take its exit status from
//! the run that reads it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The direct children of runs in progress, which [`reap`] leaves alone.
static RUNNING: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Set once the node has taken on its descendants' orphans.
static ADOPTING: AtomicBool = AtomicBool::new(false);

/// Makes the node the adopter of its descendants' orphans and reaps them as
/// they exit, for as long as the runtime runs. Called once by the node's
/// binary when an exec source is set, inside the runtime; never in the test
/// harness, whose other threads have children of their own.
pub fn adopt_orphans() {
    #[cfg(target_os = "linux")]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let me = rustix::process::getpid();
        // The command runs as the node's user, so it could read the node's
        // environment, secrets and all, from /proc/<node>/environ: a
        // process that is not dumpable has its /proc files owned by root.
        if let Err(error) = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable) {
            tracing::warn!(message = "Cannot hide the node's environment from its exec command", %error);
        }
        // As PID 1 the node adopts every orphan of its namespace anyway.
        if let Err(error) = rustix::process::set_child_subreaper(Some(me)) {
            tracing::warn!(message = "Cannot adopt the exec command's orphans; a process it leaves running is left to init", %error);
        }
        let mut exits = match signal(SignalKind::child()) {
            Ok(exits) => exits,
            Err(error) => {
                tracing::warn!(message = "Cannot watch the exec command's processes exit; orphans are reaped only after each run", %error);
                ADOPTING.store(true, Ordering::Release);
                return;
            }
        };
        ADOPTING.store(true, Ordering::Release);
        tokio::spawn(async move {
            while exits.recv().await.is_some() {
                reap(Leftovers::Reap);
            }
        });
    }
}

/// A spawned command's process group; dropping it kills the group and what
/// escaped it.
pub(super) struct Run {
    /// The command's pid, also its process group's id.
    pid: Option<i32>,
}

/// Spawns `command` (which must start a process group of its own) and
/// marks it as running, so that [`reap`] does not take its exit status.
pub(super) fn spawn(command: &mut tokio::process::Command) -> std::io::Result<(tokio::process::Child, Run)> {
    // Held over the spawn: a command that exits at once must not be reaped
    // before it is marked.
    let mut running = RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let child = command.spawn()?;
    let pid = child.id().and_then(|id| i32::try_from(id).ok());
    running.extend(pid);
    Ok((child, Run { pid }))
}

impl Drop for Run {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(group) = self.pid.and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let last = {
            let mut running = RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            running.retain(|pid| Some(*pid) != self.pid);
            running.is_empty()
        };
        if last {
            reap(Leftovers::Kill);
        }
    }
}

/// What [`reap`] does with an adopted process that is still alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leftovers {
    /// Leave it: a command still running may be waiting for it.
    Reap,
    /// Kill it (to be reaped when it has exited): no command runs.
    Kill,
}

/// Reaps the node's exited children that no run is waiting for, and kills
/// the live ones if `leftovers` says so. Does nothing unless the node
/// adopts orphans.
fn reap(leftovers: Leftovers) {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Pid, Signal, WaitOptions, kill_process, waitpid};
        if !ADOPTING.load(Ordering::Acquire) {
            return;
        }
        let me = rustix::process::getpid().as_raw_nonzero().get();
        let Ok(processes) = procfs::process::all_processes() else { return };
        let running = RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for stat in processes.filter_map(Result::ok).filter_map(|process| process.stat().ok()) {
            if stat.ppid != me || running.contains(&stat.pid) {
                continue;
            }
            let Some(pid) = Pid::from_raw(stat.pid) else { continue };
            if stat.state == 'Z' {
                let _ = waitpid(Some(pid), WaitOptions::NOHANG);
            } else if leftovers == Leftovers::Kill {
                let _ = kill_process(pid, Signal::KILL);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = leftovers;
}
