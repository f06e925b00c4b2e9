"""The library's communicator over torch.distributed.

The Rust side calls these methods, one collective each, from the thread
that called the consolidation; they move bytes and small integers only.
Collectives run on a gloo group: the given one, or for an NCCL group a
gloo group of the same members, made once and cached. ``new_group`` is
collective over the whole world unless ``use_local_synchronization=True``,
with which only the members take part, so a subgroup works without the
other ranks.
"""

import socket
import sys
import threading

_gloo_groups = {}
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


def _gloo_group(dist, group):
    """A gloo group with the members of ``group`` (None: the default)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend:
        return group
    key = group if group is not None else "default"
    with _gloo_lock:
        if key not in _gloo_groups:
            ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
            _gloo_groups[key] = dist.new_group(
                ranks=ranks, backend="gloo", use_local_synchronization=True
            )
        return _gloo_groups[key]


class TorchCommunicator:
    """The Communicator trait's collectives over a torch.distributed group
    (ranks are the group's)."""

    def __init__(self, group=None):
        import torch
        import torch.distributed as dist

        self._torch = torch
        self._dist = dist
        self._group = _gloo_group(dist, group)
        self.rank = dist.get_rank(self._group)
        self.size = dist.get_world_size(self._group)
        hosts = [None] * self.size
        dist.all_gather_object(hosts, socket.gethostname(), group=self._group)
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
