//! The host source: the machine's vital signs, read from /proc (through the
//! `procfs` crate) and statvfs at each tick, as integers with the unit in
//! the name.
//!
//! Per interface, disk and mount point, the sensor name ends in `:` and the
//! interface, disk or mount point, named as Prometheus users query them:
//! `host_network_receive_bytes_total{device="eth0"}`,
//! `host_disk_read_bytes_total{device="sda"}`,
//! `host_filesystem_free_bytes{mountpoint="/"}` (stored in a database as
//! that metric with that label).

use std::collections::{BTreeMap, HashSet};

use procfs::{Current, CurrentSI};

use super::{Failure, Probe, Round};
use crate::reading::{check_sensor_name, sensor_name};

/// The most sensors the host source keeps names for: interfaces come and go
/// (a container's veth pair each time it starts), and each name is kept for
/// good.
const MOST_SENSORS: usize = 4096;

/// Reads the host at each tick.
#[derive(Debug)]
pub(crate) struct Host {
    /// The state, on loan to the blocking thread while it reads.
    state: Option<State>,
}

/// What the host source remembers between ticks.
#[derive(Debug, Default)]
struct State {
    /// CPU time at the previous tick (busy, total), in clock ticks.
    cpu: Option<(u64, u64)>,
    /// Names given so far.
    known: HashSet<&'static str>,
}

impl Host {
    /// A probe of this machine.
    #[allow(clippy::new_without_default)]
    pub(crate) fn new() -> Self {
        Self { state: Some(State::default()) }
    }
}

impl Probe for Host {
    const KIND: &'static str = "host";

    fn read(&mut self) -> impl Future<Output = Round> + Send {
        super::off_the_runtime(&mut self.state, read_all, Self::KIND)
    }
}

/// One round of every host sensor.
fn read_all(state: &mut State) -> Round {
    let mut values = BTreeMap::new();
    let mut failures = Vec::new();
    let mut failed =
        |what: &str, error: procfs::ProcError| failures.push(Failure::new("unreadable", format!("{what}: {error}")));
    match procfs::Meminfo::current() {
        Ok(memory) => {
            values.insert("host_memory_total_bytes".to_owned(), memory.mem_total);
            if let Some(available) = memory.mem_available {
                values.insert("host_memory_available_bytes".to_owned(), available);
            }
        }
        Err(error) => failed("/proc/meminfo", error),
    }
    match procfs::KernelStats::current() {
        Ok(stats) => {
            let cpu = &stats.total;
            let idle = cpu.idle + cpu.iowait.unwrap_or(0);
            let total = cpu.user
                + cpu.nice
                + cpu.system
                + idle
                + cpu.irq.unwrap_or(0)
                + cpu.softirq.unwrap_or(0)
                + cpu.steal.unwrap_or(0);
            let now = (total - idle.min(total), total);
            if let Some(permille) = state.cpu.and_then(|before| busy_permille(before, now)) {
                values.insert("host_cpu_busy_permille".to_owned(), permille);
            }
            state.cpu = Some(now);
        }
        Err(error) => failed("/proc/stat", error),
    }
    match procfs::LoadAverage::current() {
        Ok(load) => {
            values.insert("host_load1_milli".to_owned(), (f64::from(load.one) * 1000.0).round() as u64);
        }
        Err(error) => failed("/proc/loadavg", error),
    }
    match procfs::Uptime::current() {
        Ok(uptime) => {
            values.insert("host_uptime_seconds".to_owned(), uptime.uptime as u64);
        }
        Err(error) => failed("/proc/uptime", error),
    }
    match procfs::net::dev_status() {
        Ok(interfaces) => {
            for (name, device) in interfaces {
                values.insert(per("host_network_receive_bytes_total", "device", &name), device.recv_bytes);
                values.insert(per("host_network_transmit_bytes_total", "device", &name), device.sent_bytes);
            }
        }
        Err(error) => failed("/proc/net/dev", error),
    }
    match procfs::diskstats() {
        Ok(disks) => {
            // Whole disks only (partitions would count the same bytes
            // twice), and no loop or RAM devices.
            let whole = |name: &str| !in_memory(name) && std::path::Path::new("/sys/block").join(name).exists();
            for disk in disks.into_iter().filter(|disk| whole(&disk.name)) {
                // /proc/diskstats counts 512-byte sectors, whatever the disk's own.
                values.insert(per("host_disk_read_bytes_total", "device", &disk.name), disk.sectors_read * 512);
                values.insert(per("host_disk_written_bytes_total", "device", &disk.name), disk.sectors_written * 512);
            }
        }
        Err(error) => failed("/proc/diskstats", error),
    }
    match procfs::mounts() {
        Ok(mounts) => filesystems(mounts, &mut values, &mut failures),
        Err(error) => failed("/proc/mounts", error),
    }
    let mut round = Round { values: Vec::with_capacity(values.len()), failures };
    for (name, value) in values {
        match keep_name(state, &name) {
            Ok(name) => round.values.push((name, i64::try_from(value).unwrap_or(i64::MAX))),
            Err(reason) => round.failures.push(Failure::new(reason, name)),
        }
    }
    round
}

/// Per mounted block device (once, at its shortest mount point): free
/// bytes, bytes free to unprivileged users (what `df` shows as available),
/// and total bytes.
fn filesystems(mounts: Vec<procfs::MountEntry>, values: &mut BTreeMap<String, u64>, failures: &mut Vec<Failure>) {
    let mut devices: BTreeMap<String, String> = BTreeMap::new();
    for mount in mounts.into_iter().filter(|mount| mount.fs_spec.starts_with("/dev/")) {
        let shortest = devices.entry(mount.fs_spec).or_insert_with(|| mount.fs_file.clone());
        if mount.fs_file.len() < shortest.len() {
            *shortest = mount.fs_file;
        }
    }
    for point in devices.into_values() {
        match rustix::fs::statvfs(point.as_str()) {
            Ok(fs) => {
                values.insert(
                    per("host_filesystem_free_bytes", "mountpoint", &point),
                    fs.f_bfree.saturating_mul(fs.f_frsize),
                );
                let avail = fs.f_bavail.saturating_mul(fs.f_frsize);
                values.insert(per("host_filesystem_avail_bytes", "mountpoint", &point), avail);
                values.insert(
                    per("host_filesystem_size_bytes", "mountpoint", &point),
                    fs.f_blocks.saturating_mul(fs.f_frsize),
                );
            }
            Err(error) => failures.push(Failure::new("unreadable", format!("statvfs {point}: {error}"))),
        }
    }
}

/// Busy CPU time between two samples (busy, total), in thousandths.
fn busy_permille(before: (u64, u64), now: (u64, u64)) -> Option<u64> {
    let total = now.1.checked_sub(before.1).filter(|total| *total > 0)?;
    let busy = now.0.saturating_sub(before.0).min(total);
    Some((busy * 1000 + total / 2) / total)
}

/// The one kept copy of `name`, or why it is not a sensor.
fn keep_name(state: &mut State, name: &str) -> Result<&'static str, &'static str> {
    if let Some(&kept) = state.known.get(name) {
        return Ok(kept);
    }
    check_sensor_name(name).map_err(|_| "bad_name")?;
    if state.known.len() >= MOST_SENSORS {
        return Err("too_many_sensors");
    }
    let kept = sensor_name(name);
    state.known.insert(kept);
    Ok(kept)
}

/// The name of `metric`'s reading for one device or mount point, as a
/// Prometheus user queries it: `metric{label="value"}` (the value escaped
/// as the exposition format escapes it).
fn per(metric: &str, label: &str, value: &str) -> String {
    let value = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    format!("{metric}{{{label}=\"{value}\"}}")
}

/// Whether block device `name` lives in memory or in a file, not on a disk:
/// loop devices, RAM disks (`ram0`), compressed RAM (`zram0`, swap and
/// /tmp on many distributions).
fn in_memory(name: &str) -> bool {
    ["loop", "ram", "zram"].iter().any(|prefix| name.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MemTotal from /proc/meminfo, read here without procfs.
    fn mem_total_kib() -> u64 {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let line = meminfo.lines().find(|line| line.starts_with("MemTotal:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn reads_this_machine_with_plausible_values_and_growing_counters() {
        let mut host = Host::new();
        let first = host.read().await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let second = host.read().await;
        assert!(first.failures.is_empty() && second.failures.is_empty(), "{:?}", second.failures);
        let values = |round: &Round| -> BTreeMap<&str, i64> { round.values.iter().copied().collect() };
        let (before, after) = (values(&first), values(&second));
        assert_eq!(after["host_memory_total_bytes"], mem_total_kib() as i64 * 1024);
        assert!((1..=after["host_memory_total_bytes"]).contains(&after["host_memory_available_bytes"]));
        assert!(!before.contains_key("host_cpu_busy_permille"), "no share before a second sample");
        assert!((0..=1000).contains(&after["host_cpu_busy_permille"]));
        assert!(after["host_load1_milli"] >= 0);
        assert!(after["host_uptime_seconds"] > 0);
        assert!(after.contains_key("host_network_receive_bytes_total{device=\"lo\"}"), "{:?}", after.keys());
        for (name, value) in &after {
            assert!(name.starts_with(crate::config::HOST_PREFIX), "{name}");
            if name.ends_with("_total") || name.contains("_total{") || name.starts_with("host_uptime") {
                assert!(*value >= before[name], "{name} went from {} to {value}", before[name]);
            }
        }
        let filesystems = after.keys().filter(|name| name.starts_with("host_filesystem_free_bytes{")).count();
        let disks = after.keys().filter(|name| name.starts_with("host_disk_read_bytes_total{")).count();
        eprintln!("{} host sensors, {filesystems} filesystems, {disks} disks", after.len());
    }

    #[test]
    fn loop_ram_and_zram_devices_are_not_disks() {
        for name in ["loop0", "ram0", "zram0", "zram12"] {
            assert!(in_memory(name), "{name}");
        }
        for name in ["sda", "nvme0n1", "vda", "xvdb", "md0", "dm-0"] {
            assert!(!in_memory(name), "{name}");
        }
    }

    #[test]
    fn busy_share_is_rounded_thousandths_of_the_elapsed_time() {
        assert_eq!(busy_permille((0, 0), (1, 3)), Some(333));
        assert_eq!(busy_permille((10, 100), (60, 200)), Some(500));
        assert_eq!(busy_permille((10, 100), (10, 100)), None, "no time passed");
        assert_eq!(busy_permille((10, 100), (5, 50)), None, "the counters went back");
    }
}
