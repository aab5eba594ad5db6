//! Real sources (host, files, a command) beside the simulated sensors, from
//! the node binary to the sink's file; and their configuration.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{Process, node_config, scratch, summary_fields, vars};
use telemetry_node::config::{ConfigError, NodeConfig};

/// Every (sensor, sequence, value) the sink wrote, in file order.
fn written(path: &std::path::Path) -> Vec<(String, u64, i64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("each output line is JSON");
            let name = value["sensor_name"].as_str().expect("sensor_name").to_owned();
            (name, value["sequence"].as_u64().expect("sequence"), value["value"].as_i64().expect("value"))
        })
        .collect()
}

/// The value of the metric line that starts with `prefix` on `port`.
fn metric(port: u16, prefix: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.lines().find(|line| line.starts_with(prefix))?.rsplit(' ').next()?.parse().ok()
}

#[test]
fn host_file_exec_and_simulated_readings_all_reach_the_sink_under_their_names() {
    let dir = scratch("sources");
    let (sink, address) = Process::start_sink(
        "sink",
        &[
            ("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()),
            ("FILE_PATH", "out".into()),
            ("BUFFER_FLUSH_INTERVAL", "100ms".into()),
        ],
        &dir,
    );
    let socket = address.to_string();
    let zones = dir.join("thermal");
    for zone in ["zone0", "zone1"] {
        std::fs::create_dir_all(zones.join(zone)).unwrap();
        std::fs::write(zones.join(zone).join("temp"), "41000\n").unwrap();
    }
    let level = dir.join("level");
    std::fs::write(&level, "1").unwrap();
    let script = dir.join("readings.sh");
    let script_text = "echo 'queue_depth 7'\necho 'jobs_running 3'\necho \"token_length ${#SINK_AUTH_TOKEN}\"\n";
    std::fs::write(&script, script_text).unwrap();
    let files =
        format!("level={},gone={},{}/zone*/temp", level.display(), dir.join("no-such-file").display(), zones.display());
    let node = Process::start(
        "node",
        env!("CARGO_BIN_EXE_telemetry-node"),
        &[],
        &[
            ("GRPC_SERVER_SOCKET", socket),
            ("NODE_ID", "sources".into()),
            ("SENSOR_COUNT", "2".into()),
            ("SENSOR_VALUE_RATE_PER_SECOND", "20".into()),
            ("REQUEST_RATE_PER_SECOND", "20".into()),
            ("BATCH_TIMEOUT", "200ms".into()),
            ("HOST_INTERVAL", "250ms".into()),
            ("FILE_SENSORS", files),
            ("FILE_INTERVAL", "100ms".into()),
            ("EXEC_COMMAND", format!("/bin/sh {}", script.display())),
            ("EXEC_INTERVAL", "300ms".into()),
            ("METRICS_ADDR", "127.0.0.1:0".into()),
            ("SINK_AUTH_TOKEN", "not-for-the-command".into()),
        ],
        &dir,
    );
    // The file is rewritten while the node reads it.
    for value in 2..=20 {
        std::thread::sleep(Duration::from_millis(100));
        let next = dir.join("level.next");
        std::fs::write(&next, value.to_string()).unwrap();
        std::fs::rename(&next, &level).unwrap();
    }
    let metrics = node.metrics_address().port();
    let missing = metric(metrics, "telemetry_node_readings_failed_total{source=\"file\",reason=\"missing\"}");
    let (code, stdout, node_log) = node.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{node_log}");
    let (code, _, sink_log) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{sink_log}");

    let summary = summary_fields(&stdout);
    let lines = written(&dir.join("out/readings.jsonl"));
    assert_eq!(lines.len() as u64, summary["produced"], "every produced reading reached the sink");
    assert_eq!((summary["acked"], summary["dropped"]), (summary["produced"], 0));
    assert!(missing.is_some_and(|n| n > 0), "the missing file is counted: {missing:?}");
    assert!(summary["failed"] > 0, "{stdout}");
    let logged = node_log.lines().filter(|line| line.contains("could not take a reading")).collect::<Vec<_>>();
    assert!(logged.len() == 1 && logged[0].contains("no-such-file"), "logged once a minute: {node_log}");

    let mut per_sensor: BTreeMap<&str, Vec<(u64, i64)>> = BTreeMap::new();
    for (name, sequence, value) in &lines {
        per_sensor.entry(name).or_default().push((*sequence, *value));
    }
    for (name, readings) in &per_sensor {
        assert!(readings.windows(2).all(|w| w[0].0 < w[1].0), "{name}: sequences only grow");
    }
    for simulated in ["sensor-1", "sensor-2"] {
        let sequences: Vec<u64> = per_sensor[simulated].iter().map(|r| r.0).collect();
        assert_eq!(sequences, (0..sequences.len() as u64).collect::<Vec<_>>(), "{simulated}");
    }
    let total = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: i64 = total.lines().next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(per_sensor["host_memory_total_bytes"].iter().all(|r| r.1 == kib * 1024));
    for name in ["host_memory_available_bytes", "host_cpu_busy_permille", "host_load1_milli", "host_uptime_seconds"] {
        assert!(per_sensor.contains_key(name), "{name}: {:?}", per_sensor.keys());
    }
    assert!(per_sensor.contains_key("host_network_receive_bytes_total{device=\"lo\"}"));
    assert!(per_sensor["zone0"].iter().chain(&per_sensor["zone1"]).all(|r| r.1 == 41000));
    let levels: Vec<i64> = per_sensor["level"].iter().map(|r| r.1).collect();
    assert!(levels.windows(2).all(|w| w[0] <= w[1]) && levels.len() > 5, "{levels:?}");
    assert!(*levels.last().unwrap() >= 15, "the rewritten value is read: {levels:?}");
    assert!(!per_sensor.contains_key("gone"));
    assert!(per_sensor["queue_depth"].iter().all(|r| r.1 == 7) && per_sensor["jobs_running"].len() >= 3);
    assert!(per_sensor["token_length"].iter().all(|r| r.1 == 0), "the command never sees the sink's token");
}

#[test]
fn bad_source_settings_name_their_variable() {
    let dir = scratch("source-config");
    std::fs::write(dir.join("t"), "1").unwrap();
    let file = dir.join("t").display().to_string();
    let invalid = [
        (vec![("HOST_INTERVAL", "0s")], "HOST_INTERVAL"),
        (vec![("HOST_INTERVAL", "often")], "HOST_INTERVAL"),
        (vec![("FILE_INTERVAL", "0ms")], "FILE_INTERVAL"),
        (vec![("EXEC_INTERVAL", "x")], "EXEC_INTERVAL"),
        (vec![("EXEC_TIMEOUT", "0s")], "EXEC_TIMEOUT"),
        (vec![("EXEC_SHELL", "maybe")], "EXEC_SHELL"),
        (vec![("EXEC_COMMAND", "/no/such/program --flag")], "EXEC_COMMAND"),
        (vec![("EXEC_COMMAND", "no-such-program-anywhere")], "EXEC_COMMAND"),
        (vec![("SENSOR_COUNT", "0")], "SENSOR_COUNT"),
        (vec![("SENSOR_COUNT", "0"), ("FILE_SENSORS", " , ")], "SENSOR_COUNT"),
    ];
    for (pairs, variable) in invalid {
        let pairs: Vec<(&str, String)> = pairs.into_iter().map(|(k, v)| (k, v.to_owned())).collect();
        let error = NodeConfig::from_vars(&vars(&pairs)).unwrap_err();
        let ConfigError::Invalid { variable: named, .. } = &error else { panic!("{error}") };
        assert_eq!(*named, variable, "{error}");
    }
    let unusable = [
        (vec![("FILE_SENSORS", "t=relative/path".to_owned())], "not name=/absolute/path"),
        (vec![("FILE_SENSORS", file.clone())], "names no sensor"),
        (vec![("FILE_SENSORS", format!("{}/none-*", dir.display()))], "matches no file"),
        (vec![("FILE_SENSORS", format!("a={file},a={file}"))], "given twice"),
        (vec![("FILE_SENSORS", format!("sensor={file}"))], "taken by the simulated or host sensors"),
        (vec![("FILE_SENSORS", format!("host_x={file}")), ("HOST_INTERVAL", "1s".into())], "taken by"),
    ];
    for (pairs, why) in unusable {
        let error = NodeConfig::from_vars(&vars(&pairs)).unwrap_err();
        let ConfigError::Unusable { variable, .. } = &error else { panic!("{error}") };
        assert_eq!(*variable, "FILE_SENSORS");
        assert!(error.to_string().contains(why), "{error}");
    }
    // Another source lets the simulated sensors go; a name outside the
    // host's prefix is free beside it.
    let config = node_config(&[("SENSOR_COUNT", "0".into()), ("FILE_SENSORS", format!("host={file}"))]);
    assert_eq!(config.file_sensors().unwrap().len(), 1);
    node_config(&[("SENSOR_COUNT", "0".into()), ("HOST_INTERVAL", "1s".into())]);
    node_config(&[("SENSOR_COUNT", "0".into()), ("EXEC_COMMAND", "echo a 1".into())]);

    let (code, _, stderr) = Process::start(
        "bad-files",
        env!("CARGO_BIN_EXE_telemetry-node"),
        &[],
        &[("FILE_SENSORS", "x=nowhere".into())],
        &dir,
    )
    .wait(Duration::from_secs(20));
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("FILE_SENSORS=\"x=nowhere\""), "{stderr}");
}

#[test]
fn a_hanging_command_and_a_missing_file_with_the_default_settings() {
    let dir = scratch("sources-defaults");
    let (sink, address) =
        Process::start_sink("sink", &[("GRPC_SERVER_SOCKET", "127.0.0.1:0".into()), ("FILE_PATH", "out".into())], &dir);
    let socket = address.to_string();
    // Prints a reading, then hangs with a child of its own: killed, with the
    // child, at the default EXEC_TIMEOUT (5 s).
    let marker = format!("tn-defaults-hang-{}", std::process::id());
    let script = dir.join("hang.sh");
    std::fs::write(&script, format!("echo 'stuck 1'\n(sleep 60 || echo {marker}) &\nsleep 60 || echo {marker}\n"))
        .unwrap();
    let node = Process::start(
        "node",
        env!("CARGO_BIN_EXE_telemetry-node"),
        &[],
        &[
            ("GRPC_SERVER_SOCKET", socket),
            ("METRICS_ADDR", "127.0.0.1:0".into()),
            ("EXEC_COMMAND", format!("/bin/sh {}", script.display())),
            ("FILE_SENSORS", format!("gone={}", dir.join("no-such-file").display())),
        ],
        &dir,
    );
    let metrics = node.metrics_address().port();
    // The first run times out at 5 s, the second starts at 10 s: polled
    // until the first is counted, not read at a fixed moment.
    let counted = || {
        let timeouts = metric(metrics, "telemetry_node_readings_failed_total{source=\"exec\",reason=\"timeout\"}");
        let missing = metric(metrics, "telemetry_node_readings_failed_total{source=\"file\",reason=\"missing\"}");
        (timeouts, missing)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(9);
    while counted().0.is_none_or(|n| n < 1) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // The group's children die with it; give the kernel a moment to reap.
    std::thread::sleep(Duration::from_millis(300));
    let (timeouts, missing) = counted();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|line| String::from_utf8_lossy(&line).into_owned())
        .filter(|line| line.contains(&marker))
        .collect();
    let (code, stdout, node_log) = node.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{node_log}");
    let (code, _, sink_log) = sink.terminate(Duration::from_secs(30));
    assert_eq!(code, 0, "{sink_log}");
    assert_eq!((timeouts, missing), (Some(1), Some(1)), "one run timed out, one read found no file");
    assert_eq!(left, Vec::<String>::new(), "the hanging command's group is gone");
    let summary = summary_fields(&stdout);
    assert_eq!((summary["acked"], summary["dropped"]), (summary["produced"], 0), "{stdout}");
    let lines = written(&dir.join("out/readings.jsonl"));
    assert_eq!(lines.len() as u64, summary["produced"]);
    assert!(lines.iter().all(|(name, _, _)| name == "sensor"), "the hanging run gave nothing: {lines:?}");
}

/// The processes whose parent is `pid`: (pid, state, command line).
fn children_of(pid: u32) -> Vec<(u32, char, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) S ppid …": the name may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(") ") else { continue };
        let mut fields = rest.split(' ');
        let state = fields.next().and_then(|state| state.chars().next()).unwrap_or('?');
        if fields.next().and_then(|ppid| ppid.parse::<u32>().ok()) == Some(pid) {
            let command = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default();
            found.push((child, state, command.replace('\0', " ")));
        }
    }
    found
}

#[test]
fn a_node_running_as_pid_1_leaves_no_zombie_and_no_process_of_its_command_with_the_default_settings() {
    // As the shipped image runs it: PID 1 of its own PID namespace, no init.
    let dir = scratch("pid-1");
    let runs = dir.join("runs");
    // A process that stays in the command's group (killed at the run's end,
    // then re-parented to PID 1) and one that leaves it (setsid), each run.
    let command = format!(
        "sleep 300 >/dev/null 2>&1 & setsid sleep 301 >/dev/null 2>&1 & echo run >> {}; echo runs 1",
        runs.display()
    );
    let env = [
        ("EXEC_SHELL", "true".to_owned()),
        ("EXEC_COMMAND", command),
        ("PATH", std::env::var("PATH").unwrap_or_default()),
        ("GRPC_SERVER_SOCKET", format!("127.0.0.1:{}", common::free_port())),
    ];
    let node_binary = env!("CARGO_BIN_EXE_telemetry-node");
    let args = ["--pid", "--fork", "--mount-proc", "--kill-child", node_binary];
    let namespace = Process::start("unshare", "unshare", &args, &env, &dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let node = loop {
        match children_of(namespace.child.id()).first() {
            Some((pid, _, _)) => break *pid,
            None if std::time::Instant::now() > deadline => {
                let (_, _, stderr) = namespace.wait(Duration::from_secs(5));
                if std::env::var_os("CI").is_none() && stderr.contains("unshare failed") {
                    eprintln!("skipped: cannot make a PID namespace here (needs root): {stderr}");
                    return;
                }
                panic!("the node did not start in a PID namespace: {stderr}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    // The default EXEC_INTERVAL is 10 s: the second run comes after it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&runs).unwrap_or_default().lines().count() < 2 {
        assert!(std::time::Instant::now() < deadline, "the command did not run twice");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Each run leaves two processes behind; give the node a moment to deal
    // with the second run's.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut left = children_of(node);
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = children_of(node);
    }
    assert_eq!(left, Vec::new(), "left behind by the node as PID 1");
    let (code, _, stderr) = {
        // SAFETY: kill(2) on the node this test started, found by its PID.
        assert_eq!(unsafe { libc::kill(node as i32, libc::SIGTERM) }, 0);
        namespace.wait(Duration::from_secs(20))
    };
    assert_eq!(code, 0, "{stderr}");
}
