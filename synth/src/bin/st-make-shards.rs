//! `st-make-shards`: the test-data generator (see `st_synth::cli`).

fn main() -> std::process::ExitCode {
    st_synth::cli::main_with(std::env::args_os())
}
