//! The per-node roll-up of a run: which host ran which ranks, and how many
//! bytes they wrote how fast, for `--report` and the summary.

use super::{Balance, RankReport, rate};
use crate::plan::{Plan, Schedule};
use serde::Serialize;
use std::collections::BTreeMap;

/// One node (host) of the job.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeSummary {
    /// The host name, as the node's ranks saw it.
    pub host: String,
    /// Its ranks, in order.
    pub ranks: Vec<usize>,
    /// Tensor bytes its ranks wrote.
    pub bytes: u64,
    /// Seconds of its slowest rank.
    pub seconds: f64,
    /// Its bytes over its slowest rank's seconds, in GB/s.
    pub gb_per_s: f64,
}

/// Rolls every rank's report up by host, hosts in the order of their
/// lowest rank (rank 0's node first).
pub fn by_node(ranks: &[RankReport]) -> Vec<NodeSummary> {
    let mut order: Vec<&str> = Vec::new();
    let mut nodes: BTreeMap<&str, NodeSummary> = BTreeMap::new();
    for r in ranks {
        let node = nodes.entry(r.host.as_str()).or_insert_with(|| {
            order.push(r.host.as_str());
            NodeSummary {
                host: r.host.clone(),
                ranks: Vec::new(),
                bytes: 0,
                seconds: 0.0,
                gb_per_s: 0.0,
            }
        });
        node.ranks.push(r.rank);
        node.bytes += r.bytes;
        node.seconds = node.seconds.max(r.seconds);
    }
    order
        .into_iter()
        .filter_map(|host| nodes.remove(host))
        .map(|mut node| {
            node.gb_per_s = rate(node.bytes, node.seconds);
            node
        })
        .collect()
}

/// One summary line per node, for people.
pub fn node_lines(nodes: &[NodeSummary]) -> String {
    nodes
        .iter()
        .map(|n| {
            format!(
                "\n  node {}: {} rank(s) ({}), {} in {:.2} s ({:.2} GB/s)",
                n.host,
                n.ranks.len(),
                n.ranks
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                super::human_bytes(n.bytes),
                n.seconds,
                n.gb_per_s
            )
        })
        .collect()
}

/// The `--dry-run --ranks-per-node K` view: the plan's ranks placed on
/// nodes of K consecutive ranks (srun's and mpirun's default block
/// placement), and the tensor bytes each node writes under both schedules.
pub fn per_node_view(plan: &Plan, ranks_per_node: usize) -> String {
    let k = ranks_per_node.max(1);
    let nodes = plan.world_size.div_ceil(k);
    let mut out = format!(
        "per node: {} rank(s) on {nodes} node(s) of {k} (node n runs ranks n*{k}..)\n{:<10} {:>9} {:>16} {:>11}{}\n",
        plan.world_size,
        "schedule",
        "max/mean",
        "max bytes/node",
        "idle nodes",
        if nodes <= 16 { "   bytes per node" } else { "" }
    );
    for schedule in [Schedule::Modulo, Schedule::Balanced] {
        let mut variant = plan.clone();
        variant.schedule = schedule;
        let per_node = bytes_per_node(&Balance::of(&variant).per_rank, k);
        let max = per_node.iter().copied().max().unwrap_or(0);
        let mean = plan.total_bytes() as f64 / nodes.max(1) as f64;
        out.push_str(&format!(
            "{:<10} {:>9.3} {:>16} {:>11}",
            format!("{schedule:?}").to_lowercase(),
            if mean > 0.0 { max as f64 / mean } else { 1.0 },
            max,
            per_node.iter().filter(|&&b| b == 0).count()
        ));
        if nodes <= 16 {
            let shown: Vec<String> = per_node.iter().map(u64::to_string).collect();
            out.push_str(&format!("   {}", shown.join(" ")));
        }
        out.push('\n');
    }
    out
}

/// Sums bytes per rank over nodes of `k` consecutive ranks.
fn bytes_per_node(per_rank: &[u64], k: usize) -> Vec<u64> {
    per_rank.chunks(k).map(|node| node.iter().sum()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(rank: usize, host: &str, bytes: u64, seconds: f64) -> RankReport {
        RankReport {
            rank,
            host: host.to_string(),
            bytes,
            seconds,
            ..RankReport::default()
        }
    }

    #[test]
    fn ranks_roll_up_by_host_in_order_of_their_lowest_rank() {
        let ranks = [
            rank(0, "nodeb", 1_000_000_000, 1.0),
            rank(1, "nodea", 3_000_000_000, 2.0),
            rank(2, "nodeb", 2_000_000_000, 3.0),
            rank(3, "nodea", 0, 0.5),
        ];
        let nodes = by_node(&ranks);
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].host, "nodeb");
        assert_eq!(nodes[0].ranks, vec![0, 2]);
        assert_eq!(nodes[0].bytes, 3_000_000_000);
        assert_eq!(nodes[0].seconds, 3.0);
        assert!((nodes[0].gb_per_s - 1.0).abs() < 1e-9);
        assert_eq!(nodes[1].host, "nodea");
        assert_eq!(nodes[1].ranks, vec![1, 3]);
        assert!((nodes[1].gb_per_s - 1.5).abs() < 1e-9);
        let lines = node_lines(&nodes);
        assert!(lines.contains("node nodeb: 2 rank(s) (0,2), 3.00 GB in 3.00 s (1.00 GB/s)"));
        assert!(lines.contains("node nodea: 2 rank(s) (1,3)"));
    }

    #[test]
    fn bytes_per_node_sums_consecutive_ranks_and_a_short_last_node() {
        assert_eq!(bytes_per_node(&[1, 2, 3, 4, 5], 2), vec![3, 7, 5]);
        assert_eq!(bytes_per_node(&[1, 2, 3], 1), vec![1, 2, 3]);
        assert_eq!(bytes_per_node(&[1, 2, 3], 8), vec![6]);
    }
}
