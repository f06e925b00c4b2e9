//! The run's first collective: every rank must have been given the same
//! options wherever they change what a rank does (the mode, the layout,
//! which tensors, how headers are read, resume, overwrite, staging). Ranks
//! given different ones would call different collectives and wait on each
//! other until a timeout, or write different layouts; here they stop at
//! once, naming the option and the ranks. Options that only concern one
//! rank (threads, progress, verbosity, `--report`, which rank 0 alone
//! writes) and the paths (checked later, by what they lead to) are not
//! compared.

use super::Config;
use crate::comm::Communicator;
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};

/// The options every rank must share, by name, as text. A long value (a
/// mapping given as a dict) is shown by its digest.
pub fn described(config: &Config) -> Vec<(&'static str, String)> {
    let read = &config.read;
    let plan = &config.plan;
    let options: [(&'static str, String); 17] = [
        ("mode", format!("{:?}", config.mode)),
        ("input_format", format!("{:?}", read.format)),
        (
            "tag/keep_tied",
            format!("{:?} {}", read.tag, read.keep_tied),
        ),
        ("include/exclude", format!("{:?}", read.select)),
        (
            "allow_missing_shard_files",
            read.allow_missing_shard_files.to_string(),
        ),
        ("source_ranks", format!("{:?}", read.source_ranks)),
        ("headers", format!("{:?}", read.headers)),
        ("mapping", format!("{:?}", plan.mapping)),
        ("unmapped", format!("{:?}", plan.unmapped)),
        ("strip_prefix", format!("{:?}", plan.strip_prefixes)),
        ("dtype", format!("{:?} {:?}", plan.dtype, plan.dtype_map)),
        ("schedule", format!("{:?}", plan.schedule)),
        (
            "index_name/keep_top_level_key",
            format!("{:?} {}", plan.index_name, plan.keep_top_level_key),
        ),
        ("overwrite", config.overwrite.to_string()),
        ("resume", config.resume.to_string()),
        (
            "hf_assets/hf_metadata",
            format!("{:?} {}", config.hf_assets, config.hf_metadata),
        ),
        ("staging", config.staging.is_some().to_string()),
    ];
    options
        .into_iter()
        .map(|(name, value)| {
            if value.len() <= 120 {
                (name, value)
            } else {
                let digest = Sha256::digest(value.as_bytes());
                let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
                (
                    name,
                    format!("a value of {} bytes (digest {hex})", value.len()),
                )
            }
        })
        .collect()
}

/// Collective: compares the options of every rank with rank 0's. One
/// digest per rank crosses the communicator; only when they differ does
/// each rank send what it was given, so that the message can name the
/// first option that differs, its values and the ranks.
pub fn check(comm: &dyn Communicator, config: &Config) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mine = described(config);
    let text = serde_json::to_vec(&mine).unwrap_or_default();
    let digest = Sha256::digest(&text).to_vec();
    let digests = comm.all_gather(&digest)?;
    if digests.iter().all(|d| d == &digests[0]) {
        return Ok(());
    }
    let all: Vec<Vec<(String, String)>> = comm
        .all_gather(&text)?
        .iter()
        .map(|bytes| serde_json::from_slice(bytes).unwrap_or_default())
        .collect();
    let reference = &all[0];
    for (i, (name, value)) in reference.iter().enumerate() {
        let differing: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(_, options)| options.get(i) != Some(&(name.clone(), value.clone())))
            .map(|(rank, options)| {
                let theirs = options.get(i).map_or("?", |(_, v)| v.as_str());
                format!("rank {rank}: {theirs}")
            })
            .collect();
        if !differing.is_empty() {
            return Err(Error::ranks_disagree(
                format!(
                    "the ranks were given different options: {name} is {value} on rank 0, but {}",
                    differing.join("; ")
                ),
                "call every rank with the same options (the same command line, or the same keywords from Python); nothing was read or written",
            ));
        }
    }
    Err(Error::ranks_disagree(
        "the ranks were given different options (rank 0's list differs in length)",
        "all ranks must run the same st-consolidate-mpi version with the same options",
    ))
}
