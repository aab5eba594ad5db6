//! Helpers shared by the integration tests: an in-memory transport, a
//! scripted gRPC sink, configurations from maps, and child processes that
//! are always stopped.
#![allow(dead_code, unreachable_pub)]

pub mod database;
pub mod netns;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prost::Message;
use telemetry_node::{
    config::{NodeConfig, SinkConfig},
    node::{Transport, codec::Outgoing},
    proto::{
        SensorValue, SensorValuesRequest, SensorValuesResponse,
        sensor_service_server::{SensorService, SensorServiceServer},
    },
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

/// A node configuration: the defaults, overridden by `pairs`.
pub fn node_config(pairs: &[(&str, String)]) -> NodeConfig {
    NodeConfig::from_vars(&vars(pairs)).expect("a valid test configuration")
}

/// A sink configuration: the defaults, overridden by `pairs`.
pub fn sink_config(pairs: &[(&str, String)]) -> SinkConfig {
    SinkConfig::from_vars(&vars(pairs)).expect("a valid test configuration")
}

/// The retry settings of a test that must not wait: the first retry after
/// 20 ms, none more than 200 ms apart, and no batch ever given up. Fault
/// tests run with these to be quick; each fault also runs once with the
/// defaults instead.
pub fn fast_retries() -> [(&'static str, String); 4] {
    [
        ("GRPC_CLIENT_MAX_RETRY_ATTEMPTS_NUMBER", "inf".into()),
        ("GRPC_CLIENT_RETRY_SEND_INTERVAL", "20ms".into()),
        ("GRPC_CLIENT_RETRY_MAX_INTERVAL", "200ms".into()),
        ("GRPC_CLIENT_RETRY_MAX_ELAPSED", "0s".into()),
    ]
}

pub fn vars(pairs: &[(&str, String)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// One request as a recipient saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// tokio's clock when it arrived.
    pub at: tokio::time::Instant,
    /// Its readings.
    pub items: Vec<SensorValue>,
}

/// What a recipient received, and what it should answer next.
#[derive(Debug, Default)]
pub struct Recorder {
    pub deliveries: Vec<Delivery>,
    /// Codes to answer the next calls with, in order, before accepting again.
    pub failures: VecDeque<Code>,
    /// Calls made, failed or not.
    pub calls: usize,
    /// How long the gRPC service takes to answer each call.
    pub delay: Duration,
}

/// A shared [`Recorder`].
#[derive(Debug, Clone, Default)]
pub struct Recording(pub Arc<Mutex<Recorder>>);

impl Recording {
    pub fn failing_with(codes: impl IntoIterator<Item = Code>) -> Self {
        let recording = Self::default();
        recording.0.lock().unwrap().failures.extend(codes);
        recording
    }

    fn receive(&self, items: Vec<SensorValue>) -> Result<(), Status> {
        let mut recorder = self.0.lock().unwrap();
        recorder.calls += 1;
        if let Some(code) = recorder.failures.pop_front() {
            return Err(Status::new(code, "scripted failure"));
        }
        recorder.deliveries.push(Delivery { at: tokio::time::Instant::now(), items });
        Ok(())
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.0.lock().unwrap().deliveries.clone()
    }

    pub fn calls(&self) -> usize {
        self.0.lock().unwrap().calls
    }

    /// Every reading received, in arrival order.
    pub fn readings(&self) -> Vec<(String, u64)> {
        let recorder = self.0.lock().unwrap();
        recorder.deliveries.iter().flat_map(|d| d.items.iter().map(|i| (i.sensor_name.clone(), i.sequence))).collect()
    }
}

/// The in-memory transport: hands each request to a [`Recording`].
impl Transport for Recording {
    async fn send(&self, request: Outgoing) -> Result<(), Status> {
        self.receive(SensorValuesRequest::decode(request.items).expect("the node encodes what prost decodes").items)
    }
}

/// The same recording behind a real gRPC service.
#[tonic::async_trait]
impl SensorService for Recording {
    async fn send_sensor_values(
        &self,
        request: Request<SensorValuesRequest>,
    ) -> Result<Response<SensorValuesResponse>, Status> {
        let delay = self.0.lock().unwrap().delay;
        tokio::time::sleep(delay).await;
        self.receive(request.into_inner().items).map(|()| Response::new(SensorValuesResponse {}))
    }
}

/// Serves `recording` on a free loopback port until `stop` is cancelled.
pub async fn serve_recording(recording: Recording, stop: CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SensorServiceServer::new(recording))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.cancelled_owned(),
            ),
    );
    address
}

/// Checks that `readings` holds, for every sensor, exactly the sequences
/// 0, 1, 2, ... in order, and returns how many each sensor has.
pub fn assert_complete_and_ordered(readings: &[(String, u64)]) -> BTreeMap<String, u64> {
    let mut next: BTreeMap<String, u64> = BTreeMap::new();
    for (sensor, sequence) in readings {
        let expected = next.entry(sensor.clone()).or_default();
        assert_eq!(*sequence, *expected, "sensor {sensor}: reading {sequence} arrived where {expected} was due");
        *expected += 1;
    }
    next
}

/// Reads the sink's JSON lines as (sensor, sequence) pairs.
pub fn read_output(path: &Path) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("each output line is JSON");
            (
                value["sensor_name"].as_str().expect("sensor_name").to_owned(),
                value["sequence"].as_u64().expect("sequence"),
            )
        })
        .collect()
}

/// A fresh folder under cargo's per-test scratch space.
pub fn scratch(name: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A free loopback port (free when asked; taken by the caller soon after).
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` different free loopback ports, for the servers that cannot start on
/// port 0: a sink restarted on the same port mid-test, and the databases
/// and relays the tests run (whose addresses are given on their command
/// line). Our binaries otherwise start on port 0 and report the address
/// they got ([`Process::start_sink`], [`Process::metrics_address`]).
///
/// They are drawn below the kernel's ephemeral range (32768 and up by
/// default), where bind-to-port-0 and outgoing connections never take a
/// port, so nothing else in the machine claims one between this check and
/// the server's own bind. A port is handed out once per test process.
pub fn free_ports<const N: usize>() -> [u16; N] {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (low, high) = ephemeral_range();
    // The wider stretch outside the ephemeral range, above 10000.
    let below = (10_000, low.saturating_sub(1));
    let above: (u16, u16) = (high.saturating_add(1).max(10_000), 65_535);
    let (from, to) = if below.1.saturating_sub(below.0) >= above.1.saturating_sub(above.0) { below } else { above };
    std::array::from_fn(|_| {
        loop {
            let port = from + fastrand::u16(..=(to - from));
            if !handed_out.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed_out.push(port);
                break port;
            }
        }
    })
}

/// The kernel's ephemeral port range, or Linux's default.
fn ephemeral_range() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range.split_whitespace().filter_map(|n| n.parse().ok());
    match (bounds.next(), bounds.next()) {
        (Some(low), Some(high)) => (low, high),
        _ => (32_768, 60_999),
    }
}

/// A child process that is killed by PID if the test ends without stopping it.
pub struct Process {
    pub child: Child,
    pub name: &'static str,
    /// Files that receive the process's stdout and stderr: pipes could
    /// fill up and stall it while the test is not reading.
    out: std::path::PathBuf,
    err: std::path::PathBuf,
}

impl Process {
    /// Starts `binary` with `args`, a clean environment plus `env`, in `dir`.
    pub fn start(name: &'static str, binary: &str, args: &[&str], env: &[(&str, String)], dir: &Path) -> Self {
        let (out, err) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.err")));
        let child = Command::new(binary)
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("the binary starts");
        Self { child, name, out, err }
    }

    /// Starts the sink binary with `env` (its `GRPC_SERVER_SOCKET` on port 0
    /// lets the kernel pick, so no port is picked, released and bound
    /// again), and returns it with the address it reports listening on.
    pub fn start_sink(name: &'static str, env: &[(&str, String)], dir: &Path) -> (Self, SocketAddr) {
        let sink = Self::start(name, env!("CARGO_BIN_EXE_telemetry-sink"), &[], env, dir);
        let address = sink.sink_address();
        (sink, address)
    }

    /// The gRPC address the sink reports (`Sink listening.`).
    pub fn sink_address(&self) -> SocketAddr {
        self.reported_address("Sink listening.")
    }

    /// The metrics address either binary reports (`Serving metrics and
    /// health.`).
    pub fn metrics_address(&self) -> SocketAddr {
        self.reported_address("Serving metrics and health.")
    }

    /// The address in the process's first log line holding `message`,
    /// waiting up to 20 s for it.
    fn reported_address(&self, message: &str) -> SocketAddr {
        let limit = Duration::from_secs(20);
        let deadline = Instant::now() + limit;
        loop {
            for path in [&self.err, &self.out] {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                if let Some(address) = text.lines().filter(|line| line.contains(message)).find_map(address_in) {
                    return address;
                }
            }
            assert!(Instant::now() < deadline, "{} logged no {message:?} within {limit:?}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with a PID this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal {} to {}", signal, self.name);
    }

    /// Sends SIGTERM and waits up to `limit` for the process to exit, as
    /// [`Process::wait`] does.
    pub fn terminate(self, limit: Duration) -> (i32, String, String) {
        self.signal(libc::SIGTERM);
        self.wait(limit)
    }

    /// Waits up to `limit` for the process to exit; kills it and fails if it does not.
    pub fn wait(mut self, limit: Duration) -> (i32, String, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let out = std::fs::read_to_string(&self.out).unwrap();
                let err = std::fs::read_to_string(&self.err).unwrap();
                return (status.code().unwrap_or(-1), out, err);
            }
            assert!(Instant::now() < deadline, "{} did not exit within {limit:?}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value of the `address` field in a log line, text or JSON, with
/// terminal colours or without.
fn address_in(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("address")?;
    let rest: String = strip_colours(rest);
    rest.trim_start_matches(['=', '"', ':'])
        .split(|c: char| c.is_whitespace() || c == '"' || c == ',')
        .next()?
        .parse()
        .ok()
}

/// `text` without ANSI colour sequences.
fn strip_colours(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            plain.push(c);
        }
    }
    plain
}

/// Waits until something accepts connections on `port`, for at most `limit`.
pub fn wait_for_port(port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port} after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The peak resident memory of process `pid` so far, in bytes (`VmHWM`).
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// The `key=value` fields of the `summary:` line in `stdout`.
pub fn summary_fields(stdout: &str) -> HashMap<String, u64> {
    let line = stdout.lines().find_map(|l| l.strip_prefix("summary: ")).expect("a summary line");
    line.split_whitespace()
        .filter_map(|field| field.split_once('='))
        // dropped_by=reason:n,... is for people; every other field is a number.
        .filter(|(k, _)| *k != "dropped_by")
        .map(|(k, v)| (k.to_owned(), v.parse().expect("a number")))
        .collect()
}

/// Runs the node configured by `config` against `recording` on a paused
/// clock, stops it after `run`, and returns its summary and its start time.
pub fn run_paused(
    config: &NodeConfig,
    recording: &Recording,
    run: Duration,
) -> (telemetry_node::node::Summary, tokio::time::Instant) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    runtime.block_on(async {
        let start = tokio::time::Instant::now();
        let stats = Arc::new(telemetry_node::node::Ledger::default());
        let summary = telemetry_node::node::run(config, recording.clone(), stats, tokio::time::sleep(run)).await;
        (summary, start)
    })
}

/// A CA, and files of certificates it signed, in `dir`.
pub struct Pki<'a> {
    dir: &'a Path,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl<'a> Pki<'a> {
    pub fn new(dir: &'a Path, name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), ca.pem()).unwrap();
        Self { dir, ca }
    }

    /// Writes `<name>.crt` and `<name>.key` for `host`, signed by this CA.
    pub fn issue(&self, name: &str, host: &str) -> (String, String) {
        let params = rcgen::CertificateParams::new(vec![host.to_owned()]).unwrap();
        self.issue_with(name, params)
    }

    /// [`Pki::issue`], valid from `from` until `until` (year, month, day)
    /// only.
    #[allow(dead_code)]
    pub fn issue_valid(&self, name: &str, host: &str, from: (i32, u8, u8), until: (i32, u8, u8)) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec![host.to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        self.issue_with(name, params)
    }

    fn issue_with(&self, name: &str, params: rcgen::CertificateParams) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) = (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path.display().to_string(), key_path.display().to_string())
    }
}

/// A tmpfs of `size` mounted at a fresh folder, unmounted when dropped.
pub struct Tmpfs(pub std::path::PathBuf);

#[allow(dead_code)]
impl Tmpfs {
    /// `None` (and a `skipped:` line) where mounting is not allowed; under
    /// CI it must be.
    pub fn mount(name: &str, size: &str) -> Option<Self> {
        let dir = scratch(name).join("disk");
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status();
        if mounted.is_ok_and(|status| status.success()) {
            return Some(Self(dir));
        }
        assert!(std::env::var_os("CI").is_none(), "CI must be able to mount a tmpfs (run as root)");
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[allow(dead_code)]
/// Fills what is left of the file system at `dir` with a file, and returns it.
pub fn fill(dir: &Path) -> std::path::PathBuf {
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 4096];
    while std::io::Write::write_all(&mut file, &block).is_ok() {}
    filler
}
