//! The safetensors file format: dtypes; reading, validating and writing
//! headers; JSON that refuses repeated keys; the Hugging Face file names.

pub mod dtype;
pub mod header;
pub mod json;
pub mod naming;
