//! st-consolidate-mpi: consolidates a PyTorch Distributed Checkpoint into
//! Hugging Face safetensors files, across MPI ranks.
//!
//! Data flows one way, each layer using only the ones before it:
//! [`safetensors`] (the file format) → [`checkpoint`] (an input format read
//! into tensors and their pieces) → [`plan`] (output files and who writes
//! what) → [`report`] → [`exec`] (copy, verify, publish) → [`comm`] (the MPI
//! seam and the collectives built on it) → [`progress`] → [`run`] (the
//! phase sequence), which tells a front end's [`messages`] sink what
//! happens and returns the finished report. [`launch`] is the start-up of
//! a front end that is a process of its own (the command).
#![warn(missing_docs)]

pub mod checkpoint;
pub mod comm;
pub mod error;
pub mod exec;
pub mod failure;
pub mod launch;
pub mod messages;
pub mod options;
pub mod plan;
pub mod progress;
pub mod report;
pub mod run;
pub mod safetensors;

pub use error::{Error, Result};
