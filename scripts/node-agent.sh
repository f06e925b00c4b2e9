#!/usr/bin/env bash
# An OpenMPI rsh agent that turns one machine into several "nodes":
#   mpirun --mca plm_rsh_agent scripts/node-agent.sh --mca plm_rsh_no_tree_spawn 1 \
#          --host nodea:2,nodeb:2 -n 4 ...
# OpenMPI calls it as `node-agent.sh [ssh options] HOST COMMAND...` where it
# would call ssh. The command runs in a new session with its own UTS and mount
# namespaces, so `hostname` (and /proc/sys/kernel/hostname) says HOST there.
#
# Optional environment:
#   NODE_SESSION_DIR  write the node's first pid and its UTS namespace id
#                     (`readlink /proc/PID/ns/uts`) to NODE_SESSION_DIR/HOST,
#                     so a test can kill one whole node:
#                       NODE_SESSION_DIR=... node-agent.sh --kill HOST
#                     sends SIGKILL to every process in that namespace. (Not
#                     the session: orted calls setsid, so its ranks run in a
#                     session of their own; the namespace holds them all.)
#   NODE_LOCAL_DIR, NODE_LOCAL_ROOT
#                     bind NODE_LOCAL_ROOT/HOST over NODE_LOCAL_DIR inside the
#                     node, giving each node its own folder under one path
#                     (node-local scratch).
# Ranks talk over TCP on loopback when mpirun is given
#   --mca pml ob1 --mca btl self,tcp --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo
set -euo pipefail
if [ "${1:-}" = --kill ]; then
    read -r _ namespace <"${NODE_SESSION_DIR:?--kill needs NODE_SESSION_DIR}/${2:?--kill HOST}"
    for proc in /proc/[0-9]*; do
        if [ "$(readlink "$proc/ns/uts" 2>/dev/null)" = "$namespace" ]; then
            kill -KILL "${proc#/proc/}" 2>/dev/null || true
        fi
    done
    exit 0
fi
# ssh-style options OpenMPI may pass before the host (e.g. -x, -o Opt=val).
while [ $# -gt 0 ]; do
    case $1 in
    -o | -l | -p | -i) shift 2 ;;
    -*) shift ;;
    *) break ;;
    esac
done
host=${1:?usage: node-agent.sh HOST COMMAND...}
shift
# Like ssh: the remaining words form one shell command line.
command="$*"

setup='hostname "$NODE_HOST"'
if [ -n "${NODE_SESSION_DIR:-}" ]; then
    mkdir -p "$NODE_SESSION_DIR"
    setup+='; echo $$ "$(readlink /proc/$$/ns/uts)" >"$NODE_SESSION_DIR/$NODE_HOST"'
fi
if [ -n "${NODE_LOCAL_DIR:-}" ]; then
    : "${NODE_LOCAL_ROOT:?NODE_LOCAL_DIR needs NODE_LOCAL_ROOT}"
    mkdir -p "$NODE_LOCAL_ROOT/$host" "$NODE_LOCAL_DIR"
    setup+='; mount --bind "$NODE_LOCAL_ROOT/$NODE_HOST" "$NODE_LOCAL_DIR"'
fi
# setsid: the node starts detached from mpirun's terminal and signals;
# --wait and no exec: this agent stays alive in the group mpirun gave it (as
# ssh would) until the node exits.
NODE_HOST=$host NODE_COMMAND=$command setsid --wait unshare --uts --mount \
    bash -c "$setup"'; exec bash -c "$NODE_COMMAND"'
