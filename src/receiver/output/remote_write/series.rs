//! The remote-write output's form of a request: its readings as
//! remote-write series, checked against what a database keeps (the window
//! of times around its clock, the longest label), or the reason the
//! request is refused.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::{
    database::{Database, names::series_labels},
    error::ReceiveError,
    prompb::{Label, Sample, TimeSeries},
    proto::SensorValuesRequest,
    receiver::input::validate::{MAX_LABEL_BYTES, check, owner},
};

/// How readings become remote-write samples: under which metric, and
/// within which times of the database's clock a database is sent them.
#[derive(Debug, Clone)]
pub(crate) struct SeriesRules {
    /// REMOTE_WRITE_METRIC.
    pub(crate) metric: Arc<str>,
    /// REMOTE_WRITE_MAX_AGE.
    pub(crate) max_age: Duration,
    /// REMOTE_WRITE_MAX_AHEAD.
    pub(crate) max_ahead: Duration,
    /// The database whose clock the window follows (the sink's output);
    /// `None`: the caller gives the offset (a node writing itself).
    database: Option<Arc<Database>>,
}

impl SeriesRules {
    /// The rules REMOTE_WRITE_METRIC, _MAX_AGE and _MAX_AHEAD of `config` set.
    pub(crate) fn new(config: &crate::config::RemoteWriteConfig) -> Self {
        Self {
            metric: Arc::from(config.metric.as_str()),
            max_age: config.max_age.into(),
            max_ahead: config.max_ahead.into(),
            database: None,
        }
    }

    /// These rules, with the window following `database`'s clock.
    pub(crate) fn following(mut self, database: Database) -> Self {
        self.database = Some(Arc::new(database));
        self
    }

    /// Reads the database's clock if no answer has told it yet (a GET of
    /// REMOTE_WRITE_URL); an error when the database cannot be reached.
    pub(crate) async fn read_clock(&self) -> Result<(), String> {
        match &self.database {
            Some(database) => database.clock_offset().await.map(drop),
            None => Ok(()),
        }
    }

    /// The times a database is sent now: by its clock as its answers'
    /// `Date` last told it (the sink's own clock until one has).
    pub(crate) fn window(&self) -> Window {
        self.window_offset(self.database.as_ref().and_then(|database| database.known_clock_offset()).unwrap_or(0))
    }

    /// The times a database is sent, by this clock now shifted by
    /// `offset_ms` (the database's clock, for a node writing to it itself).
    pub(crate) fn window_offset(&self, offset_ms: i64) -> Window {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        Window::around(now.saturating_add(offset_ms), self.max_age, self.max_ahead)
    }
}

/// The times, in milliseconds since 1970, a database is sent at one
/// moment: a database drops samples before its retention, and too far
/// ahead, answering OK all the same (VictoriaMetrics); or takes one far
/// ahead and then refuses every sample of the present (Prometheus).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// The database's clock, as far as it is known.
    now: i64,
    /// The limits, for messages.
    max_age: Duration,
    max_ahead: Duration,
}

impl Window {
    /// From `max_age` before `now` to `max_ahead` after it.
    pub(crate) fn around(now: i64, max_age: Duration, max_ahead: Duration) -> Self {
        Self { now, max_age, max_ahead }
    }

    /// Every time RFC 3339 can write.
    #[cfg(test)]
    pub(crate) fn any() -> Self {
        Self::around(0, Duration::from_secs(1 << 40), Duration::from_secs(1 << 40))
    }

    /// Whether `millis` is inside.
    pub(crate) fn contains(&self, millis: i64) -> bool {
        let (age, ahead) = (self.max_age.as_millis() as i64, self.max_ahead.as_millis() as i64);
        self.now.saturating_sub(age) <= millis && millis <= self.now.saturating_add(ahead)
    }

    /// Why the reading at `index`, of `millis`, is outside.
    fn check(&self, index: usize, millis: i64) -> Result<(), ReceiveError> {
        if self.contains(millis) {
            return Ok(());
        }
        let off = |ms: i64| humantime::Duration::from(Duration::from_millis(ms.unsigned_abs()));
        Err(if millis < self.now {
            ReceiveError::TooOld { index, age: off(self.now - millis), limit: self.max_age.into() }
        } else {
            ReceiveError::TooFarAhead { index, ahead: off(millis - self.now), limit: self.max_ahead.into() }
        })
    }
}

/// Whether `value` may be a label value in the database; `what` names it.
fn label_fits(value: &str, what: impl FnOnce() -> String) -> Result<(), ReceiveError> {
    if value.len() <= MAX_LABEL_BYTES {
        return Ok(());
    }
    Err(ReceiveError::LabelTooLong { what: what(), bytes: value.len(), limit: MAX_LABEL_BYTES })
}

/// A request's readings as remote-write series, encoded as the
/// `timeseries` entries of a `WriteRequest` (so that the series of several
/// requests, concatenated, are one request).
///
/// One series per sensor of the sending node: `metric{node="…",
/// sensor="…"}`, the node its `node_id`; for a request without one,
/// `metric{address="…", sensor="…"}` with `address` (neither label if that
/// is empty too, see [`owner`]), the time in milliseconds and the value as a float (exact
/// up to 2^53). A series' samples go in time order, whatever order the
/// request held them in (Prometheus drops, and answers OK all the same, a
/// sample older than one before it in the same request). A series holds one
/// sample per millisecond: two readings of a sensor in the same millisecond
/// are stored once when their values are the same, and refuse the request
/// when they differ (one of them could not be stored). A reading outside
/// `window` refuses the request too.
pub(crate) fn to_series(
    request: &SensorValuesRequest,
    metric: &str,
    window: Window,
    address: &str,
) -> Result<Vec<u8>, ReceiveError> {
    // Each sensor's readings: time in ms, value, position in the request.
    type Readings = Vec<(i64, f64, usize)>;
    let mut series: Vec<(&str, Readings)> = Vec::new();
    let mut index_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    label_fits(&request.node_id, || "node_id".into())?;
    for (index, item) in request.items.iter().enumerate() {
        let (value, created_at) = check(index, item)?;
        label_fits(&item.sensor_name, || format!("item {index}: sensor_name"))?;
        let timestamp = created_at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        window.check(index, timestamp)?;
        let at = *index_of.entry(item.sensor_name.as_str()).or_insert_with(|| {
            series.push((item.sensor_name.as_str(), Vec::new()));
            series.len() - 1
        });
        series[at].1.push((timestamp, value as f64, index));
    }
    let first_index = |sensor: &str| request.items.iter().position(|item| item.sensor_name == sensor).unwrap_or(0);
    let mut out = Vec::with_capacity(request.items.len() * 24 + series.len() * (metric.len() + 64));
    for (sensor, mut readings) in series {
        readings.sort_by_key(|(millis, _, _)| *millis);
        let mut samples: Vec<Sample> = Vec::with_capacity(readings.len());
        let mut last_index = 0;
        for (timestamp, value, index) in readings {
            match samples.last() {
                Some(last) if last.timestamp == timestamp && last.value.to_bits() == value.to_bits() => continue,
                Some(last) if last.timestamp == timestamp => {
                    let index = index.max(last_index);
                    return Err(ReceiveError::SameMillisecond { index, sensor: sensor.to_owned(), millis: timestamp });
                }
                _ => {}
            }
            samples.push(Sample { value, timestamp });
            last_index = index;
        }
        let labels = series_labels(sensor, metric, owner(&request.node_id, address))
            .map_err(|reason| ReceiveError::BadLabels { index: first_index(sensor), reason })?;
        let labels = labels.into_iter().map(|(name, value)| Label { name, value }).collect();
        prost::encoding::message::encode(1, &TimeSeries { labels, samples }, &mut out);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use tonic::Status;

    use super::*;
    use crate::{
        prompb::WriteRequest,
        receiver::input::validate::{address_of, item, sender},
    };

    #[test]
    fn one_series_per_sensor_with_node_and_sensor_labels() {
        let mut second = item("s-a", Some(2), 1);
        second.measurement.as_mut().unwrap().created_at.as_mut().unwrap().nanos = 2_000_000;
        let request = SensorValuesRequest {
            items: vec![item("s-a", Some(1), 1), item("s-b", Some(-7), 1), second],
            node_id: "n1".into(),
            ..Default::default()
        };
        let bytes = to_series(&request, "sensor_value", Window::any(), "").unwrap();
        let decoded = WriteRequest::decode(bytes.as_slice()).unwrap();
        let labels: Vec<Vec<(String, String)>> = decoded
            .timeseries
            .iter()
            .map(|s| s.labels.iter().map(|l| (l.name.clone(), l.value.clone())).collect())
            .collect();
        let label = |n: &str, v: &str| (n.to_owned(), v.to_owned());
        assert_eq!(labels[0], vec![label("__name__", "sensor_value"), label("node", "n1"), label("sensor", "s-a")]);
        assert_eq!(labels[1], vec![label("__name__", "sensor_value"), label("node", "n1"), label("sensor", "s-b")]);
        assert_eq!(
            decoded.timeseries[0].samples,
            vec![Sample { value: 1.0, timestamp: 1000 }, Sample { value: 2.0, timestamp: 1002 }]
        );
        assert_eq!(decoded.timeseries[1].samples, vec![Sample { value: -7.0, timestamp: 1000 }]);
        // A name that is a metric name, with labels or without, is that
        // metric; labels a database would refuse refuse the request.
        let request = SensorValuesRequest {
            items: vec![item("up", Some(1), 1), item("disk_bytes{device=\"sda\"}", Some(5), 1)],
            node_id: "n1".into(),
            ..Default::default()
        };
        let decoded =
            WriteRequest::decode(to_series(&request, "sensor_value", Window::any(), "").unwrap().as_slice()).unwrap();
        let labels: Vec<Vec<(String, String)>> = decoded
            .timeseries
            .iter()
            .map(|s| s.labels.iter().map(|l| (l.name.clone(), l.value.clone())).collect())
            .collect();
        assert_eq!(labels[0], vec![label("__name__", "up"), label("node", "n1")]);
        assert_eq!(labels[1], vec![label("__name__", "disk_bytes"), label("device", "sda"), label("node", "n1")]);
        let bad =
            SensorValuesRequest { items: vec![item("s-a", Some(1), 1), item("m{node=\"x\"}", Some(1), 1)], ..request };
        let error = to_series(&bad, "sensor_value", Window::any(), "").unwrap_err();
        assert!(matches!(&error, ReceiveError::BadLabels { index: 1, .. }), "{error}");
    }

    #[test]
    fn a_sender_without_an_identity_is_labelled_with_its_ip_address() {
        let address = |peer: &str| address_of(Some(peer.parse().unwrap()));
        assert_eq!(address("10.0.0.7:40000"), "10.0.0.7");
        // An IPv4 sender that reached an IPv6 socket is still the IPv4 host.
        assert_eq!(address("[::ffff:10.0.0.7]:40000"), "10.0.0.7");
        assert_eq!(address("[2001:db8::1]:40000"), "2001:db8::1");
        assert_eq!(address_of(None), "");
        assert_eq!(owner("n1", "10.0.0.7"), Some(("node", "n1")));
        assert_eq!(owner("", "10.0.0.7"), Some(("address", "10.0.0.7")));
        assert_eq!(owner("", ""), None);
        // A node named as an address is not the sender at that address.
        assert_ne!(sender(owner("10.0.0.7", "")), sender(owner("", "10.0.0.7")));
    }

    #[test]
    fn two_readings_of_a_sensor_in_one_millisecond_are_stored_once_or_refused() {
        // The same value twice: the database holds exactly that sample.
        let request =
            SensorValuesRequest { items: vec![item("s-a", Some(9), 1), item("s-a", Some(9), 1)], ..Default::default() };
        let decoded = WriteRequest::decode(to_series(&request, "m", Window::any(), "").unwrap().as_slice()).unwrap();
        assert_eq!(decoded.timeseries[0].samples, vec![Sample { value: 9.0, timestamp: 1000 }]);
        // Without a node identity there is no node label; the address it
        // came from is its label, when the sink knows it.
        assert_eq!(decoded.timeseries[0].labels.len(), 2);
        let decoded =
            WriteRequest::decode(to_series(&request, "m", Window::any(), "10.0.0.7").unwrap().as_slice()).unwrap();
        assert_eq!(decoded.timeseries[0].labels[1], Label { name: "address".into(), value: "10.0.0.7".into() });
        // A node identity wins over the address.
        let named = SensorValuesRequest { node_id: "n1".into(), ..request.clone() };
        let decoded =
            WriteRequest::decode(to_series(&named, "m", Window::any(), "10.0.0.7").unwrap().as_slice()).unwrap();
        assert_eq!(decoded.timeseries[0].labels[1], Label { name: "node".into(), value: "n1".into() });
        // Two values: one could not be stored, so the request is refused.
        let request = SensorValuesRequest {
            items: vec![item("s-b", Some(2), 1), item("s-a", Some(1), 1), item("s-a", Some(9), 1)],
            ..Default::default()
        };
        let error = to_series(&request, "m", Window::any(), "").unwrap_err();
        assert_eq!(error, ReceiveError::SameMillisecond { index: 2, sensor: "s-a".into(), millis: 1000 });
        assert!(error.to_string().contains("one sample per millisecond"), "{error}");
    }

    #[test]
    fn a_series_goes_in_time_order_and_a_clash_out_of_turn_is_refused() {
        let at = |value: i64, millis: i32| {
            let mut item = item("s-a", Some(value), 1);
            item.measurement.as_mut().unwrap().created_at.as_mut().unwrap().nanos = millis * 1_000_000;
            item
        };
        let request = SensorValuesRequest { items: vec![at(9, 9), at(8, 8), at(5, 5), at(9, 9)], ..Default::default() };
        let decoded = WriteRequest::decode(to_series(&request, "m", Window::any(), "").unwrap().as_slice()).unwrap();
        let times: Vec<i64> = decoded.timeseries[0].samples.iter().map(|s| s.timestamp).collect();
        assert_eq!(times, vec![1005, 1008, 1009]);
        // The same millisecond with another value, not next to it.
        let request = SensorValuesRequest { items: vec![at(1, 5), at(2, 6), at(3, 5)], ..Default::default() };
        let error = to_series(&request, "m", Window::any(), "").unwrap_err();
        assert_eq!(error, ReceiveError::SameMillisecond { index: 2, sensor: "s-a".into(), millis: 1005 });
    }

    #[test]
    fn a_name_too_long_for_a_database_label_refuses_the_request() {
        let named = |sensor: usize, node: usize| SensorValuesRequest {
            items: vec![item("s-a", Some(1), 1), item(&"s".repeat(sensor), Some(1), 1)],
            node_id: "n".repeat(node),
            ..Default::default()
        };
        assert!(to_series(&named(MAX_LABEL_BYTES, MAX_LABEL_BYTES), "m", Window::any(), "").is_ok());
        let error = to_series(&named(MAX_LABEL_BYTES + 1, 1), "m", Window::any(), "").unwrap_err();
        assert_eq!(
            error.to_string(),
            "item 1: sensor_name is 2049 bytes, longer than a label value in the database may be (2048 bytes)"
        );
        let error = to_series(&named(1, 17_000), "m", Window::any(), "").unwrap_err();
        assert!(error.to_string().starts_with("node_id is 17000 bytes"), "{error}");
        assert_eq!(Status::from(error).code(), tonic::Code::InvalidArgument);
        // The file takes any length.
        assert!(crate::receiver::output::file::lines::to_json_lines(&named(17_000, 17_000)).is_ok());
    }

    #[test]
    fn a_reading_outside_the_window_refuses_the_request() {
        let window = Window::around(1_000_000, Duration::from_secs(60), Duration::from_secs(10));
        let at =
            |seconds: i64| SensorValuesRequest { items: vec![item("s-a", Some(1), seconds)], ..Default::default() };
        assert!(to_series(&at(1000), "m", window, "").is_ok());
        assert!(to_series(&at(940), "m", window, "").is_ok());
        assert!(to_series(&at(1010), "m", window, "").is_ok());
        let old = to_series(&at(900), "m", window, "").unwrap_err();
        assert_eq!(
            old.to_string(),
            "item 0: created_at is 1m 40s before the database's clock, older than REMOTE_WRITE_MAX_AGE (1m)"
        );
        let ahead = to_series(&at(1011), "m", window, "").unwrap_err().to_string();
        assert!(
            ahead.contains("11s after the database's clock") && ahead.contains("REMOTE_WRITE_MAX_AHEAD (10s)"),
            "{ahead}"
        );
    }
}
