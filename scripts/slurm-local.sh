#!/usr/bin/env bash
# A real single-node Slurm cluster, from Debian's slurm-wlm, for tests and
# demos. All state lives in one directory; /etc/slurm is never touched.
#
#   scripts/slurm-local.sh up|down|status
#
# DIR defaults to target/slurm-local (override with SLURM_LOCAL_DIR). After
# `up`, use the cluster from any shell with:
#   export SLURM_CONF=DIR/slurm.conf
#
# The node declares 8 CPUs (SlurmdParameters=config_overrides lets it claim
# more than it has) so that jobs of up to 8 tasks start on a small machine;
# beyond that, use srun -O (--overcommit).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(realpath -m "${SLURM_LOCAL_DIR:-target/slurm-local}")
export SLURM_CONF=$dir/slurm.conf
cpus=${SLURM_LOCAL_CPUS:-8}

install() {
    command -v slurmctld >/dev/null 2>&1 && return
    echo "slurm-local: installing slurm-wlm" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null
}

write_conf() {
    local host
    host=$(hostname -s)
    mkdir -p "$dir/state" "$dir/spool"
    cat > "$SLURM_CONF" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmctldPort=${SLURM_LOCAL_PORT:-6917}
SlurmdPort=$(( ${SLURM_LOCAL_PORT:-6917} + 1 ))
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
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

running() {
    [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null
}

up() {
    install
    if running slurmctld && running slurmd; then
        echo "slurm-local: already up (SLURM_CONF=$SLURM_CONF)"
        return
    fi
    write_conf
    running slurmctld || slurmctld
    running slurmd || slurmd
    for _ in $(seq 100); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            echo "slurm-local: up, node idle (export SLURM_CONF=$SLURM_CONF)"
            return
        fi
        sleep 0.2
    done
    echo "slurm-local: the node did not become idle; logs in $dir" >&2
    tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    exit 1
}

down() {
    if [ -f "$SLURM_CONF" ]; then
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    for daemon in slurmctld slurmd; do
        for _ in $(seq 50); do
            running "$daemon" || break
            sleep 0.2
        done
        if running "$daemon"; then
            kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
        fi
    done
    echo "slurm-local: down"
}

status() {
    if running slurmctld; then
        sinfo
    else
        echo "slurm-local: down"
        return 1
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
