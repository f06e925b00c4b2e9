//! Which rank verifies which output file under `--verify`.
//!
//! A rank compares what it reads back with its own view of INPUT_DIR. Where
//! each node has its own copy of INPUT_DIR, a rank that verified the files
//! it wrote would compare them with the very copy it wrote them from, and a
//! copy differing from the other nodes' in the middle of a file (the ranks
//! compare only sizes and both ends before writing) would pass. So where
//! the ranks sit on more than one host, each file is verified by a rank on
//! another host than its owner's, against that host's copy: any difference
//! between the two copies in the bytes the file holds is then a mismatch.
//! Under the balanced schedule other ranks write blocks of a file too; the
//! assignment is per file, by its owner's host. On one host every rank
//! verifies the files it owns, as before.

use super::targets::{Target, planned_target};
use crate::error::COMPARED_ELSEWHERE;
use crate::exec::output::temp_name;
use crate::plan::Plan;
use std::path::Path;

/// The rank that verifies the files `owner` owns, given every rank's host
/// name (in rank order): a rank on another host than the owner's, the
/// owner itself if every rank is on its host.
///
/// Counting from the rank after the owner (wrapping around), the ranks on
/// other hosts are taken in order, and the owner's position among its own
/// host's ranks picks one of them: two ranks of a node hand their files to
/// two different ranks elsewhere, so the reading is spread over the ranks
/// of the other nodes instead of falling on the first of them.
pub fn verifier_of(owner: usize, hosts: &[String]) -> usize {
    let n = hosts.len();
    let Some(own_host) = hosts.get(owner) else {
        return owner;
    };
    let elsewhere: Vec<usize> = (1..n)
        .map(|k| (owner + k) % n)
        .filter(|&r| hosts[r] != *own_host)
        .collect();
    if elsewhere.is_empty() {
        return owner;
    }
    let position = hosts[..owner].iter().filter(|h| *h == own_host).count();
    elsewhere[position % elsewhere.len()]
}

/// The files `rank` verifies after they are written (the plan's files it
/// writes no more: kept ones left out), read under their temporary names in
/// `out_dir` (a folder every rank sees: the run proved it before writing).
/// A file written on another host carries the note naming both hosts that
/// its mismatches end with.
pub fn targets_to_verify(
    plan: &Plan,
    out_dir: &Path,
    rank: usize,
    hosts: &[String],
) -> Vec<Target> {
    (0..plan.files.len())
        .filter(|f| !plan.kept.contains(f))
        .filter(|&f| verifier_of(plan.files[f].owner, hosts) == rank)
        .map(|f| {
            let file = &plan.files[f];
            let mut target = planned_target(plan, f, out_dir.join(temp_name(&file.name)));
            let (written, compared) = (&hosts[file.owner], &hosts[rank]);
            if written != compared {
                target.origin = Some(format!(
                    "written on {written}, compared on {compared} {COMPARED_ELSEWHERE}"
                ));
            }
            target
        })
        .collect()
}

/// Whether the ranks sit on more than one host (so `--verify` compares
/// each file on another host than the one that wrote it).
pub fn across_hosts(hosts: &[String]) -> bool {
    hosts.iter().any(|h| *h != hosts[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn one_host_verifies_its_own_files() {
        let one = hosts(&["a", "a", "a"]);
        for owner in 0..3 {
            assert_eq!(verifier_of(owner, &one), owner);
        }
        assert_eq!(verifier_of(0, &hosts(&["a"])), 0);
        assert!(!across_hosts(&one));
    }

    #[test]
    fn two_nodes_spread_over_the_other_nodes_ranks() {
        let two = hosts(&["a", "a", "b", "b"]);
        let verifiers: Vec<usize> = (0..4).map(|o| verifier_of(o, &two)).collect();
        assert_eq!(verifiers, [2, 3, 0, 1]);
        assert!(across_hosts(&two));
    }

    #[test]
    fn the_verifier_is_always_on_another_host_when_there_is_one() {
        for layout in [
            hosts(&["a", "b", "b", "b"]),
            hosts(&["b", "a", "b", "a", "c"]),
            hosts(&["a", "a", "a", "b"]),
            hosts(&["a", "b"]),
        ] {
            for owner in 0..layout.len() {
                let v = verifier_of(owner, &layout);
                assert!(v < layout.len());
                assert_ne!(layout[v], layout[owner], "{layout:?} owner {owner} -> {v}");
            }
        }
        // Interleaved hosts: the first rank after the owner on another host.
        assert_eq!(verifier_of(0, &hosts(&["a", "b", "a", "b"])), 1);
        assert_eq!(verifier_of(3, &hosts(&["a", "b", "a", "b"])), 2);
        // One rank on a: every file of b's ranks goes to it.
        let uneven = hosts(&["a", "b", "b", "b"]);
        assert_eq!(
            (0..4).map(|o| verifier_of(o, &uneven)).collect::<Vec<_>>(),
            [1, 0, 0, 0]
        );
    }

    /// A plan of `files` one-tensor files for `ranks` ranks (modulo owners).
    fn plan(files: usize, ranks: usize) -> Plan {
        use crate::checkpoint::{FullTensor, Location, Piece};
        use crate::plan::mapping::Assignment;
        use crate::safetensors::dtype::Dtype;
        let tensors = (0..files)
            .map(|i| FullTensor {
                name: format!("t{i}"),
                dtype: Dtype::U8,
                shape: vec![4],
                pieces: vec![Piece::new(Location::at(0, 0), &[0], &[4])],
            })
            .collect();
        let assignment = Assignment {
            file_of: (1..=files as u32).collect(),
            file_count: files as u32,
            missing: vec![],
        };
        Plan::new(
            vec![],
            tensors,
            assignment,
            ranks,
            vec![Dtype::U8; files],
            None,
        )
    }

    #[test]
    fn every_file_is_verified_once_under_its_temporary_name() {
        let plan = plan(6, 4);
        let out = Path::new("/out");
        for layout in [hosts(&["a", "a", "b", "b"]), hosts(&["a", "a", "a", "a"])] {
            let mut seen = Vec::new();
            for rank in 0..4 {
                for target in targets_to_verify(&plan, out, rank, &layout) {
                    let f = plan
                        .files
                        .iter()
                        .position(|f| f.name == target.name)
                        .unwrap();
                    let owner = plan.files[f].owner;
                    assert_eq!(target.path, out.join(temp_name(&target.name)));
                    match across_hosts(&layout) {
                        true => {
                            assert_ne!(layout[owner], layout[rank]);
                            assert_eq!(
                                target.origin.as_deref(),
                                Some(
                                    format!(
                                        "written on {}, compared on {} against its copy of INPUT_DIR",
                                        layout[owner], layout[rank]
                                    )
                                    .as_str()
                                )
                            );
                        }
                        false => {
                            assert_eq!(owner, rank);
                            assert_eq!(target.origin, None);
                        }
                    }
                    seen.push(f);
                }
            }
            seen.sort();
            assert_eq!(seen, (0..6).collect::<Vec<_>>(), "{layout:?}");
        }
        // Files kept by --resume are not verified again here.
        let mut kept = plan;
        kept.kept = [0, 1].into_iter().collect();
        let all: usize = (0..4)
            .map(|r| {
                targets_to_verify(&kept, Path::new("/out"), r, &hosts(&["a", "a", "b", "b"])).len()
            })
            .sum();
        assert_eq!(all, 4);
    }

    #[test]
    fn an_owner_outside_the_host_list_verifies_itself() {
        assert_eq!(verifier_of(5, &hosts(&["a", "b"])), 5);
    }
}
