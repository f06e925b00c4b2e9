# What the bench scripts share; sourced by scripts/bench*.sh.

# timed FILE COMMAND...: runs COMMAND and appends its wall time, in
# seconds, to FILE (one line per run; the scripts take medians of them).
timed() {
    local out=$1; shift
    local t0 t1
    t0=$(date +%s%N)
    "$@"
    t1=$(date +%s%N)
    echo "$(( (t1 - t0) / 1000 ))e-6" >> "$out"
}
