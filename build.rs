//! Compiles the wire contract with the protoc that ships inside a crate, so a
//! build needs no system package.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let includes = [PathBuf::from("proto"), protoc_bin_vendored::include_path()?];
    tonic_prost_build::configure().compile_with_config(
        config,
        &[PathBuf::from("proto/sensor/v1/sensor.proto"), PathBuf::from("proto/prometheus/remote.proto")],
        &includes,
    )?;
    Ok(())
}
