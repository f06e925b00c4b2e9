//! Fuzzes the safetensors header parser: any bytes, any file length.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((len, json)) = data.split_first_chunk::<8>() {
        let _ = st_consolidate_mpi::safetensors::header::parse_header(json, u64::from_le_bytes(*len));
    }
});
