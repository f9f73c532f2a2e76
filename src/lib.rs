//! Sluice as a library: the process's parts, for the `sluice` binary, the fuzz targets and the
//! benchmarks. The binary (`main.rs`) is only the command line.

pub mod admin;
pub mod exchange;
pub mod forward;
pub mod policy;
pub mod server;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod upstream;
