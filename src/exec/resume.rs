//! `--resume`: which planned outputs an earlier, interrupted run already
//! put in place. Outputs are published by rename only once complete, so a
//! final-named file whose header is byte for byte the planned one (which
//! records the inputs' fingerprint, see [`crate::plan::fingerprint`]) and
//! whose size is the planned size was written from these inputs with this
//! layout; `--verify` then compares its tensor bytes too. A file of this
//! layout from other inputs (the step before), or from a version that
//! recorded no fingerprint, is told apart so the run can say why it is
//! rewritten. Anything else is rewritten.

use crate::error::{Error, Result};
use crate::exec::verify::{Target, planned_target};
use crate::plan::Plan;
use crate::plan::fingerprint::FINGERPRINT_KEY;
use crate::safetensors::header::MAX_HEADER_LEN;
use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

/// What rank 0 found at the planned files' final names.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Found {
    /// Files with exactly the planned header (fingerprint included) and
    /// size: written from these inputs with this layout.
    pub complete: BTreeSet<usize>,
    /// Files of the planned layout whose header records no input
    /// fingerprint (older versions wrote none): only `--verify` can tell
    /// whether they hold these inputs' bytes.
    pub unfingerprinted: BTreeSet<usize>,
    /// Why each other file found under a planned name is rewritten.
    #[serde(skip)]
    pub rewritten: Vec<String>,
}

/// Looks at every planned file's final name in `dir`: a regular file (not
/// a link) of the planned size that starts with the planned header bytes
/// is complete; see [`Found`] for the others.
pub fn find_kept(dir: &Path, plan: &Plan) -> Result<Found> {
    let mut found = Found::default();
    for (f, file) in plan.files.iter().enumerate() {
        let path = dir.join(&file.name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            found.rewritten.push(format!(
                "{} is not a regular file; it is replaced",
                file.name
            ));
            continue;
        }
        let header = read_header_bytes(&path, meta.len())?;
        if header.as_deref() == Some(file.header.as_slice()) && meta.len() == file.len() {
            found.complete.insert(f);
            continue;
        }
        // Same layout with another fingerprint, or none: the planned header
        // re-encoded with the file's own fingerprint is byte for byte its header.
        let theirs = header.as_deref().and_then(recorded_fingerprint);
        let expected = plan.header_with_fingerprint(f, theirs.as_deref());
        let same_layout = header.as_deref() == Some(expected.as_slice())
            && meta.len() == expected.len() as u64 + file.data_len();
        match (same_layout, theirs) {
            (true, None) => {
                found.unfingerprinted.insert(f);
            }
            (true, Some(theirs)) => found.rewritten.push(format!(
                "{} was written from other inputs (its header records input fingerprint {}, \
                 these inputs give {}); it is rewritten",
                file.name,
                short(&theirs),
                short(&recorded_fingerprint(&file.header).unwrap_or_default())
            )),
            (false, _) => found.rewritten.push(format!(
                "{} does not have this plan's header and size (cut short, or another layout); \
                 it is rewritten",
                file.name
            )),
        }
    }
    Ok(found)
}

/// The length prefix and JSON header at the start of the file at `path`
/// (`len` bytes long), or `None` if the prefix cannot be a header's.
fn read_header_bytes(path: &Path, len: u64) -> Result<Option<Vec<u8>>> {
    let read_err = |e| Error::io("read the header of", path, e);
    let mut handle = std::fs::File::open(path).map_err(read_err)?;
    if len < 8 {
        return Ok(None);
    }
    let mut prefix = [0u8; 8];
    handle.read_exact(&mut prefix).map_err(read_err)?;
    let json_len = u64::from_le_bytes(prefix);
    if json_len > MAX_HEADER_LEN || json_len > len - 8 {
        return Ok(None);
    }
    let mut header = prefix.to_vec();
    header.resize(8 + json_len as usize, 0);
    handle.read_exact(&mut header[8..]).map_err(read_err)?;
    Ok(Some(header))
}

/// The input fingerprint a header (length prefix included) records.
fn recorded_fingerprint(header: &[u8]) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(header.get(8..)?).ok()?;
    Some(
        json.get("__metadata__")?
            .get(FINGERPRINT_KEY)?
            .as_str()?
            .to_string(),
    )
}

/// A fingerprint shortened for messages (`sha256:` and 12 hex digits).
fn short(fingerprint: &str) -> &str {
    fingerprint.get(..19).unwrap_or(fingerprint)
}

/// [`Found`] as bytes, to send from rank 0 to every rank.
pub fn encode_found(found: &Found) -> Vec<u8> {
    serde_json::to_vec(found).unwrap_or_default()
}

/// [`Found`] from [`encode_found`]'s bytes; a payload that does not decode
/// fails the run instead of keeping nothing silently.
pub fn decode_found(bytes: &[u8]) -> Result<Found> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::ranks_disagree(
            format!("rank 0 sent an unreadable list of the files to keep: {e}"),
            "all ranks must run the same st-consolidate-mpi binary",
        )
    })
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
        let found = Found {
            complete: kept.clone(),
            unfingerprinted: BTreeSet::from([1]),
            rewritten: vec![],
        };
        assert_eq!(decode_found(&encode_found(&found)).unwrap(), found);
        assert!(decode_found(b"").is_err());
    }

    /// A plan of five one-tensor files whose headers record `fingerprint`.
    fn plan(fingerprint: Option<&str>) -> Plan {
        use crate::checkpoint::FullTensor;
        use crate::plan::mapping::Assignment;
        use crate::safetensors::dtype::Dtype;
        let tensors = (0..5)
            .map(|i| FullTensor {
                name: format!("t{i}"),
                dtype: Dtype::U8,
                shape: vec![16],
                pieces: vec![],
            })
            .collect();
        let assignment = Assignment {
            file_of: vec![1, 2, 3, 4, 5],
            file_count: 5,
            missing: vec![],
        };
        Plan::new(
            vec![],
            tensors,
            assignment,
            1,
            vec![Dtype::U8; 5],
            fingerprint,
        )
    }

    fn write(dir: &Path, plan: &Plan, f: usize, header: &[u8], data: usize) {
        let mut bytes = header.to_vec();
        bytes.resize(header.len() + data, 7);
        std::fs::write(dir.join(&plan.files[f].name), bytes).unwrap();
    }

    #[test]
    fn files_are_told_apart_by_header_fingerprint_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ours = plan(Some("sha256:aaaaaaaaaaaaaaaa"));
        let theirs = plan(Some("sha256:bbbbbbbbbbbbbbbb"));
        let older = plan(None);
        write(d, &ours, 0, &ours.files[0].header, 16);
        write(d, &theirs, 1, &theirs.files[1].header, 16);
        write(d, &older, 2, &older.files[2].header, 16);
        write(d, &ours, 3, &ours.files[3].header, 15);
        std::os::unix::fs::symlink(d.join(&ours.files[0].name), d.join(&ours.files[4].name))
            .unwrap();
        let found = find_kept(d, &ours).unwrap();
        assert_eq!(found.complete, BTreeSet::from([0]));
        assert_eq!(found.unfingerprinted, BTreeSet::from([2]));
        let [other, short, link] = found.rewritten.as_slice() else {
            panic!("{:?}", found.rewritten)
        };
        assert!(other.starts_with("model-00002-of-00005.safetensors was written from other inputs (its header records input fingerprint sha256:bbbbbbbbbbbb, these inputs give sha256:aaaaaaaaaaaa)"), "{other}");
        assert!(
            short.starts_with(
                "model-00004-of-00005.safetensors does not have this plan's header and size"
            ),
            "{short}"
        );
        assert!(
            link.contains("model-00005-of-00005.safetensors is not a regular file"),
            "{link}"
        );
    }
}
