//! `--dry-run --ranks N --ranks-per-node K`: the per-node view sums the
//! per-rank bytes of both schedules over nodes of K consecutive ranks.

mod common;
use common::*;

/// The byte columns of `schedule`'s row in a table whose rows start with
/// `leading` other columns (schedule, max/mean, max, [mean,] idle).
fn row(table: &str, schedule: &str, leading: usize) -> Vec<u64> {
    let line = table.lines().find(|l| l.starts_with(schedule)).unwrap();
    line.split_whitespace()
        .skip(leading)
        .filter_map(|w| w.parse().ok())
        .collect()
}

#[test]
fn the_per_node_view_sums_each_nodes_ranks_for_both_schedules() {
    let ckpt = tempfile::tempdir().unwrap();
    let args = [
        "--layout", "mixed", "--ranks", "4", "--files", "5", "--layers", "6", "--hidden", "64",
        "--vocab", "500",
    ];
    make_shards(ckpt.path(), &args);
    let mapping = ckpt.path().join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    let dry = [
        "--dry-run",
        "--ranks",
        "6",
        "--ranks-per-node",
        "4",
        "--mapping",
        s(&mapping),
        s(ckpt.path()),
        s(out.path()),
    ];
    let text = String::from_utf8(consolidate_ok(0, &dry).stdout).unwrap();
    assert!(
        text.contains("per node: 6 rank(s) on 2 node(s) of 4"),
        "{text}"
    );
    let (ranks_table, nodes_table) = text.split_once("per node:").unwrap();
    for schedule in ["modulo", "balanced"] {
        let per_rank = row(ranks_table, schedule, 5);
        let per_node = row(nodes_table, schedule, 4);
        assert_eq!(per_rank.len(), 6, "{schedule}: {text}");
        let expected = vec![
            per_rank[..4].iter().sum::<u64>(),
            per_rank[4..].iter().sum::<u64>(),
        ];
        assert_eq!(per_node, expected, "{schedule}: {text}");
        assert!(expected.iter().sum::<u64>() > 0);
    }
    assert!(names(out.path()).is_empty(), "a dry run writes nothing");
}
