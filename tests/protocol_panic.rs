//! A panic inside a phase of a run (issue 24), injected by the test hook
//! `run::PANIC_HOOK_VAR`: every rank fails with the panicking rank's one
//! message, nothing hangs, nothing is written. A file of its own, since
//! the hook is read from the process's environment.

use st_consolidate_mpi::comm::threads::run_ranks;
use st_consolidate_mpi::messages::Silent;
use st_consolidate_mpi::plan::mapping::MappingSource;
use st_consolidate_mpi::run::{Config, PANIC_HOOK_VAR, run};
use std::path::Path;

#[test]
fn a_panic_in_a_phase_fails_every_rank_with_one_message_and_nothing_hangs() {
    let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch-dcp-w2");
    let out = tempfile::tempdir().unwrap();
    for phase in 1..=6 {
        // SAFETY: this binary's only test; no other thread reads or writes
        // the environment meanwhile.
        unsafe { std::env::set_var(PANIC_HOOK_VAR, format!("1:{phase}")) };
        let outcomes = run_ranks(2, |rank| {
            let mut config = Config::new(&input, out.path());
            config.plan.mapping = MappingSource::Mapping(input.join("mapping.json"));
            config.progress_secs = 0.0;
            run(&config, rank, &Silent)
        });
        let texts: Vec<String> = outcomes
            .into_iter()
            .map(|o| o.expect("the panic is caught").unwrap_err().to_string())
            .collect();
        assert!(
            texts[1].contains(&format!(
                "internal error: rank 1 panicked while in phase {phase} of the run: injected by the test hook"
            )),
            "{texts:?}"
        );
        assert_eq!(texts[0], format!("rank 1 hit a bug: {}", texts[1]));
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }
    unsafe { std::env::remove_var(PANIC_HOOK_VAR) };
}
