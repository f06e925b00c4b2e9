//! `--resume` in the run: the inputs' fingerprint every header records, and
//! which files an earlier run completed, agreed by every rank before anyone
//! creates a file.

use super::Job;
use crate::checkpoint::dcp::METADATA_FILE;
use crate::checkpoint::format::InputFormat;
use crate::checkpoint::identity::Inputs;
use crate::comm::collectives::agree;
use crate::error::{Error, Result};
use crate::exec::needed::pieces_to_verify;
use crate::exec::resume::{
    Found, decode_found, decode_kept, encode_found, encode_kept, find_kept, kept_targets,
};
use crate::exec::verify::compare;
use crate::plan::Plan;
use crate::plan::fingerprint;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The fingerprint of the inputs (`files`, and a DCP checkpoint's
/// `.metadata`), computed on rank 0 from the sizes and signatures rank 0's
/// view of INPUT_DIR took (`signed`, in the order of `inputs`; see
/// [`crate::comm::collectives::sign_inputs`]) and sent to every rank:
/// every rank's headers then record the same one, and inputs that differ
/// between nodes are named by the content comparison that follows the
/// plan, not hidden in a plan mismatch.
pub(super) fn input_fingerprint(
    job: &Job,
    format: InputFormat,
    files: &[PathBuf],
    inputs: &Inputs,
    signed: Option<&[(u64, String)]>,
) -> Result<String> {
    let input = &job.config.input;
    let metadata = (format == InputFormat::Dcp).then(|| input.join(METADATA_FILE));
    let mine = job.on_rank0(|| {
        let signed = signed.ok_or_else(|| Error::internal("rank 0 has no input signatures"))?;
        let by_path: HashMap<&Path, &(u64, String)> = inputs.paths().zip(signed).collect();
        let files = files
            .iter()
            .map(|path| match by_path.get(path.as_path()) {
                Some((size, signature)) => Ok((path.as_path(), *size, signature.as_str())),
                None => Err(Error::internal(format!(
                    "input {} was not signed",
                    path.display()
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        fingerprint::input_fingerprint(input, &files, metadata.as_deref())
    })?;
    let shared = job.comm.broadcast(0, mine.unwrap_or_default().as_bytes())?;
    String::from_utf8(shared).map_err(|_| {
        Error::ranks_disagree(
            "rank 0 sent an unreadable input fingerprint",
            "all ranks must run the same st-consolidate-mpi binary",
        )
    })
}

/// `--resume`: sets `plan.kept` to the planned files an earlier run
/// completed from these inputs, found by rank 0 and sent to every rank.
/// Every candidate's tensor bytes are then compared with the inputs (each
/// file by its owner, as `--verify` compares) before it is kept: the
/// inputs' fingerprint covers each input's size and both ends only, so a
/// fine-tune that changed the middle of a shard has the same one. A file
/// that differs is rewritten; a file of this layout that records no input
/// fingerprint (an older version wrote it) is kept if its bytes are equal.
pub(super) fn keep_complete_files(job: &Job, plan: &mut Plan) -> Result<()> {
    let (out, comm, rank) = (&job.config.output, job.comm, job.rank());
    let found = job.on_rank0(|| find_kept(out, plan))?;
    for line in found.iter().flat_map(|found| &found.rewritten) {
        job.say(&format!("resume: {line}"));
    }
    let shared = comm.broadcast(0, &found.as_ref().map(encode_found).unwrap_or_default())?;
    let Found {
        complete,
        unfingerprinted,
        ..
    } = agree(comm, decode_found(&shared))?;
    let mut kept = complete;
    // The candidates as they are on disk: an unfingerprinted file's header
    // is the planned one without the fingerprint, so its data starts earlier.
    let mut candidates = Plan {
        kept: kept.iter().chain(&unfingerprinted).copied().collect(),
        ..plan.clone()
    };
    for &f in &unfingerprinted {
        candidates.files[f].header = plan.header_with_fingerprint(f, None);
    }
    if !candidates.kept.is_empty() {
        // This rank compares the kept files it owns: it locates their chunks.
        let targets = kept_targets(out, &candidates, rank);
        let pieces = pieces_to_verify(&candidates, &targets);
        job.locate(&mut candidates, &pieces)?;
        let compared = &candidates;
        let differ = job.agree(|| {
            let mut differ = BTreeSet::new();
            for target in targets {
                if !compare(compared, std::slice::from_ref(&target))?.is_empty() {
                    let f = plan.files.iter().position(|f| f.name == target.name);
                    differ.extend(f);
                }
            }
            Ok(differ)
        })?;
        let differ: BTreeSet<usize> = comm
            .all_gather(&encode_kept(&differ))?
            .iter()
            .flat_map(|bytes| decode_kept(bytes))
            .collect();
        for &f in &candidates.kept {
            let name = &plan.files[f].name;
            if differ.contains(&f) {
                job.say(&format!(
                    "resume: {name} differs from the inputs; it is rewritten"
                ));
            } else if unfingerprinted.contains(&f) {
                job.say(&format!(
                    "resume: {name} records no input fingerprint (an older version wrote it), but its tensor bytes equal the inputs; it is kept"
                ));
                plan.files[f].header = candidates.files[f].header.clone();
                kept.insert(f);
            }
        }
        kept.retain(|f| !differ.contains(f));
        // What was located stays located for the copy.
        plan.tensors = candidates.tensors;
    }
    plan.kept = kept;
    say_kept(job, plan)
}

fn say_kept(job: &Job, plan: &Plan) -> Result<()> {
    job.say(&format!(
        "resume: keeping {} of {} files already complete in {}",
        plan.kept.len(),
        plan.files.len(),
        job.config.output.display()
    ));
    Ok(())
}
