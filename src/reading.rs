//! The domain type that flows through the node: one sensor reading.

use std::{sync::Arc, time::SystemTime};

use crate::proto::{SensorValue, SensorValuesRequest, sensor_value::Measurement};

/// One value measured by one sensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// The sensor's name, shared by all its readings so that producing a
    /// reading does not allocate a string.
    pub sensor: Arc<str>,
    /// Position in the sensor's output, from 0 up: the sink uses it to prove
    /// that nothing was lost, duplicated or reordered.
    pub sequence: u64,
    /// The measured value.
    pub value: i64,
    /// When the reading was taken.
    pub created_at: SystemTime,
}

/// Readings sent together in one request.
pub type Batch = Vec<Reading>;

impl From<&Reading> for SensorValue {
    fn from(reading: &Reading) -> Self {
        SensorValue {
            sensor_name: reading.sensor.to_string(),
            measurement: Some(Measurement {
                sensor_value: Some(reading.value),
                created_at: Some(reading.created_at.into()),
            }),
            sequence: reading.sequence,
        }
    }
}

/// The request that carries `batch`.
pub fn to_request(batch: &[Reading]) -> SensorValuesRequest {
    SensorValuesRequest { items: batch.iter().map(SensorValue::from).collect() }
}
