//! `--resume` in the run: which files an earlier run completed, agreed by
//! every rank before anyone creates a file.

use super::Job;
use crate::error::Result;
use crate::exec::resume::{decode_kept, encode_kept, find_kept, kept_targets};
use crate::exec::verify::compare;
use crate::plan::Plan;
use std::collections::BTreeSet;

/// `--resume`: the planned files an earlier run completed, found by rank 0
/// and sent to every rank; with `verify`, a file whose tensor bytes differ
/// from the inputs (compared by its owner) is rewritten instead.
pub(super) fn keep_complete_files(job: &Job, plan: &Plan, verify: bool) -> Result<BTreeSet<usize>> {
    let (out, comm, rank) = (&job.config.output, job.comm, job.rank());
    let found = job.on_rank0(|| find_kept(out, plan))?;
    let shared = comm.all_gather(&found.map(|k| encode_kept(&k)).unwrap_or_default())?;
    let mut kept = decode_kept(&shared[0]);
    if verify && !kept.is_empty() {
        let candidates = Plan {
            kept: kept.clone(),
            ..plan.clone()
        };
        let differ = job.agree(|| {
            let mut differ = BTreeSet::new();
            for target in kept_targets(out, &candidates, rank) {
                if !compare(&candidates, std::slice::from_ref(&target))?.is_empty() {
                    let f = plan.files.iter().position(|f| f.name == target.name);
                    differ.extend(f);
                }
            }
            Ok(differ)
        })?;
        for bytes in comm.all_gather(&encode_kept(&differ))? {
            for f in decode_kept(&bytes) {
                job.say(&format!(
                    "resume: {} differs from the inputs; it is rewritten",
                    plan.files[f].name
                ));
                kept.remove(&f);
            }
        }
    }
    job.say(&format!(
        "resume: keeping {} of {} files already complete in {}",
        kept.len(),
        plan.files.len(),
        out.display()
    ));
    Ok(kept)
}
