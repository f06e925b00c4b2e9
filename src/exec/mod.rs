//! Carrying out a plan: copying bytes, output files, verification.

pub mod assets;
pub mod cancel;
pub mod clobber;
pub mod convert;
pub mod copy;
pub mod lock;
pub mod needed;
pub mod output;
pub mod publish;
pub mod resume;
pub mod runs;
pub mod verify;
pub mod write;
