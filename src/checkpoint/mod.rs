//! Checkpoints as read from disk: one reader per input format.

pub mod dcp;
pub mod hf_shards;
pub mod identity;
