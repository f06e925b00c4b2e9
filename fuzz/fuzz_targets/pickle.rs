//! Fuzzes the pickle reader and the interpretations built on it: any
//! bytes, under both the `.metadata` and the `data.pkl` limits, through the
//! `.metadata` reader that folds objects as they are parsed, and as
//! DeepSpeed's model-states and optimizer-states pickles.
#![no_main]

use libfuzzer_sys::fuzz_target;
use st_consolidate_mpi::checkpoint::dcp::metadata::parse_metadata;
use st_consolidate_mpi::checkpoint::dcp::pickle::{Limits, parse};
use st_consolidate_mpi::checkpoint::deepspeed::interpret_pickle;

fuzz_target!(|data: &[u8]| {
    let _ = parse(data, &Limits::METADATA);
    let _ = parse_metadata(data);
    let _ = parse(data, &Limits::DATA_PKL);
    let _ = interpret_pickle(data);
});
