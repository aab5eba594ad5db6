//! Network trouble across hosts of their own (network namespaces on a
//! switch, `common::netns`): partitions that drop packets without a word,
//! answers lost on the way back, connections a NAT forgot, an address that
//! moves, a sink replica that hangs, a database cut off, a flapping link,
//! and a stop during a partition. Node, sink and database are the real
//! binaries, each with its **default** settings but where a scenario says
//! otherwise (the README's quick-start load of four sensors). Every
//! scenario checks that nothing is lost, nothing is stored twice, and every
//! drop is counted with its reason; each prints how long delivery was
//! interrupted after the heal (docs/delivery.md keeps the table).

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{
    Process, assert_complete_and_ordered,
    database::{Database, assert_each_reading_once},
    netns::{Host, Net},
    scratch, summary_fields,
};

const NODE: &str = env!("CARGO_BIN_EXE_telemetry-node");
const SINK: &str = env!("CARGO_BIN_EXE_telemetry-sink");
/// The sinks' port, the same on every host.
const PORT: u16 = 8000;

/// The default RPC_TIMEOUT and GRPC_CLIENT_RETRY_MAX_INTERVAL, and the
/// bound they set on how long delivery stays interrupted after a heal:
/// an attempt under way may wait out RPC_TIMEOUT, the next comes at most
/// the cap later, and its batch had waited up to BATCH_TIMEOUT (1 s).
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_CAP: Duration = Duration::from_secs(5);
const AFTER_HEAL: Duration = Duration::from_secs(5 + 5 + 1);
/// Room for a loaded machine on top of a bound.
const SLACK: Duration = Duration::from_secs(2);

fn seconds(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A sink on `host`, writing JSON lines under `dir/name`, with `env` on
/// top of its defaults; started once it says it listens.
fn start_sink(host: &Host, name: &'static str, dir: &Path, env: &[(&str, String)]) -> Process {
    let mut all = vec![("GRPC_SERVER_SOCKET", format!("0.0.0.0:{PORT}")), ("FILE_PATH", name.to_owned())];
    all.extend(env.iter().cloned());
    let sink = host.start(name, SINK, &[], &all, dir);
    sink.sink_address();
    sink
}

/// A node on `host` named `name` with four sensors, sending to `to`, with
/// `env` on top of its defaults.
fn start_node(host: &Host, name: &'static str, to: &str, dir: &Path, env: &[(&str, String)]) -> Process {
    let mut all =
        vec![("GRPC_SERVER_SOCKET", to.to_owned()), ("SENSOR_COUNT", "4".to_owned()), ("NODE_ID", name.to_owned())];
    all.extend(env.iter().cloned());
    host.start(name, NODE, &[], &all, dir)
}

/// The sink socket at `host`.
fn socket(host: &Host) -> String {
    format!("{}:{PORT}", host.address)
}

/// Stops `node` (SIGTERM), checks that it exits 0 in time, and returns its
/// summary.
fn stop_node(node: Process) -> HashMap<String, u64> {
    node.signal(libc::SIGTERM);
    exited(node)
}

/// Waits for `node`, already signalled, to exit 0 in time, and returns its
/// summary.
fn exited(node: Process) -> HashMap<String, u64> {
    let (code, stdout, stderr) = node.wait(seconds(40));
    assert_eq!(code, 0, "{stderr}");
    summary_fields(&stdout)
}

/// The readings in the sink files `files`, per node: (sensor, sequence).
fn written(files: &[PathBuf]) -> BTreeMap<String, Vec<(String, u64)>> {
    let mut per_node: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(file.join("readings.jsonl")).unwrap_or_default();
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).expect("each output line is JSON");
            let node = value["node_id"].as_str().unwrap_or_default().to_owned();
            let sensor = value["sensor_name"].as_str().expect("sensor_name").to_owned();
            per_node.entry(node).or_default().push((sensor, value["sequence"].as_u64().expect("sequence")));
        }
    }
    per_node
}

/// How many readings the sink files `files` hold.
fn lines(files: &[PathBuf]) -> usize {
    files
        .iter()
        .map(|file| std::fs::read_to_string(file.join("readings.jsonl")).map_or(0, |text| text.lines().count()))
        .sum()
}

/// How long after now the files first hold more than `held` readings;
/// fails after `limit`.
fn resumed(files: &[PathBuf], held: usize, limit: Duration) -> Duration {
    let started = Instant::now();
    while lines(files) <= held {
        assert!(started.elapsed() < limit, "nothing more delivered within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// Every reading `summary` says the node produced is in `readings` once,
/// each sensor's in order, and the node acknowledged them all, dropped and
/// missed none.
fn assert_all_once(name: &str, summary: &HashMap<String, u64>, readings: &[(String, u64)]) {
    let per_sensor = assert_complete_and_ordered(readings);
    assert_eq!(per_sensor.values().sum::<u64>(), summary["produced"], "{name}: {summary:?}");
    assert_eq!(
        (summary["acked"], summary["dropped"], summary["missed"]),
        (summary["produced"], 0, 0),
        "{name}: {summary:?}"
    );
}

/// No reading of `readings` is there twice.
fn assert_none_twice(name: &str, readings: &[(String, u64)]) {
    let mut seen = std::collections::BTreeSet::new();
    for reading in readings {
        assert!(seen.insert(reading), "{name}: {reading:?} is stored twice");
    }
}

/// Scenario 1: the node and the sink cannot reach each other for 20 s in
/// the middle of a steady load; nothing answers either side.
#[test]
fn a_twenty_second_partition_loses_and_duplicates_nothing_with_the_default_settings() {
    let Some(mut net) = Net::new() else { return };
    let (node_host, sink_host) = (net.host("node"), net.host("sink"));
    let dir = scratch("net-partition");
    let files = [dir.join("sink")];
    let sink = start_sink(&sink_host, "sink", &dir, &[]);
    let node = start_node(&node_host, "node", &socket(&sink_host), &dir, &[]);
    std::thread::sleep(seconds(5));
    net.cut(&node_host, &sink_host);
    std::thread::sleep(seconds(20));
    let held = lines(&files);
    net.heal(&node_host, &sink_host);
    let after = resumed(&files, held, AFTER_HEAL + SLACK);
    eprintln!("partition of 20 s: delivery resumed {after:?} after the heal");
    std::thread::sleep(seconds(5));
    let summary = stop_node(node);
    drop(sink);
    assert!(summary["retries"] > 0, "the partition was felt: {summary:?}");
    assert_all_once("node", &summary, &written(&files)["node"]);
}

/// Scenario 2: the sink gets the node's requests and writes them, but its
/// answers are lost for 10 s: the batches sent again are written once.
#[test]
fn answers_lost_on_the_way_back_are_not_written_twice_with_the_default_settings() {
    let Some(mut net) = Net::new() else { return };
    let (node_host, sink_host) = (net.host("node"), net.host("sink"));
    let dir = scratch("net-lost-answers");
    let files = [dir.join("sink")];
    let sink = start_sink(&sink_host, "sink", &dir, &[]);
    let node = start_node(&node_host, "node", &socket(&sink_host), &dir, &[]);
    std::thread::sleep(seconds(5));
    let before = lines(&files);
    net.cut_one_way(&node_host, &sink_host);
    std::thread::sleep(seconds(10));
    let during = lines(&files);
    net.heal_one_way(&node_host, &sink_host);
    let after = resumed(&files, during, AFTER_HEAL + SLACK);
    eprintln!("answers lost for 10 s: delivery resumed {after:?} after the heal");
    std::thread::sleep(seconds(5));
    let summary = stop_node(node);
    let (code, _, stderr) = sink.terminate(seconds(30));
    assert_eq!(code, 0, "{stderr}");
    assert!(during > before, "the sink took requests whose answers were lost ({before} → {during})");
    assert!(summary["retries"] > 0, "{summary:?}");
    assert_all_once("node", &summary, &written(&files)["node"]);
}

/// Scenario 3: one sensor reading every 10 s, so the connection is idle in
/// between. A partition that begins and ends between two readings costs
/// nothing; a connection that a NAT forgot (its packets dropped for good,
/// new connections let through) holds the next reading one RPC_TIMEOUT,
/// then a new connection carries it.
#[test]
fn an_idle_connection_found_dead_holds_a_reading_one_rpc_timeout_at_most_with_the_default_settings() {
    let Some(mut net) = Net::new() else { return };
    let (node_host, sink_host) = (net.host("node"), net.host("sink"));
    let dir = scratch("net-idle");
    let files = [dir.join("sink")];
    let sink = start_sink(&sink_host, "sink", &dir, &[]);
    let every = seconds(10);
    let env = [("SENSOR_COUNT", "1".into()), ("SENSOR_VALUE_RATE_PER_SECOND", "0.1".into())];
    let node = start_node(&node_host, "node", &socket(&sink_host), &dir, &env);
    // Arrival of each reading; the first sets the usual delay.
    let first = Instant::now() + resumed(&files, 0, seconds(20));
    let arrival = |n: usize| Instant::now() + resumed(&files, n - 1, every + RPC_TIMEOUT + RETRY_CAP + SLACK);
    // Between the first and the second reading: cut and healed.
    std::thread::sleep(seconds(3));
    net.cut(&node_host, &sink_host);
    std::thread::sleep(seconds(4));
    net.heal(&node_host, &sink_host);
    let late = arrival(2).duration_since(first).saturating_sub(every);
    eprintln!("idle connection partitioned and healed: the next reading {late:?} later than usual");
    assert!(late < SLACK, "{late:?}");
    // Between the second and the third: the connection is forgotten.
    std::thread::sleep(seconds(3));
    assert!(net.forget_connections(&node_host, &sink_host, PORT) >= 1, "the node holds a connection");
    let late = arrival(3).duration_since(first).saturating_sub(every * 2);
    eprintln!("idle connection forgotten by the network: the next reading {late:?} later than usual");
    // One RPC_TIMEOUT on the dead connection, then the first retry's wait
    // (GRPC_CLIENT_RETRY_SEND_INTERVAL, 1 s, jittered).
    assert!(late <= RPC_TIMEOUT + seconds(1) + SLACK, "{late:?}");
    let summary = stop_node(node);
    drop(sink);
    assert_all_once("node", &summary, &written(&files)["node"]);
}

/// Scenario 4: a 40 s partition, far past the retry budget (after five
/// failures one lane probes for all), for three nodes at once: the default
/// overflow queue, the spool, and a node that gives a batch up after three
/// retries. What each does is what docs/delivery.md says: the first two
/// lose nothing, the third drops what it gave up, counted by reason, and
/// the sink holds exactly what each acknowledged.
#[test]
fn a_partition_past_the_retry_budget_ends_as_the_docs_say_with_the_default_settings() {
    let Some(mut net) = Net::new() else { return };
    let sink_host = net.host("sink");
    let hosts = [net.host("queue"), net.host("spool"), net.host("limited")];
    let dir = scratch("net-long");
    let files = [dir.join("sink")];
    let sink = start_sink(&sink_host, "sink", &dir, &[]);
    let spool = dir.join("spool-dir");
    let to = socket(&sink_host);
    let nodes = [
        start_node(&hosts[0], "queue", &to, &dir, &[]),
        start_node(
            &hosts[1],
            "spool",
            &to,
            &dir,
            &[("OVERFLOW_POLICY", "spool".into()), ("SPOOL_DIR", spool.display().to_string())],
        ),
        start_node(&hosts[2], "limited", &to, &dir, &[("GRPC_CLIENT_MAX_RETRY_ATTEMPTS_NUMBER", "3".into())]),
    ];
    std::thread::sleep(seconds(5));
    for host in &hosts {
        net.cut(host, &sink_host);
    }
    std::thread::sleep(seconds(40));
    let held = lines(&files);
    for host in &hosts {
        net.heal(host, &sink_host);
    }
    let after = resumed(&files, held, AFTER_HEAL + SLACK);
    eprintln!("partition of 40 s: delivery resumed {after:?} after the heal");
    std::thread::sleep(seconds(8));
    let [queue, spooling, limited] = nodes.map(stop_node);
    drop(sink);
    let stored = written(&files);
    assert_all_once("queue", &queue, &stored["queue"]);
    assert_all_once("spool", &spooling, &stored["spool"]);
    assert!(spooling["spooled"] > 0 && spooling["in_spool"] == 0, "{spooling:?}");
    // The limited node gave batches up, and said why; what it kept is there once.
    assert!(limited["dropped"] > 0, "{limited:?}");
    assert_eq!(limited["produced"], limited["acked"] + limited["dropped"], "{limited:?}");
    assert_none_twice("limited", &stored["limited"]);
    assert_eq!(stored["limited"].len() as u64, limited["acked"], "{limited:?}");
}

/// Scenario 5: the name the node sends to moves to another sink (a
/// restarted pod with a new address), and the old address is cut off: the
/// node follows the name within one RPC_TIMEOUT and a retry.
#[test]
fn the_node_follows_its_sink_name_to_a_new_address_with_the_default_settings() {
    let Some(mut net) = Net::new() else { return };
    let (node_host, old, new) = (net.host("node"), net.host("old"), net.host("new"));
    let dir = scratch("net-moved");
    let (old_file, new_file) = (dir.join("sink-old"), dir.join("sink-new"));
    node_host.resolve("sink.test", old.address);
    let old_sink = start_sink(&old, "sink-old", &dir, &[]);
    let new_sink = start_sink(&new, "sink-new", &dir, &[]);
    let node = start_node(&node_host, "node", &format!("sink.test:{PORT}"), &dir, &[]);
    std::thread::sleep(seconds(5));
    node_host.resolve("sink.test", new.address);
    // The old sink takes no more requests; answers to those it took still
    // get back, so none is stored by both.
    net.cut_one_way(&old, &node_host);
    std::thread::sleep(seconds(1));
    net.cut_one_way(&node_host, &old);
    let moved = resumed(std::slice::from_ref(&new_file), 0, RPC_TIMEOUT + RETRY_CAP + SLACK);
    eprintln!("sink moved: the new address took its first request {moved:?} after the old one was cut off");
    std::thread::sleep(seconds(5));
    let summary = stop_node(node);
    drop((old_sink, new_sink));
    assert_all_once("node", &summary, &written(&[old_file, new_file])["node"]);
}

/// The sink's name resolves to two addresses, the first of which never
/// answers (a stale entry): each attempt gives every address a share of
/// RPC_TIMEOUT, so the node reaches the second within one attempt.
#[test]
fn a_name_whose_first_address_never_answers_reaches_the_next_with_the_default_settings() {
    let Some(mut net) = Net::new() else { return };
    // The dead address is nearer the node's than the live one, so that the
    // resolver's ordering keeps it first.
    let (node_host, dead, live) = (net.host("node"), net.host("dead"), net.host("live"));
    let dir = scratch("net-dead-first");
    let files = [dir.join("sink")];
    net.cut(&node_host, &dead);
    node_host.resolve_all("sink.test", &[dead.address, live.address]);
    let sink = start_sink(&live, "sink", &dir, &[]);
    let node = start_node(&node_host, "node", &format!("sink.test:{PORT}"), &dir, &[]);
    let first = resumed(&files, 0, RPC_TIMEOUT + SLACK + seconds(1));
    eprintln!("first address dead: the first request landed {first:?} after the start");
    std::thread::sleep(seconds(3));
    let summary = stop_node(node);
    drop(sink);
    assert_all_once("node", &summary, &written(&files)["node"]);
}

/// Scenario 6: two sink replicas behind one address that spreads
/// connections, as a Kubernetes Service does, both writing to one
/// database; the replica the node is connected to hangs (SIGSTOP) for
/// 40 s. The node gives up on the connection after one RPC_TIMEOUT and its
/// next connection goes to the healthy replica. What the hung replica took
/// before hanging, it writes when it wakes; the database stores it once.
#[test]
fn a_hung_sink_replica_is_left_within_one_rpc_timeout_with_the_default_settings() {
    let Some(mut net) = Net::new() else { return };
    let (node_host, first, second, db_host) = (net.host("node"), net.host("one"), net.host("two"), net.host("db"));
    let dir = scratch("net-replica");
    let Some(database) = Database::start_on(&db_host, &dir) else { return };
    let to_db = [("OUTPUT", "remote-write".into()), ("REMOTE_WRITE_URL", database.url())];
    let replicas = [start_sink(&first, "sink-one", &dir, &to_db), start_sink(&second, "sink-two", &dir, &to_db)];
    let service = Ipv4Addr::new(10, 0, 0, 100);
    net.spread(&node_host, service, PORT, &[&first, &second]);
    let node = start_node(
        &node_host,
        "node",
        &format!("{service}:{PORT}"),
        &dir,
        &[("METRICS_ADDR", "127.0.0.1:9100".into())],
    );
    std::thread::sleep(seconds(5));
    // The replica holding the node's connection hangs.
    let holding: Vec<usize> =
        [&first, &second].iter().map(|replica| replica.connections_from(&node_host, PORT)).collect();
    assert_eq!(holding.iter().sum::<usize>(), 1, "the node holds one connection: {holding:?}");
    let hung = usize::from(holding[0] == 0);
    replicas[hung].signal(libc::SIGSTOP);
    let stopped = Instant::now();
    // Readings acknowledged, from the node's own count.
    let acked = || -> u64 {
        let page = node_host.within(|| common::database::http_get(9100, "/metrics")).map(|(_, body)| body);
        page.unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("telemetry_node_readings_acked_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let at_stop = acked();
    while acked() <= at_stop {
        assert!(stopped.elapsed() < seconds(30), "no reading acknowledged within 30 s of the replica hanging");
        std::thread::sleep(Duration::from_millis(20));
    }
    let moved = stopped.elapsed();
    eprintln!("replica hung: the node's readings acknowledged again {moved:?} later");
    // One RPC_TIMEOUT on the hung replica, the first retry's wait (up to
    // 1 s), and its turn at the request rate (1 a second, shared by the
    // lanes that all failed at once).
    assert!(moved <= RPC_TIMEOUT + seconds(2) + SLACK, "{moved:?}");
    std::thread::sleep(seconds(40).saturating_sub(stopped.elapsed()));
    replicas[hung].signal(libc::SIGCONT);
    std::thread::sleep(seconds(5));
    let summary = stop_node(node);
    drop(replicas);
    assert_eq!((summary["acked"], summary["dropped"], summary["missed"]), (summary["produced"], 0, 0), "{summary:?}");
    assert_each_reading_once(&database, summary["produced"]);
}

/// Scenarios 7 and 2 for the database: cut off for 20 s from a sink
/// relaying to it and from a node writing to it itself, then for 10 s
/// taking requests whose answers are lost: nothing is acknowledged that the
/// database did not take, and in the end everything is stored once.
#[test]
fn a_database_cut_off_for_twenty_seconds_stores_everything_once_with_the_default_settings() {
    let Some(mut net) = Net::new() else { return };
    let (relayed, sink_host, direct, db_host) =
        (net.host("relayed"), net.host("sink"), net.host("direct"), net.host("db"));
    let dir = scratch("net-database");
    let Some(database) = Database::start_on(&db_host, &dir) else { return };
    let to_db = [("OUTPUT", "remote-write".into()), ("REMOTE_WRITE_URL", database.url())];
    let sink = start_sink(&sink_host, "sink", &dir, &to_db);
    let nodes = [
        start_node(&relayed, "relayed", &socket(&sink_host), &dir, &[]),
        start_node(
            &direct,
            "direct",
            "unused:1",
            &dir,
            &[("DESTINATION", "remote-write".into()), ("REMOTE_WRITE_URL", database.url())],
        ),
    ];
    std::thread::sleep(seconds(5));
    let inserted = || -> u64 {
        let page = database.get("/metrics").map(|(_, body)| body).unwrap_or_default();
        page.lines()
            .filter(|line| line.starts_with("vm_rows_inserted_total{type=\"promremotewrite\"}"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    net.cut(&sink_host, &db_host);
    net.cut(&direct, &db_host);
    std::thread::sleep(seconds(20));
    let held = inserted();
    net.heal(&sink_host, &db_host);
    net.heal(&direct, &db_host);
    let healed = Instant::now();
    while inserted() <= held {
        assert!(
            healed.elapsed() < AFTER_HEAL + SLACK,
            "the database got nothing within {:?} of the heal",
            AFTER_HEAL + SLACK
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("database cut off for 20 s: samples landed again {:?} after the heal", healed.elapsed());
    std::thread::sleep(seconds(5));
    // Then for 10 s the database takes what it is sent, but its answers are
    // lost: what is sent again is stored once.
    let before = inserted();
    net.cut_one_way(&sink_host, &db_host);
    net.cut_one_way(&direct, &db_host);
    std::thread::sleep(seconds(10));
    assert!(inserted() > before, "the database took requests whose answers were lost");
    net.heal_one_way(&sink_host, &db_host);
    net.heal_one_way(&direct, &db_host);
    std::thread::sleep(seconds(8));
    let [relayed, direct] = nodes.map(stop_node);
    let (code, _, stderr) = sink.terminate(seconds(30));
    assert_eq!(code, 0, "{stderr}");
    // The sink pushed the relayed node back; the direct node retried.
    assert!(relayed["pushbacks"] + relayed["retries"] > 0, "relayed: the cut was felt: {relayed:?}");
    assert!(direct["retries"] > 0, "direct: the cut was felt: {direct:?}");
    for (name, summary) in [("relayed", &relayed), ("direct", &direct)] {
        assert_eq!(
            (summary["acked"], summary["dropped"], summary["missed"]),
            (summary["produced"], 0, 0),
            "{name}: {summary:?}"
        );
    }
    assert_each_reading_once(&database, relayed["produced"] + direct["produced"]);
}

/// Scenario 8: the link goes down and up every 2 s for a minute under load.
#[test]
fn a_link_flapping_for_a_minute_loses_and_duplicates_nothing_with_the_default_settings() {
    let Some(mut net) = Net::new() else { return };
    let (node_host, sink_host) = (net.host("node"), net.host("sink"));
    let dir = scratch("net-flapping");
    let files = [dir.join("sink")];
    let sink = start_sink(&sink_host, "sink", &dir, &[]);
    let node = start_node(&node_host, "node", &socket(&sink_host), &dir, &[]);
    std::thread::sleep(seconds(3));
    // Cuts shorter than RPC_TIMEOUT are ridden out by TCP's own
    // retransmission, without a retry: the flapping is felt as cuts during
    // which nothing arrives.
    let mut felt = 0;
    for _ in 0..15 {
        net.cut(&node_host, &sink_host);
        let before = lines(&files);
        std::thread::sleep(seconds(2));
        felt += usize::from(lines(&files) == before);
        net.heal(&node_host, &sink_host);
        std::thread::sleep(seconds(2));
    }
    assert!(felt > 0, "no cut kept anything from the sink");
    let held = lines(&files);
    // Whatever is still held goes within the bound of a heal.
    let after = resumed(&files, held, AFTER_HEAL + SLACK);
    eprintln!("link flapping every 2 s for 60 s: delivering again {after:?} after the last heal");
    std::thread::sleep(seconds(8));
    let summary = stop_node(node);
    drop(sink);
    assert_all_once("node", &summary, &written(&files)["node"]);
}

/// Scenario 9: SIGTERM while the sink cannot be reached: the node's drain
/// ends by SHUTDOWN_TIMEOUT (10 s) whatever the network does, and every
/// reading it held is counted: dropped as `shutdown` with the default
/// overflow queue, kept in the spool (and delivered by the next run) with
/// the spool.
#[test]
fn a_stop_during_a_partition_ends_in_time_and_counts_every_reading_with_the_default_settings() {
    let Some(mut net) = Net::new() else { return };
    let (queue_host, spool_host, sink_host) = (net.host("queue"), net.host("spool"), net.host("sink"));
    let dir = scratch("net-stop");
    let files = [dir.join("sink")];
    let sink = start_sink(&sink_host, "sink", &dir, &[]);
    let to = socket(&sink_host);
    let spool_env = [("OVERFLOW_POLICY", "spool".into()), ("SPOOL_DIR", dir.join("spool-dir").display().to_string())];
    let queue = start_node(&queue_host, "queue", &to, &dir, &[]);
    let spooling = start_node(&spool_host, "spool", &to, &dir, &spool_env);
    std::thread::sleep(seconds(4));
    net.cut(&queue_host, &sink_host);
    net.cut(&spool_host, &sink_host);
    std::thread::sleep(seconds(4));
    let stopping = Instant::now();
    queue.signal(libc::SIGTERM);
    spooling.signal(libc::SIGTERM);
    // One signal each: a second one asks a node to stop at once.
    let (queue, spooling) = (exited(queue), exited(spooling));
    let took = stopping.elapsed();
    eprintln!("stopped during a partition: both nodes exited {took:?} after SIGTERM");
    assert!(took <= seconds(10) + SLACK, "SHUTDOWN_TIMEOUT is 10 s: {took:?}");
    assert!(queue["dropped"] > 0, "{queue:?}");
    assert_eq!(queue["produced"], queue["acked"] + queue["dropped"], "{queue:?}");
    assert!(spooling["in_spool"] > 0, "{spooling:?}");
    assert_eq!(spooling["produced"], spooling["acked"] + spooling["dropped"] + spooling["in_spool"], "{spooling:?}");
    // The next run, the network healed, delivers what the spool kept.
    net.heal(&spool_host, &sink_host);
    let next = start_node(&spool_host, "spool-next", &to, &dir, &spool_env);
    std::thread::sleep(seconds(5));
    let next = stop_node(next);
    drop(sink);
    assert_eq!(next.get("earlier_acked"), Some(&spooling["in_spool"]), "{next:?}");
    let stored = written(&files);
    assert_none_twice("queue", &stored["queue"]);
    assert_eq!(stored["queue"].len() as u64, queue["acked"]);
    let spooled = &stored["spool"];
    assert_none_twice("spool", spooled);
    assert_eq!(spooled.len() as u64, spooling["acked"] + spooling["in_spool"], "{next:?}");
    assert_all_once("spool-next", &next, &stored["spool-next"]);
}
