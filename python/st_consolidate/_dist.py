"""The library's communicator over torch.distributed.

The Rust side calls these methods, one collective each, from the thread
that called the consolidation; they move bytes and small integers only.
Collectives run on a gloo group: the given one, or for an NCCL group a
gloo group of the same members, made once per group and dropped with it. ``new_group`` is
collective over the whole world unless ``use_local_synchronization=True``,
with which only the members take part, so a subgroup works without the
other ranks.
"""

import socket
import sys
import threading
import weakref

from ._errors import ConsolidationError, InputError

# Each group's gloo twin, held as long as its group lives: a group
# destroyed (destroy_process_group, then a new init_process_group makes a
# new default group) takes its twin with it, and a new group gets its own.
_gloo_twins = weakref.WeakKeyDictionary()
_gloo_lock = threading.Lock()


def distributed_or_none():
    """torch.distributed if this process has initialized it, else None. It
    does not import torch: a process that never imported it has no process
    group."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def _needs_twin(dist, group):
    """Whether ``group``'s backend cannot run the collectives (NCCL moves
    CUDA tensors only): they then go over a gloo group of the same members."""
    return "gloo" not in str(dist.get_backend(group)).lower()


def _gloo_group(dist, group):
    """A gloo group with the members of ``group`` (None: the default), made
    once per group and dropped with it."""
    group = group if group is not None else dist.group.WORLD
    if not _needs_twin(dist, group):
        return group
    with _gloo_lock:
        twin = _gloo_twins.get(group)
        if twin is None:
            ranks = dist.get_process_group_ranks(group)
            twin = dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=True)
            _gloo_twins[group] = twin
        return twin


def _member_rank(dist, group):
    """This process's rank in ``group`` (None: the default group), or an
    InputError if it is not one of the group's ranks: torch hands such a
    rank a placeholder for the group (``new_group`` on a non-member), with
    which every collective fails."""
    try:
        rank = dist.get_rank(group)
    except Exception as e:  # whatever torch raises for a value that is no group
        raise InputError(
            f"process_group={group!r} is not a process group of this job: {e}\n"
            f"  hint: pass a group made by torch.distributed.new_group, or None for the default group"
        ) from None
    if rank < 0:
        raise InputError(
            f"this rank (global rank {dist.get_rank()}) is not a member of process_group, "
            f"which only its member ranks may call\n"
            f"  hint: call it on the group's ranks only (new_group returns a placeholder on the others), "
            f"or pass a group this rank belongs to"
        )
    return rank


class TorchCommunicator:
    """The Communicator trait's collectives over a torch.distributed group
    (ranks are the group's)."""

    def __init__(self, group=None):
        import torch
        import torch.distributed as dist

        self._torch = torch
        self._dist = dist
        _member_rank(dist, group)
        try:
            self._group = _gloo_group(dist, group)
            self.rank = dist.get_rank(self._group)
            self.size = dist.get_world_size(self._group)
            hosts = [None] * self.size
            dist.all_gather_object(hosts, socket.gethostname(), group=self._group)
        except Exception as e:
            # The job's first collective: it is where a rank that never
            # calls, or died, shows. (KeyboardInterrupt is no Exception.)
            raise ConsolidationError(
                f"global rank {dist.get_rank()}: the ranks of the process group could not start the "
                f"consolidation together ({type(e).__name__}: {e})\n"
                f"  hint: every rank of the group must call it with the same arguments; a rank that never "
                f"calls, or that died or exited, makes this fail: see the other ranks' output"
            ) from e
        self.ranks_on_node = hosts.count(hosts[self.rank])

    def lowest_failed(self, failed):
        t = self._torch.tensor([self.rank if failed else self.size], dtype=self._torch.int64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN, group=self._group)
        lowest = int(t.item())
        return lowest if lowest < self.size else None

    def all_gather(self, payload):
        parts = [None] * self.size
        self._dist.all_gather_object(parts, bytes(payload), group=self._group)
        return parts

    def gather(self, payload):
        # group_dst is the group's rank 0, whatever its global rank: a
        # subgroup without global rank 0 gathers to its own first member.
        parts = [None] * self.size if self.rank == 0 else None
        self._dist.gather_object(bytes(payload), parts, group=self._group, group_dst=0)
        return parts

    def sum(self, values):
        t = self._torch.tensor(list(values), dtype=self._torch.int64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self._group)
        return [int(v) for v in t.tolist()]

    def broadcast(self, payload, root):
        # One payload per rank, whatever the group's size (all_gather_object
        # would pad every rank's part to the largest and hold them all).
        parts = [bytes(payload) if self.rank == root else None]
        self._dist.broadcast_object_list(parts, group=self._group, group_src=root)
        return parts[0]
