//! What people and tools read about a run: what each rank sends rank 0
//! after writing, the JSON that `--report` writes, the human summary printed
//! at the end, the `--dry-run` table, and byte counts for people.

use crate::error::{counted, shown};
use crate::plan::{Plan, Schedule};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

mod nodes;
pub use nodes::{NodeSummary, by_node, per_node_view};

/// What one rank did, sent to rank 0 at the end.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankReport {
    /// The rank.
    pub rank: usize,
    /// The host it ran on.
    #[serde(default)]
    pub host: String,
    /// Output indices it wrote.
    pub files: Vec<u32>,
    /// Tensor bytes it wrote.
    pub bytes: u64,
    /// Seconds from start to its files being renamed into place.
    pub seconds: f64,
    /// Copy threads it used.
    pub threads: usize,
    /// Shard headers it read.
    pub header_files_read: usize,
    /// DCP chunks it located in their archives (those it copied or
    /// verified; see [`crate::checkpoint::dcp::locate`]).
    #[serde(default)]
    pub chunks_located: u64,
    /// Bytes of the chunk files it read to locate them.
    #[serde(default)]
    pub archive_bytes_read: u64,
    /// Bytes of the inputs' ends it read for their content signatures
    /// (its share of the inputs, signed before the plan and again before
    /// publishing; see [`crate::comm::collectives::sign_inputs`]).
    #[serde(default)]
    pub identity_bytes_read: u64,
}

/// Everything `--report FILE.json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Always "st-consolidate-mpi".
    pub tool: &'static str,
    /// The tool's version.
    pub version: &'static str,
    /// The command line, as given.
    pub command_line: Vec<String>,
    /// Ranks in the job.
    pub world_size: usize,
    /// Copy threads of each rank, in rank order.
    pub threads_per_rank: Vec<usize>,
    /// What was read.
    pub input: InputSummary,
    /// One entry per output file.
    pub outputs: Vec<OutputSummary>,
    /// One entry per rank.
    pub ranks: Vec<RankSummary>,
    /// One entry per node (host), rank 0's first.
    pub nodes: Vec<NodeSummary>,
    /// Wall time of the job (the slowest rank), in seconds.
    pub total_seconds: f64,
    /// Tensor bytes written per second over the whole job, in GB/s.
    pub gb_per_s: f64,
    /// Whether `--verify` ran, and its result.
    pub verify: VerifySummary,
    /// `--resume`: the output files kept from an earlier run (not written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<Vec<String>>,
    /// `--hf-assets`: the files copied besides the weights.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub assets: Vec<String>,
    /// The index file written last.
    pub index: String,
}

/// What was read, beyond the plan: for the report, the summary and the
/// dry-run table.
#[derive(Clone, Debug, Default)]
pub struct InputFacts {
    /// The input folder, for people.
    pub dir: String,
    /// `dcp` or `hf-shards`.
    pub format: &'static str,
    /// Saved values that are not tensors (not exported).
    pub non_tensors: Vec<String>,
    /// Every tensor as saved, with its bytes and whether it is exported.
    pub tensors: Vec<(String, u64, bool)>,
    /// What NeMo's `.hf_metadata` in INPUT_DIR provided, for people.
    pub from_hf_metadata: Vec<String>,
}

/// The input side of a run.
#[derive(Clone, Debug, Serialize)]
pub struct InputSummary {
    /// The input folder.
    pub dir: String,
    /// `dcp` or `hf-shards`.
    pub format: &'static str,
    /// Saved values that are not tensors, skipped (not weights).
    pub non_tensors: Vec<String>,
    /// What NeMo's `.hf_metadata` in INPUT_DIR provided (the mapping, the
    /// dtype map, the assets), if it was used.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from_hf_metadata: Vec<String>,
    /// Tensors left out by `--include`/`--exclude`.
    pub excluded_tensors: usize,
    /// Their bytes.
    pub excluded_bytes: u64,
    /// Shard files.
    pub files: usize,
    /// Distinct tensors.
    pub tensors: usize,
    /// Tensor bytes in the full tensors.
    pub bytes: u64,
}

/// One output file.
#[derive(Clone, Debug, Serialize)]
pub struct OutputSummary {
    /// File name.
    pub name: String,
    /// Tensors in it.
    pub tensors: usize,
    /// File size in bytes.
    pub bytes: u64,
    /// The rank that wrote it.
    pub rank: usize,
}

/// One rank.
#[derive(Clone, Debug, Serialize)]
pub struct RankSummary {
    /// The rank.
    pub rank: usize,
    /// The host it ran on.
    pub host: String,
    /// Output files it wrote.
    pub files: Vec<String>,
    /// Tensor bytes it wrote.
    pub bytes: u64,
    /// Its seconds.
    pub seconds: f64,
    /// Its GB/s.
    pub gb_per_s: f64,
    /// Shard headers it read.
    pub header_files_read: usize,
    /// DCP chunks it located in their archives: its share, about 1/N of
    /// them on N ranks (0 for HF shards).
    pub chunks_located: u64,
    /// Bytes of the chunk files it read to locate them.
    pub archive_bytes_read: u64,
    /// Bytes of the inputs' ends it read for their content signatures: its
    /// share of the inputs (those of its node, divided among the node's
    /// ranks), before the plan and again before publishing.
    pub identity_bytes_read: u64,
}

/// Verification, if any.
#[derive(Clone, Debug, Serialize)]
pub struct VerifySummary {
    /// Whether `--verify` ran.
    pub ran: bool,
    /// "passed", or "not run". (A failed verification ends the run with an
    /// error before any report is written.)
    pub result: &'static str,
}

fn rate(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / 1e9 / seconds.max(1e-9)
}

impl RunReport {
    /// Builds the report from the plan and every rank's [`RankReport`].
    pub fn new(
        plan: &Plan,
        facts: &InputFacts,
        command_line: Vec<String>,
        ranks: &[RankReport],
        verified: bool,
    ) -> RunReport {
        let total_seconds = ranks.iter().map(|r| r.seconds).fold(0.0, f64::max);
        RunReport {
            tool: "st-consolidate-mpi",
            version: env!("CARGO_PKG_VERSION"),
            command_line,
            world_size: plan.world_size,
            threads_per_rank: ranks.iter().map(|r| r.threads).collect(),
            input: InputSummary {
                dir: facts.dir.clone(),
                format: facts.format,
                non_tensors: facts.non_tensors.clone(),
                from_hf_metadata: facts.from_hf_metadata.clone(),
                excluded_tensors: facts.tensors.iter().filter(|t| !t.2).count(),
                excluded_bytes: facts.tensors.iter().filter(|t| !t.2).map(|t| t.1).sum(),
                files: plan.shards.len(),
                tensors: plan.tensors.len(),
                bytes: plan.tensors.iter().map(|t| t.byte_len()).sum(),
            },
            outputs: plan
                .files
                .iter()
                .map(|f| OutputSummary {
                    name: f.name.clone(),
                    tensors: f.entries.len(),
                    bytes: f.len(),
                    rank: f.owner,
                })
                .collect(),
            ranks: ranks
                .iter()
                .map(|r| RankSummary {
                    rank: r.rank,
                    host: r.host.clone(),
                    files: r
                        .files
                        .iter()
                        .filter_map(|i| plan.files.iter().find(|f| f.index == *i))
                        .map(|f| f.name.clone())
                        .collect(),
                    bytes: r.bytes,
                    seconds: r.seconds,
                    gb_per_s: rate(r.bytes, r.seconds),
                    header_files_read: r.header_files_read,
                    chunks_located: r.chunks_located,
                    archive_bytes_read: r.archive_bytes_read,
                    identity_bytes_read: r.identity_bytes_read,
                })
                .collect(),
            nodes: by_node(ranks),
            total_seconds,
            gb_per_s: rate(plan.total_bytes(), total_seconds),
            verify: VerifySummary {
                ran: verified,
                result: if verified { "passed" } else { "not run" },
            },
            kept: None,
            assets: vec![],
            index: plan.index_name.clone(),
        }
    }

    /// The human summary printed at the end of a run.
    pub fn human(&self, output_dir: &str) -> String {
        let bytes: u64 = self.ranks.iter().map(|r| r.bytes).sum();
        let kept = match &self.kept {
            Some(kept) => format!("kept {}, ", kept.len()),
            None => String::new(),
        };
        let written = self.outputs.len() - self.kept.as_ref().map_or(0, Vec::len);
        let mut text = format!(
            "{kept}wrote {} and {} to {output_dir}: {} in {:.2} s ({:.2} GB/s) on {}{}",
            counted(written, "file", "files"),
            self.index,
            human_bytes(bytes),
            self.total_seconds,
            self.gb_per_s,
            counted(self.world_size, "rank", "ranks"),
            if self.verify.ran { ", verified" } else { "" }
        );
        if !self.input.non_tensors.is_empty() {
            let count = self.input.non_tensors.len();
            text.push_str(&format!(
                "\n  skipped {count} non-tensor entr{} (not weights; --report lists each):",
                if count == 1 { "y" } else { "ies" },
            ));
            text.push_str(&group_lines(&self.input.non_tensors, "\n    "));
        }
        if !self.assets.is_empty() {
            text.push_str(&format!(
                "\n  copied {} besides the weights: {}",
                counted(self.assets.len(), "file", "files"),
                shown(&self.assets.join(", "))
            ));
        }
        if self.input.excluded_tensors > 0 {
            text.push_str(&format!(
                "\n  left out {} ({}) by --include/--exclude",
                counted(self.input.excluded_tensors, "tensor", "tensors"),
                human_bytes(self.input.excluded_bytes)
            ));
        }
        const SHOWN: usize = 16;
        for r in self.ranks.iter().take(SHOWN) {
            text.push_str(&format!(
                "\n  rank {}: {}, {} in {:.2} s ({:.2} GB/s)",
                r.rank,
                counted(r.files.len(), "file", "files"),
                human_bytes(r.bytes),
                r.seconds,
                r.gb_per_s
            ));
        }
        if self.nodes.len() > 1 {
            text.push_str(&nodes::node_lines(&self.nodes));
        }
        if self.ranks.len() > SHOWN {
            let idle = self.ranks.iter().filter(|r| r.bytes == 0).count();
            text.push_str(&format!(
                "\n  ... {} more ranks ({idle} of all ranks idle; see --report for each)",
                self.ranks.len() - SHOWN
            ));
        }
        text
    }
}

/// The `--dry-run` report: what the checkpoint holds by name prefix, then
/// files, tensors, bytes, owners, bytes per rank.
pub fn describe(plan: &Plan, facts: &InputFacts) -> String {
    let mut out = prefixes(facts);
    out.push_str(&format!(
        "plan: {}, {} from {} into {} on {}\n",
        counted(plan.tensors.len(), "tensor", "tensors"),
        human_bytes(plan.total_bytes()),
        counted(plan.shards.len(), "shard file", "shard files"),
        counted(plan.files.len(), "output file", "output files"),
        counted(plan.world_size, "rank", "ranks")
    ));
    out.push_str(&format!(
        "{:<36} {:>8} {:>14} {:>6}\n",
        "file", "tensors", "bytes", "rank"
    ));
    for file in &plan.files {
        out.push_str(&format!(
            "{:<36} {:>8} {:>14} {:>6}\n",
            file.name,
            file.entries.len(),
            file.len(),
            file.owner
        ));
    }
    out.push_str(&format!(
        "{:<10} {:>9} {:>16} {:>16} {:>11}{}\n",
        "schedule",
        "max/mean",
        "max bytes/rank",
        "mean bytes/rank",
        "idle ranks",
        if plan.world_size <= 16 {
            "   bytes per rank"
        } else {
            ""
        }
    ));
    for schedule in [Schedule::Modulo, Schedule::Balanced] {
        let balance = Balance::under(plan, schedule);
        out.push_str(&format!(
            "{:<10} {:>9.3} {:>16} {:>16.0} {:>11}",
            format!("{schedule:?}").to_lowercase(),
            balance.max_over_mean,
            balance.max,
            balance.mean,
            balance.idle
        ));
        if plan.world_size <= 16 {
            out.push_str("   ");
            out.push_str(
                &balance
                    .per_rank
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        if schedule == plan.schedule {
            out.push_str("   (selected)");
        }
        out.push('\n');
    }
    out
}

/// How many groups of non-tensor entries the summary and the dry run show.
const GROUPS_SHOWN: usize = 8;

/// The group a non-tensor entry is counted in: its first two name components
/// (`optimizer.param_groups.*`, `lr_scheduler.*`), or the name itself.
/// Optimizer hyperparameters come one per parameter, so a real model has
/// thousands of them: they are named by group, with counts.
pub fn non_tensor_group(name: &str) -> String {
    let parts: Vec<&str> = name.splitn(3, '.').collect();
    match parts.len() {
        3 => format!("{}.{}.*", parts[0], parts[1]),
        2 => format!("{}.*", parts[0]),
        _ => name.to_string(),
    }
}

/// Non-tensor entries by [`non_tensor_group`] with counts, largest first
/// (then by name).
pub fn non_tensor_groups(names: &[String]) -> Vec<(String, usize)> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for name in names {
        *counts.entry(non_tensor_group(name)).or_default() += 1;
    }
    let mut groups: Vec<(String, usize)> = counts.into_iter().collect();
    groups.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    groups
}

/// One short line per group, each starting with `lead`: at most
/// [`GROUPS_SHOWN`] groups, and names cut to 64 characters, so no line runs
/// past a screen's width however many entries a checkpoint holds.
fn group_lines(names: &[String], lead: &str) -> String {
    let groups = non_tensor_groups(names);
    let mut out = String::new();
    for (group, count) in groups.iter().take(GROUPS_SHOWN) {
        let shown_name = shown(group);
        let cut: String = shown_name.chars().take(64).collect();
        let cut = if cut.len() < shown_name.len() {
            format!("{cut}…")
        } else {
            cut
        };
        let entries = if *count == 1 { "entry" } else { "entries" };
        out.push_str(&format!("{lead}{cut}: {count} {entries}"));
    }
    if groups.len() > GROUPS_SHOWN {
        out.push_str(&format!(
            "{lead}… and {} more groups",
            groups.len() - GROUPS_SHOWN
        ));
    }
    out
}

/// Whether a saved tensor name looks like optimizer state: under a
/// top-level `optimizer` or `optim` key, or an Adam/SGD state buffer.
pub fn is_optimizer_state(name: &str) -> bool {
    let top = name.split('.').next().unwrap_or(name);
    matches!(top, "optimizer" | "optim")
        || [".exp_avg", ".exp_avg_sq", ".momentum_buffer"]
            .iter()
            .any(|suffix| name.ends_with(suffix))
}

/// One note naming the files named like consolidated outputs that the
/// HF-shards reader skipped (no `DCP_SHARDING_INFO`: an earlier run's
/// output into INPUT_DIR), so that no file is left out without a word.
pub fn skipped_outputs_note(skipped: &[std::path::PathBuf]) -> Option<String> {
    if skipped.is_empty() {
        return None;
    }
    let one = skipped.len() == 1;
    Some(format!(
        "note: skipped {} named like consolidated output{} and without DCP_SHARDING_INFO (an \
         earlier run's output into INPUT_DIR, not shards): {}",
        crate::error::counted(skipped.len(), "file", "files"),
        if one { "" } else { "s" },
        crate::error::list_file_names(skipped)
    ))
}

/// One note when the export includes what looks like optimizer state: its
/// share of the exported bytes and the `--exclude` that leaves it out.
pub fn optimizer_note(facts: &InputFacts) -> Option<String> {
    let exported = facts.tensors.iter().filter(|t| t.2);
    let total: u64 = exported.clone().map(|t| t.1).sum();
    let mut bytes = 0u64;
    let mut globs = std::collections::BTreeSet::new();
    for (name, size, _) in exported.filter(|t| is_optimizer_state(&t.0)) {
        bytes += size;
        let top = name.split('.').next().unwrap_or(name);
        let glob = match top {
            "optimizer" | "optim" => format!("{top}.*"),
            _ => format!("*.{}", name.rsplit('.').next().unwrap_or(name)),
        };
        globs.insert(glob);
    }
    if globs.is_empty() {
        return None;
    }
    let share = 100.0 * bytes as f64 / total.max(1) as f64;
    let excludes: Vec<String> = globs.iter().map(|g| format!("--exclude '{g}'")).collect();
    Some(format!(
        "note: {} of the {} exported ({share:.1}%) look like optimizer state ({}); {} leaves it out",
        human_bytes(bytes),
        human_bytes(total),
        globs.iter().cloned().collect::<Vec<_>>().join(", "),
        excludes.join(" ")
    ))
}

/// Tensors and bytes per first name component (`model.*`, `optim.*`), so a
/// user sees at a glance what the checkpoint holds besides the model, and
/// what `--include`/`--exclude` leave out; then the non-tensor entries.
fn prefixes(facts: &InputFacts) -> String {
    // prefix -> (tensors, bytes, exported tensors)
    let mut groups: BTreeMap<String, (usize, u64, usize)> = BTreeMap::new();
    for (name, bytes, exported) in &facts.tensors {
        let prefix = match name.split_once('.') {
            Some((first, _)) => format!("{first}.*"),
            None => name.clone(),
        };
        let group = groups.entry(prefix).or_default();
        group.0 += 1;
        group.1 += bytes;
        group.2 += usize::from(*exported);
    }
    let total: u64 = groups.values().map(|g| g.1).sum();
    let mut out = format!(
        "checkpoint ({}): {} tensors, {}\n{:<36} {:>8} {:>14} {:>7}  {}\n",
        facts.format,
        facts.tensors.len(),
        human_bytes(total),
        "name prefix",
        "tensors",
        "bytes",
        "share",
        "exported"
    );
    for (prefix, (count, bytes, exported)) in &groups {
        let share = if total > 0 {
            100.0 * *bytes as f64 / total as f64
        } else {
            0.0
        };
        let exported = match *exported {
            e if e == *count => "yes".to_string(),
            0 => "no (--include/--exclude)".to_string(),
            e => format!("{e} of {count}"),
        };
        out.push_str(&format!(
            "{:<36} {:>8} {:>14} {:>6.1}%  {exported}\n",
            shown(prefix),
            count,
            bytes,
            share
        ));
    }
    if !facts.non_tensors.is_empty() {
        out.push_str(&format!(
            "non-tensor entries (skipped, not weights): {}{}\n",
            facts.non_tensors.len(),
            group_lines(&facts.non_tensors, "\n  ")
        ));
    }
    out.push('\n');
    out
}

/// How evenly a plan spreads bytes over its ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct Balance {
    /// Tensor bytes per rank.
    pub per_rank: Vec<u64>,
    /// The busiest rank's bytes.
    pub max: u64,
    /// Mean bytes per rank.
    pub mean: f64,
    /// max / mean (1.0 is perfect).
    pub max_over_mean: f64,
    /// Ranks with nothing to write.
    pub idle: usize,
}

impl Balance {
    /// The balance of `plan` under its schedule.
    pub fn of(plan: &Plan) -> Balance {
        Balance::under(plan, plan.schedule)
    }

    /// The balance `plan` would have under `schedule`.
    pub fn under(plan: &Plan, schedule: Schedule) -> Balance {
        let per_rank = plan.bytes_per_rank_under(schedule);
        let max = per_rank.iter().copied().max().unwrap_or(0);
        let mean = plan.total_bytes() as f64 / plan.world_size.max(1) as f64;
        Balance {
            max,
            mean,
            max_over_mean: if mean > 0.0 { max as f64 / mean } else { 1.0 },
            idle: per_rank.iter().filter(|&&b| b == 0).count(),
            per_rank,
        }
    }
}

/// Formats a byte count for people.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}
