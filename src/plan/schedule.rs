//! Who writes what: the schedules that split the output bytes among ranks,
//! and each rank's work items (byte ranges of output files).

use crate::plan::Plan;
use std::ops::Range;

/// Output bytes per work item: large enough that per-item overhead vanishes,
/// small enough that a rank's threads share a big file evenly.
pub const WORK_ITEM_BYTES: u64 = 64 << 20;

/// A contiguous range of one output file's data section, copied as a unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkItem {
    /// Index into [`Plan::files`].
    pub file: usize,
    /// Byte range within the file's data section.
    pub bytes: Range<u64>,
}

/// How the output bytes are split among ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Schedule {
    /// Output file `index` is written whole by rank `index % world_size`
    /// (the design card's schedule; one writer per file, safe everywhere).
    #[default]
    Modulo,
    /// The output byte stream (all files' data, in index order) is cut into
    /// one contiguous block per rank, so every rank writes the same number
    /// of bytes; several ranks may write disjoint ranges of one file.
    Balanced,
}

/// Block boundaries of the balanced schedule fall on multiples of this many
/// bytes of a file's data section: a multiple of every element size, so no
/// element is split between ranks (which `--dtype` relies on).
pub const BALANCED_ALIGN: u64 = 4096;

impl Plan {
    /// The work items of `rank` under the plan's schedule, each at most
    /// [`WORK_ITEM_BYTES`], so that threads share even a single large file.
    /// Files in [`Plan::kept`] have no work items: their bytes are done.
    pub fn work_items(&self, rank: usize) -> Vec<WorkItem> {
        let mut items = Vec::new();
        let mut push = |file: usize, range: std::ops::Range<u64>| {
            if self.kept.contains(&file) {
                return;
            }
            let mut start = range.start;
            while start < range.end {
                let end = (start + WORK_ITEM_BYTES).min(range.end);
                items.push(WorkItem {
                    file,
                    bytes: start..end,
                });
                start = end;
            }
        };
        match self.schedule {
            Schedule::Modulo => {
                for file in self.files_of(rank) {
                    push(file, 0..self.files[file].data_len());
                }
            }
            Schedule::Balanced => {
                let starts = self.stream_starts();
                let bounds = self.balanced_bounds(&starts);
                let (lo, hi) = (bounds[rank], bounds[rank + 1]);
                for (file, &start) in starts.iter().enumerate() {
                    let end = start + self.files[file].data_len();
                    if start < hi && lo < end {
                        push(file, lo.max(start) - start..hi.min(end) - start);
                    }
                }
            }
        }
        items
    }

    /// Where each file's data begins in the output byte stream (all files'
    /// data sections, in index order).
    fn stream_starts(&self) -> Vec<u64> {
        self.files
            .iter()
            .scan(0u64, |next, file| {
                let start = *next;
                *next += file.data_len();
                Some(start)
            })
            .collect()
    }

    /// The balanced schedule's block boundaries in the stream, one more than
    /// there are ranks: an even split, each boundary moved down to a
    /// multiple of [`BALANCED_ALIGN`] within its file.
    fn balanced_bounds(&self, starts: &[u64]) -> Vec<u64> {
        let total = self.total_bytes();
        let ranks = self.world_size.max(1) as u128;
        (0..=self.world_size)
            .map(|r| {
                let target = (u128::from(total) * r as u128 / ranks) as u64;
                if target >= total {
                    return total;
                }
                // The file holding byte `target` (skipping empty files).
                let file = starts.partition_point(|&s| s <= target) - 1;
                let local = target - starts[file];
                starts[file] + local - local % BALANCED_ALIGN
            })
            .collect()
    }

    /// Tensor data bytes each rank writes under the plan's schedule
    /// (linear in ranks and files, so previews of many ranks stay fast).
    pub fn bytes_per_rank(&self) -> Vec<u64> {
        self.bytes_per_rank_under(self.schedule)
    }

    /// [`Plan::bytes_per_rank`] if the plan used `schedule` instead (the
    /// dry run compares both without copying the plan's pieces).
    pub fn bytes_per_rank_under(&self, schedule: Schedule) -> Vec<u64> {
        if !self.kept.is_empty() {
            if schedule != self.schedule {
                let mut variant = self.clone();
                variant.schedule = schedule;
                return variant.bytes_per_rank();
            }
            return (0..self.world_size)
                .map(|r| {
                    self.work_items(r)
                        .iter()
                        .map(|i| i.bytes.end - i.bytes.start)
                        .sum()
                })
                .collect();
        }
        match schedule {
            Schedule::Modulo => {
                let mut bytes = vec![0; self.world_size];
                for file in &self.files {
                    bytes[file.owner] += file.data_len();
                }
                bytes
            }
            Schedule::Balanced => self
                .balanced_bounds(&self.stream_starts())
                .windows(2)
                .map(|w| w[1] - w[0])
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::FullTensor;
    use crate::plan::mapping::Assignment;
    use crate::safetensors::dtype::Dtype;
    use proptest::prelude::*;

    fn plan_with(file_sizes: &[u64], ranks: usize, schedule: Schedule) -> Plan {
        let tensors: Vec<FullTensor> = file_sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| FullTensor {
                name: format!("t{i:03}"),
                dtype: Dtype::U8,
                shape: vec![n],
                pieces: vec![],
            })
            .collect();
        let assignment = Assignment {
            file_of: (1..=file_sizes.len() as u32).collect(),
            file_count: file_sizes.len() as u32,
            missing: vec![],
        };
        let dtypes = vec![Dtype::U8; tensors.len()];
        let mut plan = Plan::new(vec![], tensors, assignment, ranks, dtypes, None);
        plan.schedule = schedule;
        plan
    }

    proptest! {
        /// Every byte of every file is in exactly one work item, whatever
        /// the schedule, and balanced boundaries are aligned.
        #[test]
        fn work_items_partition_the_output(
            sizes in prop::collection::vec(0u64..300_000, 1..12),
            ranks in 1usize..70,
            balanced in any::<bool>(),
        ) {
            let schedule = if balanced { Schedule::Balanced } else { Schedule::Modulo };
            let plan = plan_with(&sizes, ranks, schedule);
            let mut items: Vec<WorkItem> = (0..ranks).flat_map(|r| plan.work_items(r)).collect();
            items.sort_by_key(|i| (i.file, i.bytes.start));
            let mut cursor = vec![0u64; sizes.len()];
            for item in &items {
                prop_assert_eq!(item.bytes.start, cursor[item.file]);
                prop_assert!(item.bytes.end > item.bytes.start);
                if balanced && item.bytes.start % WORK_ITEM_BYTES != 0 {
                    prop_assert_eq!(item.bytes.start % BALANCED_ALIGN, 0);
                }
                cursor[item.file] = item.bytes.end;
            }
            prop_assert_eq!(cursor, sizes.clone());
            let per_rank: Vec<u64> = (0..ranks)
                .map(|r| plan.work_items(r).iter().map(|i| i.bytes.end - i.bytes.start).sum())
                .collect();
            prop_assert_eq!(plan.bytes_per_rank(), per_rank);
        }
    }

    #[test]
    fn kept_files_have_no_work_items_under_either_schedule() {
        let sizes = [300_000, 200_000, 100_000];
        for schedule in [Schedule::Modulo, Schedule::Balanced] {
            let mut plan = plan_with(&sizes, 3, schedule);
            plan.kept.insert(1);
            let items: Vec<WorkItem> = (0..3).flat_map(|r| plan.work_items(r)).collect();
            assert!(items.iter().all(|i| i.file != 1), "{schedule:?}");
            let written: u64 = items.iter().map(|i| i.bytes.end - i.bytes.start).sum();
            assert_eq!(written, 400_000, "{schedule:?}");
            assert_eq!(plan.bytes_per_rank().iter().sum::<u64>(), 400_000);
            assert!(plan.files_to_write(plan.files[1].owner).is_empty());
        }
    }

    #[test]
    fn balanced_keeps_every_rank_busy_on_few_files() {
        // 4 files, 64 ranks: modulo leaves 60 idle, balanced none.
        let sizes = [3_000_000_000, 1_000_000_000, 1_000_000_000, 2_000_000_000];
        let modulo = plan_with(&sizes, 64, Schedule::Modulo).bytes_per_rank();
        assert_eq!(modulo.iter().filter(|&&b| b == 0).count(), 60);
        let balanced = plan_with(&sizes, 64, Schedule::Balanced).bytes_per_rank();
        let mean = sizes.iter().sum::<u64>() as f64 / 64.0;
        let max = *balanced.iter().max().unwrap() as f64;
        assert!(balanced.iter().all(|&b| b > 0));
        assert!(max / mean < 1.001, "{}", max / mean);
    }
}
