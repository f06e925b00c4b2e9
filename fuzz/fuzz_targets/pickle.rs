//! Fuzzes the pickle reader and the `.metadata` interpretation built on it:
//! any bytes, under both the `.metadata` and the `data.pkl` limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use st_consolidate_mpi::checkpoint::dcp::metadata::from_pickle;
use st_consolidate_mpi::checkpoint::dcp::pickle::{Limits, parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(pickle) = parse(data, &Limits::METADATA) {
        let _ = from_pickle(&pickle);
    }
    let _ = parse(data, &Limits::DATA_PKL);
});
