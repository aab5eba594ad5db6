//! A database the tests run: Debian's `victoria-metrics` or `prometheus`
//! on a free loopback port, with its data in the test's folder, queried
//! back over HTTP.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use telemetry_node::node::source::simulated::readings_from;
use tokio_rustls::rustls::{ClientConfig, pki_types::ServerName};

use super::{Pki, Process, free_port};

/// A database this test runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// With `-dedup.minScrapeInterval=1ms`, as the README says to run it.
    VictoriaMetrics,
    /// Without an out-of-order window: a sample older than its series'
    /// newest is refused (400), and the whole request with it.
    Prometheus,
    /// With `storage.tsdb.out_of_order_time_window`, as the README says to
    /// run it: a batch sent again after a lost answer is taken once.
    PrometheusWithWindow,
    /// Serving https only, to clients showing a certificate from its CA
    /// (`db-ca.pem` signs its certificate and the client's, `sink.crt` and
    /// `sink.key`, in its folder).
    PrometheusMutualTls,
}

/// A database process on a loopback port, stopped when dropped.
pub struct Database {
    pub kind: Kind,
    pub port: u16,
    /// VictoriaMetrics' flags besides its folder and address.
    flags: Vec<String>,
    dir: PathBuf,
    process: Option<Process>,
    /// How the test itself connects, for [`Kind::PrometheusMutualTls`].
    tls: Option<std::sync::Arc<ClientConfig>>,
    /// The host it runs on, in a namespace of its own; `None`: loopback.
    host: Option<super::netns::Host>,
}

impl Kind {
    pub fn binary(self) -> &'static str {
        match self {
            Self::VictoriaMetrics => "victoria-metrics",
            Self::Prometheus | Self::PrometheusWithWindow | Self::PrometheusMutualTls => "prometheus",
        }
    }
}

/// Whether `binary` is on the PATH.
pub fn installed(binary: &str) -> bool {
    which(binary).is_some()
}

/// Where `binary` is on the PATH.
pub fn which(binary: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths).map(|dir| dir.join(binary)).find(|path| path.is_file())
}

impl Database {
    /// Starts `kind` with its data under `dir`; `None` where it is not
    /// installed (and not under CI).
    pub fn start(kind: Kind, dir: &Path) -> Option<Self> {
        // One sample per series and millisecond: a batch sent again (its
        // answer lost) is stored once.
        Self::start_with(kind, dir, &["-dedup.minScrapeInterval=1ms".to_owned()])
    }

    /// [`Database::start`], VictoriaMetrics with `flags` besides its folder
    /// and address.
    pub fn start_with(kind: Kind, dir: &Path, flags: &[String]) -> Option<Self> {
        let mut database = Self::unstarted(kind, dir, flags, None)?;
        if kind == Kind::PrometheusMutualTls {
            let pki = Pki::new(dir, "db-ca");
            let (cert, key) = pki.issue("prometheus", "127.0.0.1");
            pki.issue("sink", "sink.example");
            let web = format!(
                "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  \
                 client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
                dir.join("db-ca.pem").display()
            );
            std::fs::write(dir.join("web.yml"), web).unwrap();
            database.tls = Some(client_tls(dir));
        }
        database.run();
        Some(database)
    }

    /// VictoriaMetrics (de-duplicating, as [`Database::start`]) on `host`,
    /// listening on its every address at port 8428; `None` where it is not
    /// installed (and not under CI).
    pub fn start_on(host: &super::netns::Host, dir: &Path) -> Option<Self> {
        let flags = ["-dedup.minScrapeInterval=1ms".to_owned()];
        let mut database = Self::unstarted(Kind::VictoriaMetrics, dir, &flags, Some(host.clone()))?;
        database.run();
        Some(database)
    }

    /// The database, not started yet: on a free loopback port, or at port
    /// 8428 on `host`; `None` where it is not installed (and not under CI).
    fn unstarted(kind: Kind, dir: &Path, flags: &[String], host: Option<super::netns::Host>) -> Option<Self> {
        if !installed(kind.binary()) {
            assert!(std::env::var_os("CI").is_none(), "{} must be installed under CI", kind.binary());
            eprintln!("skipped: {} not installed", kind.binary());
            return None;
        }
        let port = if host.is_some() { 8428 } else { free_port() };
        Some(Self { kind, port, flags: flags.to_vec(), dir: dir.to_owned(), process: None, tls: None, host })
    }

    /// Starts the process (again), on the same port and data.
    pub fn run(&mut self) {
        let listen = if self.host.is_some() { "0.0.0.0" } else { "127.0.0.1" };
        let address = format!("{listen}:{}", self.port);
        let args: Vec<String> = match self.kind {
            Kind::VictoriaMetrics => [
                format!("-storageDataPath={}", self.dir.join("vm").display()),
                format!("-httpListenAddr={address}"),
                "-loggerLevel=WARN".into(),
            ]
            .into_iter()
            .chain(self.flags.iter().cloned())
            .collect(),
            Kind::Prometheus | Kind::PrometheusWithWindow | Kind::PrometheusMutualTls => {
                let config = self.dir.join("prometheus.yml");
                let mut text = "global:\n  scrape_interval: 1h\n".to_owned();
                if self.kind == Kind::PrometheusWithWindow {
                    text.push_str("storage:\n  tsdb:\n    out_of_order_time_window: 1h\n");
                }
                std::fs::write(&config, text).unwrap();
                vec![
                    format!("--config.file={}", config.display()),
                    format!("--storage.tsdb.path={}", self.dir.join("prometheus").display()),
                    format!("--web.listen-address={address}"),
                    "--web.enable-remote-write-receiver".into(),
                    "--log.level=warn".into(),
                ]
                .into_iter()
                .chain(
                    (self.kind == Kind::PrometheusMutualTls)
                        .then(|| format!("--web.config.file={}", self.dir.join("web.yml").display())),
                )
                .collect()
            }
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let name = self.kind.binary();
        self.process = Some(match &self.host {
            None => Process::start(name, name, &args, &[], &self.dir),
            Some(host) => {
                let binary = which(name).expect("checked when started");
                host.start(name, binary.to_str().expect("a UTF-8 path"), &args, &[], &self.dir)
            }
        });
        let ready = if self.kind == Kind::VictoriaMetrics { "/health" } else { "/-/ready" };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.get(ready).map(|(status, _)| status) != Some(200) {
            assert!(Instant::now() < deadline, "{} did not start", self.kind.binary());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends the process `signal` (SIGSTOP to stall it, SIGCONT to go on).
    pub fn signal(&self, signal: i32) {
        if let Some(process) = &self.process {
            process.signal(signal);
        }
    }

    /// Stops the process, keeping its data.
    pub fn stop(&mut self) {
        if let Some(process) = self.process.take() {
            let _ = process.terminate(Duration::from_secs(30));
        }
    }

    /// What the database has logged so far (at warning level and up).
    pub fn log(&self) -> String {
        let name = self.kind.binary();
        let read =
            |suffix: &str| std::fs::read_to_string(self.dir.join(format!("{name}.{suffix}"))).unwrap_or_default();
        read("out") + &read("err")
    }

    pub fn url(&self) -> String {
        if let Some(host) = &self.host {
            return format!("http://{}:{}/api/v1/write", host.address, self.port);
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/api/v1/write", self.port)
    }

    /// GET `path` from the database: status and body.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        if let Some(host) = &self.host {
            return host.within(|| http_get(self.port, path));
        }
        match &self.tls {
            None => http_get(self.port, path),
            Some(tls) => https_get(self.port, path, tls),
        }
    }

    /// Every sample of `sensor_value`, per (node, sensor), in time order,
    /// once the count has settled: VictoriaMetrics shows the newest samples
    /// (and a new series' first ones) up to about 3 s late, even right after
    /// `/internal/force_flush`. Settled means the same count over three
    /// reads 500 ms apart, or 15 s gone by.
    pub fn samples(&self) -> BTreeMap<(String, String), Vec<(i64, f64)>> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let count = |series: &BTreeMap<(String, String), Vec<(i64, f64)>>| series.values().map(Vec::len).sum::<usize>();
        let mut series = self.samples_now();
        let mut same = 0;
        while same < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            let next = self.samples_now();
            same = if count(&next) == count(&series) { same + 1 } else { 0 };
            series = next;
        }
        series
    }

    /// Every sample of `sensor_value` the database shows now.
    pub fn samples_now(&self) -> BTreeMap<(String, String), Vec<(i64, f64)>> {
        if self.kind == Kind::VictoriaMetrics {
            // Samples just taken become searchable within seconds; now.
            assert_eq!(self.get("/internal/force_flush").map(|(status, _)| status), Some(200));
        }
        let mut series: BTreeMap<(String, String), Vec<(i64, f64)>> = BTreeMap::new();
        // A sender without a node identity is labelled with its address.
        let key = |metric: &serde_json::Value| {
            let owner = match (metric["node"].as_str(), metric["address"].as_str()) {
                (Some(node), _) => node.to_owned(),
                (None, Some(address)) => format!("address {address}"),
                (None, None) => String::new(),
            };
            // The sensor's name back from its series: the `sensor` label of
            // a plain name, or a metric name and its own labels.
            let sensor = match metric["sensor"].as_str() {
                Some(sensor) => sensor.to_owned(),
                None => {
                    let labels = metric.as_object().unwrap();
                    let own: Vec<String> = labels
                        .iter()
                        .filter(|(name, _)| !["__name__", "node", "address"].contains(&name.as_str()))
                        .map(|(name, value)| format!("{name}={value}"))
                        .collect();
                    let name = metric["__name__"].as_str().unwrap().to_owned();
                    if own.is_empty() { name } else { format!("{name}{{{}}}", own.join(",")) }
                }
            };
            (owner, sensor)
        };
        match self.kind {
            Kind::VictoriaMetrics => {
                let (_, body) = self.get("/api/v1/export?match%5B%5D=%7B__name__%3D~%22.%2B%22%7D").unwrap();
                for line in body.lines().filter(|line| !line.trim().is_empty()) {
                    let value: serde_json::Value = serde_json::from_str(line).unwrap();
                    let samples = series.entry(key(&value["metric"])).or_default();
                    let times = value["timestamps"].as_array().unwrap();
                    for (time, value) in times.iter().zip(value["values"].as_array().unwrap()) {
                        samples.push((time.as_i64().unwrap(), value.as_f64().unwrap()));
                    }
                }
            }
            Kind::Prometheus | Kind::PrometheusWithWindow | Kind::PrometheusMutualTls => {
                let (_, body) = self.get("/api/v1/query?query=%7B__name__%3D~%22.%2B%22%7D%5B1d%5D").unwrap();
                let value: serde_json::Value = serde_json::from_str(&body).unwrap();
                for result in value["data"]["result"].as_array().unwrap() {
                    let samples = series.entry(key(&result["metric"])).or_default();
                    for pair in result["values"].as_array().unwrap() {
                        let time = (pair[0].as_f64().unwrap() * 1000.0).round() as i64;
                        samples.push((time, pair[1].as_str().unwrap().parse().unwrap()));
                    }
                }
            }
        }
        for samples in series.values_mut() {
            samples.sort_by_key(|(time, _)| *time);
        }
        series
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        self.stop();
    }
}

/// GET `path` over HTTP/1.0 (no chunked answers): status and body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    exchange(&mut stream, path)
}

/// GET `path` over HTTP/1.0 in TLS, as `tls` says.
pub fn https_get(port: u16, path: &str, tls: &std::sync::Arc<ClientConfig>) -> Option<(u16, String)> {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let name = ServerName::try_from("127.0.0.1").ok()?;
    let connection = tokio_rustls::rustls::ClientConnection::new(std::sync::Arc::clone(tls), name).ok()?;
    exchange(&mut tokio_rustls::rustls::StreamOwned::new(connection, stream), path)
}

/// Sends a GET for `path` on `stream` and reads the answer to its end.
pub fn exchange(stream: &mut (impl Read + Write), path: &str) -> Option<(u16, String)> {
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut page = Vec::new();
    // A TLS server may close without a close_notify after the answer.
    let _ = stream.read_to_end(&mut page);
    let page = String::from_utf8(page).ok()?;
    let status = page.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, page.split_once("\r\n\r\n")?.1.to_owned()))
}

/// The test's own TLS client for a [`Kind::PrometheusMutualTls`] database
/// in `dir`: trusting `db-ca.pem`, showing `sink.crt`.
pub fn client_tls(dir: &Path) -> std::sync::Arc<ClientConfig> {
    use tokio_rustls::rustls::{
        RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    };
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(dir.join("db-ca.pem")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(dir.join("sink.crt")).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("sink.key")).unwrap();
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    std::sync::Arc::new(config)
}

/// Samples VictoriaMetrics has been sent over remote-write since it started
/// (`vm_rows_inserted_total`), duplicates included: what its 1 ms
/// de-duplication hides from a query. `None` for Prometheus.
pub fn samples_sent(database: &Database) -> Option<u64> {
    if database.kind != Kind::VictoriaMetrics {
        return None;
    }
    let (_, body) = database.get("/metrics")?;
    let line = body.lines().find(|line| line.starts_with("vm_rows_inserted_total{type=\"promremotewrite\"}"))?;
    line.rsplit(' ').next()?.parse().ok()
}

/// At most `most` samples were sent to the database (VictoriaMetrics only:
/// its de-duplication would store once what was sent twice).
pub fn assert_sent_at_most(database: &Database, most: u64) {
    if let Some(sent) = samples_sent(database) {
        assert!(sent <= most, "{sent} samples were sent to the database, more than {most}");
    }
}

/// Every reading the nodes produced is in the database once: per node and
/// sensor, as many samples as readings, times strictly increasing, and the
/// values the simulated sensor gives for sequences 0, 1, 2, …
pub fn assert_each_reading_once(database: &Database, produced: u64) {
    // What a database took becomes searchable within seconds (VictoriaMetrics
    // buffers new samples): wait until as many as were produced are seen,
    // or 20 s have passed, then check what is there.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut series = database.samples_now();
    while series.values().map(Vec::len).sum::<usize>() < produced as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        series = database.samples_now();
    }
    // And no more than that: a count still growing would show duplicates.
    let series = database.samples();
    let mut total = 0;
    for ((node, sensor), samples) in &series {
        assert!(samples.windows(2).all(|pair| pair[0].0 < pair[1].0), "{node}/{sensor}: times not strictly increasing");
        let expected: Vec<f64> =
            readings_from(vec![Box::leak(sensor.to_owned().into_boxed_str())], 0, samples.len() as u64)
                .map(|r| r.value as f64)
                .collect();
        let values: Vec<f64> = samples.iter().map(|(_, value)| *value).collect();
        assert_eq!(values, expected, "{node}/{sensor}: the values of sequences 0..{}", samples.len());
        total += samples.len() as u64;
    }
    assert_eq!(total, produced, "samples in the database vs readings produced: {:?}", series.keys());
}
