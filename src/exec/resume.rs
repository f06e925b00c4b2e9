//! `--resume`: which planned outputs an earlier, interrupted run already
//! put in place. Outputs are published by rename only once complete, so a
//! final-named file whose header is byte for byte the planned one and whose
//! size is the planned size holds this plan's layout; `--verify` then
//! compares its tensor bytes too. Anything else is rewritten.

use crate::error::{Error, Result};
use crate::exec::verify::{Target, planned_target};
use crate::plan::Plan;
use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

/// The planned files already complete in `dir`: a regular file (not a
/// link) under the final name, of the planned size, starting with the
/// planned header bytes.
pub fn find_kept(dir: &Path, plan: &Plan) -> Result<BTreeSet<usize>> {
    let mut kept = BTreeSet::new();
    for (f, file) in plan.files.iter().enumerate() {
        let path = dir.join(&file.name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() || meta.len() != file.len() {
            continue;
        }
        let mut start = vec![0u8; file.header.len()];
        std::fs::File::open(&path)
            .and_then(|mut handle| handle.read_exact(&mut start))
            .map_err(|e| Error::io("read the header of", &path, e))?;
        if start == file.header {
            kept.insert(f);
        }
    }
    Ok(kept)
}

/// The kept files `rank` owns, at their final names, to compare byte by
/// byte with the inputs (`--resume --verify`).
pub fn kept_targets(dir: &Path, plan: &Plan, rank: usize) -> Vec<Target> {
    plan.files_of(rank)
        .into_iter()
        .filter(|f| plan.kept.contains(f))
        .map(|f| planned_target(plan, f, dir.join(&plan.files[f].name)))
        .collect()
}

/// The kept set as bytes, to send from rank 0 to every rank.
pub fn encode_kept(kept: &BTreeSet<usize>) -> Vec<u8> {
    kept.iter()
        .flat_map(|&f| (f as u64).to_le_bytes())
        .collect()
}

/// The kept set from [`encode_kept`]'s bytes.
pub fn decode_kept(bytes: &[u8]) -> BTreeSet<usize> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()) as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_sets_survive_the_trip() {
        let kept = BTreeSet::from([0, 3, 70_000]);
        assert_eq!(decode_kept(&encode_kept(&kept)), kept);
        assert!(decode_kept(&[]).is_empty());
    }
}
