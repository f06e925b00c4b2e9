#!/usr/bin/env bash
# Multi-node tests on one machine, run by scripts/test.sh. scripts/node-agent.sh
# stands in for ssh: each "node" (nodea, nodeb) gets its own hostname and mount
# namespace, and ranks talk over TCP on loopback as across a network.
# Checked: output byte-identical to a one-node run (both schedules, --headers,
# --verify, --dtype), uneven ranks per node and per-node default threads, a
# node-local OUTPUT_DIR refused, node-local INPUT_DIR copies compared (their
# ends before writing, every byte under --verify, HF shards and DCP), a node
# killed mid-copy, one progress stream and summary, hosts in the report, and
# srun -N 2 on two slurmd nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# TCP instead of shared memory between the nodes; loopback only.
export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,tcp OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
cargo build --release --quiet --workspace --bins
bin=$PWD/target/release/st-consolidate-mpi
agent=$PWD/scripts/node-agent.sh

work=$(mktemp -d)
# The Slurm case's folder: not under /tmp, which each slurmd node replaces.
slurm_dir=$(mktemp -d -p /var/tmp)
cleanup() {
    SLURM_CONF=$slurm_dir/slurm.conf scontrol shutdown >/dev/null 2>&1 || true
    sleep 1
    rm -rf "$work" "$slurm_dir"
}
trap cleanup EXIT
export NODE_SESSION_DIR=$work/sessions

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "ok: $1"; }
fail() { failed=$((failed + 1)); echo "FAILED: $1"; shift; printf '%s\n' "$@" | tail -n 20 | sed 's/^/    /'; }
matches() { python3 scripts/check_manifest.py "$1" "$2/manifest.json" >/dev/null; }
# on_nodes HOSTS ARGS...: the tool on emulated nodes, e.g. nodea:2,nodeb:2.
on_nodes() {
    local hosts=$1 np
    shift
    np=$(tr ',' '\n' <<<"$hosts" | awk -F: '{ n += $2 } END { print n }')
    timeout 120 mpirun --mca plm_rsh_agent "$agent" --mca plm_rsh_no_tree_spawn 1 \
        ${MPIRUN_TAG:+--tag-output} --host "$hosts" -n "$np" "$bin" "$@"
}
# untag RANKS: the lines of the ranks matching RANKS (a sed pattern) from
# mpirun --tag-output (MPIRUN_TAG=1), where each line is whole and tagged
# [job,rank]<stderr>:.
untag() { sed -n "s/^\[[0-9]*,$1\]<std...>://p"; }
# Final-named outputs (no temporaries, no lock) anywhere under a folder.
finals() { find "$1" -name 'model*' ! -name '.*' 2>/dev/null; }

ckpt=$work/ckpt
target/release/st-make-shards "$ckpt" --layout mixed --ranks 4 --files 6 --layers 6 --hidden 64 --vocab 500 2>/dev/null
map=(--mapping "$ckpt/mapping.json")

# 1. Byte-identical to one node, for each way of running.
for options in "--schedule modulo --headers all" "--schedule balanced --headers shared" \
    "--schedule balanced --headers all --verify" "--schedule modulo --headers shared --dtype bf16"; do
    name=$(tr -c 'a-z0-9' '_' <<<"$options")
    # shellcheck disable=SC2086
    if one=$(mpirun -n 4 "$bin" -q $options "${map[@]}" "$ckpt" "$work/one-$name" 2>&1) &&
        two=$(on_nodes nodea:2,nodeb:2 -q $options "${map[@]}" "$ckpt" "$work/two-$name" 2>&1) &&
        diff -r "$work/one-$name" "$work/two-$name" >/dev/null &&
        [ "$(ls "$work/two-$name" | wc -l)" -gt 6 ]; then
        pass "2 nodes x 2 ranks, $options: byte-identical to 1 node"
    else
        fail "2 nodes x 2 ranks, $options" "$one" "${two:-}" "$(diff -r "$work/one-$name" "$work/two-$name" 2>&1)"
    fi
done

# 2. Uneven ranks per node: correct output; default threads = cores / ranks
#    on each node (the per-rank -v lines say which).
cores=$(nproc)
one_rank=$((cores)) three_ranks=$((cores / 3 > 0 ? cores / 3 : 1))
if out=$(MPIRUN_TAG=1 on_nodes nodea:1,nodeb:3 -v "${map[@]}" "$ckpt" "$work/out-uneven" 2>&1) &&
    matches "$work/out-uneven" "$ckpt" &&
    untag 0 <<<"$out" | grep -q "^rank 0 on nodea: .* by $one_rank thread(s)" &&
    [ "$(untag '[123]' <<<"$out" | grep -c "^rank [123] on nodeb: .* by $three_ranks thread(s)")" = 3 ]; then
    pass "nodea:1,nodeb:3: correct; threads $one_rank on nodea, $three_ranks per rank on nodeb"
else
    fail "nodea:1,nodeb:3" "$out"
fi

# 3. A node-local OUTPUT_DIR is refused before writing, naming both hosts.
if out=$(NODE_LOCAL_DIR=$work/out-local NODE_LOCAL_ROOT=$work/local-out \
    on_nodes nodea:2,nodeb:2 "${map[@]}" "$ckpt" "$work/out-local" 2>&1); then
    fail "node-local OUTPUT_DIR must be refused" "$out"
elif grep -q "is not the same folder on every rank: rank 2 on nodeb, rank 3 on nodeb .* rank 0 on nodea" <<<"$out" &&
    [ -z "$(finals "$work/local-out")" ] && [ -z "$(find "$work/local-out" -name '*.tmp')" ]; then
    pass "node-local OUTPUT_DIR refused before writing, naming nodea and nodeb"
else
    fail "node-local OUTPUT_DIR message" "$out" "$(find "$work/local-out")"
fi

# 4. Node-local INPUT_DIR copies: identical ones work, differing ones are
#    refused (one data byte flipped at the end of one shard on nodeb).
mkdir -p "$work/local-in"
cp -a "$ckpt" "$work/local-in/nodea"
cp -a "$ckpt" "$work/local-in/nodeb"
in_args=(--mapping "$work/in/mapping.json" "$work/in")
if out=$(NODE_LOCAL_DIR=$work/in NODE_LOCAL_ROOT=$work/local-in \
    on_nodes nodea:2,nodeb:2 "${in_args[@]}" "$work/out-in-same" 2>&1) &&
    matches "$work/out-in-same" "$ckpt"; then
    pass "node-local INPUT_DIR with identical copies accepted"
else
    fail "node-local INPUT_DIR, identical copies" "$out"
fi
shard=$(find "$work/local-in/nodeb" -name '*.safetensors' | sort | head -1)
python3 - "$shard" <<'PY'
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(-1, 2)
    last = f.read(1)
    f.seek(-1, 2)
    f.write(bytes([last[0] ^ 0xFF]))
PY
if out=$(NODE_LOCAL_DIR=$work/in NODE_LOCAL_ROOT=$work/local-in \
    on_nodes nodea:2,nodeb:2 "${in_args[@]}" "$work/out-in-diff" 2>&1); then
    fail "differing node-local INPUT_DIR copies must be refused" "$out"
elif grep -q "input $work/in/$(basename "$shard") does not hold the same bytes on every rank: rank 2 on nodeb, rank 3 on nodeb" <<<"$out" &&
    [ -z "$(finals "$work/out-in-diff")" ]; then
    pass "differing node-local INPUT_DIR copies refused, naming the file and nodeb's ranks"
else
    fail "differing INPUT_DIR copies message" "$out"
fi

# 4b. Node-local INPUT_DIR copies differing in one byte in the middle of one
#     input (same size, same first and last 64 KiB: all the ranks compare
#     before writing): --verify compares each file on the other node than the
#     one that wrote it, and fails naming the file, the tensor and both
#     nodes, for HF shards and DCP; identical copies pass --verify.
# mid_byte FILE: flips a byte in the middle of FILE's tensor data (for a
# .distcp, the middle of the data entry nearest the file's middle), outside
# the first and last 64 KiB.
mid_byte() {
    python3 - "$1" <<'PY'
import struct, sys
path = sys.argv[1]
data = open(path, "rb").read()
edge = 64 << 10
at = len(data) // 2
if path.endswith(".distcp"):
    # Each chunk is a torch.save zip; its data entries ("…/data/N") are
    # written with a data descriptor (PK\x07\x08) after their bytes.
    spans = []
    pos = data.find(b"PK\x03\x04")
    while pos >= 0:
        nlen, elen = struct.unpack_from("<HH", data, pos + 26)
        start = pos + 30 + nlen + elen
        end = data.find(b"PK\x07\x08", start)
        if b"/data/" in data[pos + 30:pos + 30 + nlen] and end > start:
            spans.append((start + end) // 2)
        pos = data.find(b"PK\x03\x04", pos + 4)
    at = min(spans, key=lambda m: abs(m - at))
assert edge < at < len(data) - edge, (path, len(data), at)
with open(path, "r+b") as f:
    f.seek(at)
    byte = f.read(1)
    f.seek(at)
    f.write(bytes([byte[0] ^ 0xFF]))
PY
}
# differs_mid NAME OPTIONS_ARRAY HOSTS NODE: a passing --verify run on the
# identical copies in $work/local-mid/NAME/{nodea,nodeb}, then one byte
# flipped in NODE's copy of its largest input, then a --verify run that must
# fail naming both nodes. Before each file was compared on another node, a
# rank verified what it wrote against its own copy, and both cases below
# passed --verify with exit 0: HF shards with nodeb's copy changed (nodeb's
# rank 2 writes the file it feeds, so a changed lm_head was published), DCP
# with nodea's (its one file is written and verified on nodeb; a change on
# nodeb would have been caught by the chunk CRC-32s alone, without naming
# the nodes).
differs_mid() {
    local name=$1 hosts=$3 node=$4 out shard
    local -n args=$2
    if out=$(NODE_LOCAL_DIR=$work/in NODE_LOCAL_ROOT=$work/local-mid/$name \
        on_nodes "$hosts" --verify "${args[@]}" "$work/out-mid-$name-same" 2>&1) &&
        grep -q "^verified: every written byte equals the inputs, each file compared on another node than the one that wrote it" <<<"$out" &&
        [ -n "$(finals "$work/out-mid-$name-same")" ]; then
        pass "$name: identical node-local INPUT_DIR copies pass --verify on two nodes"
    else
        fail "$name: identical node-local copies under --verify" "$out"
    fi
    shard=$(find "$work/local-mid/$name/$node" -type f \( -name '*.safetensors' -o -name '*.distcp' \) -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2)
    [ "$(stat -c %s "$shard")" -gt $((128 << 10)) ] || fail "$name: $shard is not larger than 128 KiB"
    mid_byte "$shard"
    if out=$(NODE_LOCAL_DIR=$work/in NODE_LOCAL_ROOT=$work/local-mid/$name \
        on_nodes "$hosts" --verify "${args[@]}" "$work/out-mid-$name-diff" 2>&1); then
        fail "$name: node-local copies differing mid-file must fail --verify" "$out"
    elif grep -q "verification failed for " <<<"$out" &&
        grep -Eq "^  '[^']+' in model[^:]*: first difference at byte [0-9]+ of the tensor .*; written on node(a|b), compared on node(a|b) against its copy of INPUT_DIR$" <<<"$out" &&
        grep -Eq "written on nodea, compared on nodeb|written on nodeb, compared on nodea" <<<"$out" &&
        grep -q "hint: .* the nodes' copies of INPUT_DIR likely differ" <<<"$out" &&
        [ -z "$(finals "$work/out-mid-$name-diff")" ]; then
        pass "$name: node-local copies differing in one mid-file byte fail --verify, naming the file, the tensor and both nodes"
    else
        fail "$name: mid-file difference under --verify" "$out"
    fi
}
mid=$work/mid
target/release/st-make-shards "$mid" --layout mixed --ranks 4 --files 2 --layers 2 --hidden 256 --vocab 4000 2>/dev/null
for node in nodea nodeb; do
    mkdir -p "$work/local-mid/hf" "$work/local-mid/dcp"
    cp -a "$mid" "$work/local-mid/hf/$node"
    cp -a tests/fixtures/layout-torchtitan "$work/local-mid/dcp/$node"
done
# shellcheck disable=SC2034 # read through differs_mid's nameref
hf_args=(--mapping "$work/in/mapping.json" "$work/in") dcp_args=("$work/in")
differs_mid hf hf_args nodea:2,nodeb:2 nodeb
differs_mid dcp dcp_args nodea:1,nodeb:1 nodea

# 5. A node killed mid-copy: mpirun ends the job, every rank exits non-zero
#    within the timeout, nothing is final-named, and a rerun completes.
big=$work/big
target/release/st-make-shards "$big" --layout tp --ranks 8 --files 4 --layers 9 --hidden 2048 --vocab 32000 2>/dev/null
out_kill=$work/out-kill
on_nodes nodea:1,nodeb:1 -q --threads 1 --mapping "$big/mapping.json" "$big" "$out_kill" >"$work/kill.log" 2>&1 &
launcher=$!
for _ in $(seq 1000); do
    ls -A "$out_kill" 2>/dev/null | grep -q '\.tmp$' && break
    sleep 0.02
done
"$agent" --kill nodeb
rc=0
wait "$launcher" || rc=$?
# Ranks of this run still alive: their command line names the binary and
# $out_kill. They must all be gone within 10 s of mpirun's exit.
ranks_alive() {
    local proc
    for proc in /proc/[0-9]*; do
        tr '\0' ' ' 2>/dev/null <"$proc/cmdline" | grep -qF "$bin -q --threads 1 --mapping $big/mapping.json $big $out_kill" &&
            echo "${proc#/proc/}"
    done
    return 0
}
for _ in $(seq 100); do
    alive=$(ranks_alive)
    [ -z "$alive" ] && break
    sleep 0.1
done
if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ -z "$alive" ] && [ -z "$(finals "$out_kill")" ] &&
    ls -A "$out_kill" | grep -q '\.tmp$' &&
    rerun=$(on_nodes nodea:1,nodeb:1 -q --mapping "$big/mapping.json" "$big" "$out_kill" 2>&1) &&
    matches "$out_kill" "$big"; then
    pass "nodeb killed mid-copy: mpirun exit $rc, no rank left, nothing final-named, rerun completes"
else
    fail "node killed mid-copy (exit $rc, alive: $alive)" "$(cat "$work/kill.log")" "$(ls -A "$out_kill")" "${rerun:-}"
fi

# 6. Progress and the summary come once, from rank 0 (on nodeb here), as
#    mpirun's --tag-output shows ([job,rank]<stderr>:); progress only moves
#    forward (every rank printing would repeat each job-wide figure); and the
#    report names both hosts, with a per-node roll-up.
if out=$(MPIRUN_TAG=1 on_nodes nodeb:2,nodea:2 --threads 1 --progress 0.1 --report "$work/report.json" \
    --mapping "$big/mapping.json" "$big" "$work/out-progress" 2>&1) &&
    rank0=$(untag 0 <<<"$out") && others=$(untag '[1-9]' <<<"$out") &&
    [ "$(grep -c '^consolidating ' <<<"$rank0")" = 1 ] && [ "$(grep -c '^wrote ' <<<"$rank0")" = 1 ] &&
    [ "$(grep -c '^progress: ' <<<"$rank0")" -ge 2 ] && [ -z "$others" ] &&
    grep '^progress: ' <<<"$rank0" | grep -v '(100.0%)' | sed 's/.*(\(.*\)%).*/\1/' | sort -c -u -g &&
    [ "$(grep -c '^  node ' <<<"$rank0")" = 2 ] && grep -q '^  node nodeb: 2 rank(s) (0,1)' <<<"$rank0" &&
    python3 - "$work/report.json" <<'PY'; then
import json, sys
r = json.load(open(sys.argv[1]))
assert [n["host"] for n in r["nodes"]] == ["nodeb", "nodea"], r["nodes"]
assert [n["ranks"] for n in r["nodes"]] == [[0, 1], [2, 3]], r["nodes"]
assert sum(n["bytes"] for n in r["nodes"]) == sum(x["bytes"] for x in r["ranks"]) > 0
assert [x["host"] for x in r["ranks"]] == ["nodeb", "nodeb", "nodea", "nodea"]
assert all(n["gb_per_s"] > 0 for n in r["nodes"] if n["bytes"] > 0)
PY
    pass "progress and summary once, from rank 0 on nodeb; the report names both hosts with a roll-up"
else
    fail "summary/progress once, report hosts" "${out:-}" "$(cat "$work/report.json" 2>/dev/null)"
fi

# 7. Slurm across 2 nodes: Debian's slurmd (built without
#    --enable-multiple-slurmd) runs once per emulated node, each in its own
#    hostname and mount namespace (NodeHostname nodea/nodeb, a port each,
#    its own /tmp: PMIx puts per-step folders there), and srun -N 2 runs the
#    tool across them.
slurm_up() {
    local n
    mkdir -p "$slurm_dir/state"
    cat >"$slurm_dir/slurm.conf" <<CONF
ClusterName=twonodes
SlurmctldHost=$(hostname -s)
SlurmctldPort=6957
SlurmdPort=6958
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=pmix
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$slurm_dir/state
SlurmdSpoolDir=$slurm_dir/spool/%n
SlurmctldPidFile=$slurm_dir/slurmctld.pid
SlurmdPidFile=$slurm_dir/slurmd-%n.pid
SlurmctldLogFile=$slurm_dir/slurmctld.log
SlurmdLogFile=$slurm_dir/slurmd-%n.log
NodeName=nodea NodeHostname=nodea NodeAddr=127.0.0.1 Port=6961 CPUs=2 State=UNKNOWN
NodeName=nodeb NodeHostname=nodeb NodeAddr=127.0.0.1 Port=6962 CPUs=2 State=UNKNOWN
PartitionName=two Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    export SLURM_CONF=$slurm_dir/slurm.conf
    slurmctld
    for n in nodea nodeb; do
        mkdir -p "$slurm_dir/spool/$n" "$slurm_dir/tmp/$n"
        setsid unshare --uts --mount bash -c "hostname $n; mount --bind $slurm_dir/tmp/$n /tmp; exec slurmd -N $n"
    done
    for _ in $(seq 100); do
        [ "$(sinfo -h -o %T 2>/dev/null | sort -u)" = idle ] && [ "$(sinfo -h -o %D)" = 2 ] && return
        sleep 0.2
    done
    return 1
}
if command -v slurmd >/dev/null && slurm_up; then
    cp -a "$ckpt" "$slurm_dir/ckpt"
    # Each node has a /tmp of its own: a checkout under /tmp (CI's clone may
    # be) is invisible there, so the nodes run a copy from the Slurm folder.
    cp "$bin" "$slurm_dir/st-consolidate-mpi"
    if out=$(timeout 120 srun -N 2 -n 4 --mpi=pmix --chdir "$slurm_dir" "$slurm_dir/st-consolidate-mpi" -v --report "$slurm_dir/report.json" \
        --mapping "$slurm_dir/ckpt/mapping.json" "$slurm_dir/ckpt" "$slurm_dir/out" 2>&1) &&
        matches "$slurm_dir/out" "$ckpt" && grep -q '^  node nodea: 2 rank(s) (0,1)' <<<"$out" &&
        grep -q '^  node nodeb: 2 rank(s) (2,3)' <<<"$out"; then
        pass "srun -N 2 -n 4 on two slurmd nodes: correct, ranks 0,1 on nodea and 2,3 on nodeb"
    else
        fail "srun -N 2" "$out" "$(tail -n 5 "$slurm_dir"/*.log)"
    fi
else
    fail "two slurmd nodes did not come up" "$(tail -n 5 "$slurm_dir"/*.log 2>/dev/null)"
fi

echo "nodes: $passed passed, $failed failed"
[ "$failed" = 0 ]
