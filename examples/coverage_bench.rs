//! Times the coverage check on 10,000 pieces of one tensor, in three shapes
//! of tiling (rows, columns, a 100 x 100 mesh). Run by scripts/bench.sh.

use st_consolidate_mpi::checkpoint::coverage::check_coverage;
use st_consolidate_mpi::checkpoint::{Location, Piece};
use std::time::Instant;

fn piece(offsets: &[u64], shape: &[u64]) -> Piece {
    Piece::new(Location::at(0, 0), offsets, shape)
}

fn main() {
    let layouts: [(&str, Vec<u64>, Vec<Piece>); 3] = [
        (
            "10000 row pieces",
            vec![20_000, 64],
            (0..10_000).map(|i| piece(&[i * 2, 0], &[2, 64])).collect(),
        ),
        (
            "10000 column pieces",
            vec![64, 20_000],
            (0..10_000).map(|j| piece(&[0, j * 2], &[64, 2])).collect(),
        ),
        (
            "100x100 mesh pieces",
            vec![300, 500],
            (0..10_000)
                .map(|k| piece(&[(k / 100) * 3, (k % 100) * 5], &[3, 5]))
                .collect(),
        ),
    ];
    for (name, shape, pieces) in layouts {
        let mut times = Vec::new();
        for _ in 0..7 {
            let start = Instant::now();
            check_coverage(&shape, &pieces).expect("a valid tiling");
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| coverage check, {name} | {:.2} ms (median of 7) |",
            times[3]
        );
    }
}
