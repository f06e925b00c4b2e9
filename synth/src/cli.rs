//! The `st-make-shards` command line, also called in-process by the tests:
//! writes a synthetic DCP-sharded safetensors checkpoint, laid out as
//! PyTorch's writer does, with mapping.json and manifest.json.

use crate::{Layout, ModelSize, Spec, write};
use clap::Parser;
use st_consolidate_mpi::safetensors::dtype::Dtype;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

/// Write a synthetic DCP-sharded checkpoint (shard-RRRRR-model-IIIII-of-NNNNN.safetensors),
/// plus mapping.json and manifest.json (each full tensor's shape, dtype and sha256).
#[derive(Debug, Parser)]
#[command(name = "st-make-shards", version)]
struct Cli {
    /// Folder to write into (created if missing).
    out_dir: PathBuf,
    /// Source ranks the checkpoint was "saved" from.
    #[arg(long, default_value_t = 4)]
    ranks: usize,
    /// Transformer layers.
    #[arg(long, default_value_t = 2)]
    layers: u32,
    /// Hidden size.
    #[arg(long, default_value_t = 64)]
    hidden: u64,
    /// Vocabulary size.
    #[arg(long, default_value_t = 1000)]
    vocab: u64,
    /// MLP intermediate size [default: twice the hidden size].
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    intermediate: u64,
    /// Output files in the mapping.
    #[arg(long, default_value_t = 2)]
    files: u32,
    /// How tensors are cut across ranks.
    #[arg(long, value_enum, default_value_t = Layout::Mixed)]
    layout: Layout,
    /// Element type of every tensor (the zoo layout uses all of them).
    #[arg(long, default_value = "BF16", value_parser = |s: &str| Dtype::parse(&s.to_uppercase()).map_err(|_| format!("unknown dtype {s}")))]
    dtype: Dtype,
    /// Seed for the tensor bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write headers only and leave the data as holes (for planning at any scale).
    #[arg(long)]
    sparse: bool,
}

/// Runs `st-make-shards` with `args` (the program name first).
pub fn main_with(args: impl IntoIterator<Item = impl Into<OsString> + Clone>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { 2 } else { 0 });
        }
    };
    if cli.ranks == 0 {
        eprintln!("st-make-shards: error: --ranks must be at least 1");
        return ExitCode::from(2);
    }
    let size = ModelSize {
        layers: cli.layers,
        hidden: cli.hidden,
        vocab: cli.vocab,
        intermediate: cli.intermediate,
    };
    let spec = Spec::model(cli.layout, size, cli.ranks, cli.files, cli.dtype, cli.seed);
    match write(&spec, &cli.out_dir, cli.sparse) {
        Ok(written) => {
            eprintln!(
                "wrote {} shard files ({} bytes of tensors) to {}",
                written.files,
                written.bytes,
                cli.out_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!(
                "st-make-shards: error: cannot write {}: {err}",
                cli.out_dir.display()
            );
            ExitCode::FAILURE
        }
    }
}
