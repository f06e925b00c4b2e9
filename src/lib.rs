//! st-consolidate-mpi: consolidates a PyTorch Distributed Checkpoint saved as
//! per-rank safetensors shards into Hugging Face safetensors files, across
//! MPI ranks.
//!
//! Data flows one way, one module per step:
//! [`input`] finds and reads shard headers ([`header`], [`dtype`]);
//! [`dcp`] groups pieces per tensor and checks they tile it;
//! [`mapping`] decides each tensor's output file; [`plan`] lays out the files
//! and assigns them to ranks; [`copy`] moves the bytes using [`runs`];
//! [`output`] makes files appear only when complete; [`driver`] runs the
//! phases over a [`comm::Communicator`].
#![warn(missing_docs)]

pub mod comm;
pub mod convert;
pub mod copy;
pub mod dcp;
pub mod dcp_format;
pub mod driver;
pub mod dtype;
pub mod error;
pub mod header;
pub mod identity;
pub mod input;
pub mod lock;
pub mod mapping;
pub mod names;
pub mod output;
pub mod plan;
pub mod progress;
pub mod report;
pub mod runs;
pub mod verify;

pub use error::{Error, Result};
