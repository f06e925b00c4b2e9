//! The safetensors file format: dtypes, and reading, validating and writing
//! headers.

pub mod dtype;
pub mod header;
pub mod json;
