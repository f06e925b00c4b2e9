//! Fuzzes the pickle reader and the `.metadata` interpretation built on it:
//! any bytes, under both the `.metadata` and the `data.pkl` limits, and
//! through the `.metadata` reader that folds objects as they are parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use st_consolidate_mpi::checkpoint::dcp::metadata::parse_metadata;
use st_consolidate_mpi::checkpoint::dcp::pickle::{Limits, parse};

fuzz_target!(|data: &[u8]| {
    let _ = parse(data, &Limits::METADATA);
    let _ = parse_metadata(data);
    let _ = parse(data, &Limits::DATA_PKL);
});
