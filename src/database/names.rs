//! How a sensor's name becomes a series' labels in a database.
//!
//! A name that is a Prometheus metric name, optionally followed by labels
//! in the exposition format (`host_network_receive_bytes_total{device="eth0"}`),
//! becomes that metric with those labels: what Prometheus users query
//! (`rate(host_network_receive_bytes_total[5m])`, `sum by (device)`). Any
//! other name (the Go node's `sensor-temp-1`) is a value of the `sensor`
//! label of REMOTE_WRITE_METRIC (`sensor_value{sensor="sensor-temp-1"}`).
//! The owner label (`node`, or `address` for a sender without an
//! identity) is added to either. A name that reads as a metric with labels
//! but whose labels a database would refuse (a bad label name, a reserved
//! one, one given twice, an empty value, a quote left open) is refused, with
//! the reason.

/// A series' labels: (name, value) pairs.
type Labels = Vec<(String, String)>;

/// Label names a sensor's own labels may not use: the owner's, and the
/// one plain names are stored under.
const RESERVED: [&str; 3] = ["node", "address", "sensor"];

/// The labels of `sensor`'s series, sorted by name as remote-write asks:
/// `__name__` and the sensor's own labels, or `metric` and
/// `sensor="<name>"`; then `owner` (name, value) if any.
pub(crate) fn series_labels(
    sensor: &str,
    metric: &str,
    owner: Option<(&str, &str)>,
) -> Result<Vec<(String, String)>, String> {
    let mut labels = match native(sensor)? {
        Some((name, own)) => {
            let mut labels = vec![("__name__".to_owned(), name.to_owned())];
            labels.extend(own);
            labels
        }
        None => vec![("__name__".to_owned(), metric.to_owned()), ("sensor".to_owned(), sensor.to_owned())],
    };
    if let Some((name, value)) = owner {
        labels.push((name.to_owned(), value.to_owned()));
    }
    labels.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(labels)
}

/// Whether `sensor` is a plain name, stored as the `sensor` label of
/// REMOTE_WRITE_METRIC (no allocation: the common case of a node's many
/// simulated sensors, `sensor-1` …).
pub(crate) fn plain(sensor: &str) -> bool {
    let name = sensor.split('{').next().unwrap_or(sensor);
    !metric_name(name)
}

/// `sensor` as a metric name and its labels, if it is one; `None` for a
/// plain name; an error for a metric with labels a database would refuse.
fn native(sensor: &str) -> Result<Option<(&str, Labels)>, String> {
    let (name, rest) = match sensor.find('{') {
        Some(at) => sensor.split_at(at),
        None => (sensor, ""),
    };
    if !metric_name(name) {
        return Ok(None);
    }
    if rest.is_empty() {
        return Ok(Some((name, Vec::new())));
    }
    let Some(inner) = rest.strip_prefix('{').and_then(|rest| rest.strip_suffix('}')) else {
        return Err(format!("sensor name {sensor:?}: labels must end the name, in braces"));
    };
    let labels = parse_labels(inner).map_err(|why| format!("sensor name {sensor:?}: {why}"))?;
    Ok(Some((name, labels)))
}

/// Whether `name` is a Prometheus metric name.
pub(crate) fn metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Whether `name` is a label name a sensor may give.
fn label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The labels of `inner`, `name="value",…` (a trailing comma allowed, values
/// with `\"`, `\\` and `\n` escapes).
fn parse_labels(inner: &str) -> Result<Vec<(String, String)>, String> {
    let mut labels: Vec<(String, String)> = Vec::new();
    let mut rest = inner;
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=').ok_or("a label without =\"value\"")?;
        if !label_name(name) || name.starts_with("__") {
            return Err(format!("{name:?} is not a label name a database takes"));
        }
        if RESERVED.contains(&name) {
            return Err(format!("the label {name:?} is the sink's own"));
        }
        let mut chars = after.strip_prefix('"').ok_or("a label value must be in double quotes")?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next() {
                None => return Err("a label value's quote is not closed".to_owned()),
                Some((at, '"')) => break at,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '"')) => value.push('"'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, 'n')) => value.push('\n'),
                    _ => return Err("a label value holds an escape other than \\\", \\\\ or \\n".to_owned()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if value.is_empty() {
            return Err(format!("the label {name:?} is empty (a database drops such a label)"));
        }
        if labels.iter().any(|(given, _)| given == name) {
            return Err(format!("the label {name:?} is given twice"));
        }
        labels.push((name.to_owned(), value));
        rest = &after[1 + end + 1..];
        rest = match rest.strip_prefix(',') {
            Some(more) => more,
            None if rest.is_empty() => rest,
            None => return Err("labels must be separated by commas".to_owned()),
        };
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(sensor: &str) -> Result<Vec<(String, String)>, String> {
        series_labels(sensor, "sensor_value", Some(("node", "n1")))
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())).collect()
    }

    #[test]
    fn a_metric_name_with_labels_becomes_that_metric_and_other_names_a_sensor_label() {
        assert_eq!(
            labels("host_network_receive_bytes_total{device=\"eth0\"}").unwrap(),
            pairs(&[("__name__", "host_network_receive_bytes_total"), ("device", "eth0"), ("node", "n1")])
        );
        assert_eq!(labels("host_load1_milli").unwrap(), pairs(&[("__name__", "host_load1_milli"), ("node", "n1")]));
        assert_eq!(
            labels("sensor-temp-1").unwrap(),
            pairs(&[("__name__", "sensor_value"), ("node", "n1"), ("sensor", "sensor-temp-1")])
        );
        // Sorted by name, as remote-write asks: upper case before `__name__`.
        assert_eq!(
            labels("m{b=\"2\",A=\"1\",}").unwrap(),
            pairs(&[("A", "1"), ("__name__", "m"), ("b", "2"), ("node", "n1")])
        );
        assert_eq!(labels(r#"m{path="a \"b\" \\ c"}"#).unwrap()[2], ("path".to_owned(), "a \"b\" \\ c".to_owned()));
        // Without an owner (a sender without identity or address).
        assert_eq!(series_labels("9lives", "x", None).unwrap(), pairs(&[("__name__", "x"), ("sensor", "9lives")]));
    }

    #[test]
    fn labels_a_database_would_refuse_refuse_the_name() {
        for bad in [
            "m{device=eth0}",
            "m{device=\"eth0\"",
            "m{device=\"eth0}",
            "m{device=\"\"}",
            "m{__x=\"1\"}",
            "m{node=\"other\"}",
            "m{sensor=\"x\"}",
            "m{a=\"1\",a=\"2\"}",
            "m{a=\"1\" b=\"2\"}",
            "m{1a=\"1\"}",
            "m{a=\"1\"}x",
            "m{a=\"\\t\"}",
        ] {
            assert!(labels(bad).is_err(), "{bad}");
        }
    }
}
