#!/usr/bin/env python3
"""Generates a DeepSpeed ZeRO-3 checkpoint layout of a Llama-70B model saved
from W data-parallel ranks (default 256), with faithful pickles and sparse
partitions, for scripts/bench-deepspeed-scale.sh (`--dry-run --ranks W`).

Python standard library only. The torch.save zip archives are written here:
  - data.pkl is pickled with protocol 2 by Python's own pickler, through
    stand-in classes registered under the names torch and DeepSpeed use
    (torch._utils._rebuild_tensor_v2, torch._tensor._rebuild_from_type_v2,
    torch.Tensor, torch.Size, torch.FloatStorage, torch.BFloat16Storage,
    deepspeed.runtime.zero.config.ZeroStageEnum,
    deepspeed.runtime.fp16.loss_scaler.LossScaler), with storages as
    BINPERSID ('storage', <class>, key, 'cpu', numel): the opcode stream has
    the shape of the files DeepSpeed 0.19.8 writes (compare with pickletools
    against tests/fixtures/deepspeed/z3-w2-bf16/checkpoint/global_step2/*.pt);
  - entries as torch's writer lays them out: STORED, flag 0x0808 with a data
    descriptor, local 'FB' extra padding so every entry's data starts at a
    multiple of 64, then the central directory, a zip64 end record and
    locator and the end record (zip64 extras for entries or offsets past
    4 GiB); data.pkl and the small entries carry their
    CRC-32; the storages' bytes are holes (the file is seeked past them), and
    their CRC is 0 above 16 MB (the reader never checks storage CRCs; small
    layouts get the zeros' true CRC, so zipfile and torch.load read them).

Layout (HF names, untied lm_head): model.embed_tokens.weight [V, H]; per layer
self_attn.{q,k,v,o}_proj.weight, mlp.{gate,up,down}_proj.weight,
input_layernorm.weight, post_attention_layernorm.weight; model.norm.weight;
lm_head.weight. Two optimizer param groups as HF Trainer makes them (weight
decay: the 2-D weights; no decay: the norms), each split into sub-groups as
DeepSpeed's stage 3 does (a sub-group closes once the running sum of the
params' per-rank partition sizes ceil(n/W) reaches --sub-group-size, default
1e9 as DeepSpeed's default; at 256 ranks a 70B model's decay group holds
about 276M elements per rank, so each group is one sub-group, as DeepSpeed
would save it). Each optimizer file holds, per sub-group, the fp32 flat
partition and Adam's exp_avg and exp_avg_sq of the same length (all sparse)
and a 1-element step.

usage: make_deepspeed_scale.py OUT [--ranks 256] [--layers 80] [--hidden 8192]
       [--intermediate 28672] [--heads 64] [--kv-heads 8] [--vocab 128256]
       [--sub-group-size 1e9]
"""
import argparse
import collections
import enum
import io
import math
import os
import pickle
import struct
import sys
import types
import zlib


# ---- stand-ins pickled under torch's and DeepSpeed's global names ----------

def _module(name):
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(_module(parent), child, mod)
    return mod


def _register(obj, module, qualname):
    obj.__module__ = module
    obj.__qualname__ = qualname
    obj.__name__ = qualname
    setattr(_module(module), qualname, obj)
    return obj


def _rebuild_tensor_v2(*args):
    raise RuntimeError("stand-in, never called")


def _rebuild_from_type_v2(*args):
    raise RuntimeError("stand-in, never called")


_register(_rebuild_tensor_v2, "torch._utils", "_rebuild_tensor_v2")
_register(_rebuild_from_type_v2, "torch._tensor", "_rebuild_from_type_v2")
TorchTensor = _register(type("Tensor", (), {}), "torch", "Tensor")
FloatStorage = _register(type("FloatStorage", (), {}), "torch", "FloatStorage")
BFloat16Storage = _register(type("BFloat16Storage", (), {}), "torch", "BFloat16Storage")
ELEM_SIZE = {FloatStorage: 4, BFloat16Storage: 2}


class Size(tuple):
    def __reduce__(self):
        return (Size, (tuple(self),))


_register(Size, "torch", "Size")


class ZeroStageEnum(int, enum.Enum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


_register(ZeroStageEnum, "deepspeed.runtime.zero.config", "ZeroStageEnum")


class LossScaler:
    pass


_register(LossScaler, "deepspeed.runtime.fp16.loss_scaler", "LossScaler")


class Storage:
    def __init__(self, cls, numel):
        self.cls, self.numel, self.key = cls, numel, None


class Tensor:
    """A tensor view of a whole storage: _rebuild_tensor_v2(storage, 0, size,
    stride, requires_grad, OrderedDict())."""

    def __init__(self, storage, size, requires_grad=False):
        self.storage, self.size, self.requires_grad = storage, tuple(size), requires_grad

    def args(self):
        stride, acc = [], 1
        for d in reversed(self.size):
            stride.append(acc)
            acc *= d
        return (self.storage, 0, self.size, tuple(reversed(stride)), self.requires_grad,
                collections.OrderedDict())

    def __reduce__(self):
        return (_rebuild_tensor_v2, self.args())


class FlatGroup(Tensor):
    """ZeRO-3 fp32 flat group: torch._tensor._rebuild_from_type_v2(
    _rebuild_tensor_v2, torch.Tensor, args, {'ds_id': ...})."""

    def __init__(self, storage, numel, ds_id):
        super().__init__(storage, (numel,), requires_grad=True)
        self.ds_id = ds_id

    def __reduce__(self):
        return (_rebuild_from_type_v2, (_rebuild_tensor_v2, TorchTensor, self.args(), {"ds_id": self.ds_id}))


class Pickler(pickle.Pickler):
    """Storages as torch.save's persistent ids, keys in first-seen order."""

    def __init__(self, f):
        super().__init__(f, protocol=2)
        self.storages = []

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            if obj.key is None:
                obj.key = str(len(self.storages))
                self.storages.append(obj)
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


# ---- the torch.save zip container ------------------------------------------

def write_pt(path, obj):
    """torch.save's archive of obj, storages as holes."""
    buf = io.BytesIO()
    p = Pickler(buf)
    p.dump(obj)
    archive = os.path.splitext(os.path.basename(path))[0]
    small = [("data.pkl", buf.getvalue()), (".format_version", b"1"), (".storage_alignment", b"64"),
             ("byteorder", b"little")]
    tail = [("version", b"3\n"), (".data/serialization_id", b"0" * 40)]
    entries = [(n, d, len(d)) for n, d in small]
    entries += [(f"data/{s.key}", None, s.numel * ELEM_SIZE[s.cls]) for s in p.storages]
    entries += [(n, d, len(d)) for n, d in tail]
    central = []
    with open(path, "wb") as f:
        for name, data, size in entries:
            full = f"{archive}/{name}".encode()
            offset = f.tell()
            big = size >= 0xFFFFFFFF
            # zip64 (as miniz writes it for large entries): sizes in a zip64
            # extra of the local header and an 8-byte data descriptor
            z64local = struct.pack("<HHQQ", 1, 16, 0, 0) if big else b""
            pad = (-(offset + 30 + len(full) + len(z64local) + 4)) % 64
            extra = z64local + b"FB" + struct.pack("<H", pad) + b"Z" * pad
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, 0x0808, 0, 0, 0, 0, 0, 0, len(full), len(extra)))
            f.write(full + extra)
            if data is None:
                f.seek(size, os.SEEK_CUR)  # a hole: zeros
                # the CRC of the zeros when cheap (small layouts then load with
                # zipfile/torch.load too); 0 for the big ones, never checked
                crc = zlib.crc32(bytes(size)) if size <= 1 << 24 else 0
            else:
                f.write(data)
                crc = zlib.crc32(data)
            if big:
                f.write(struct.pack("<IIQQ", 0x08074B50, crc, size, size))
            else:
                f.write(struct.pack("<IIII", 0x08074B50, crc, size, size))
            z64 = []
            if big:
                z64 += [size, size]
            if offset >= 0xFFFFFFFF:
                z64.append(offset)
            cextra = struct.pack("<HH", 1, 8 * len(z64)) + struct.pack(f"<{len(z64)}Q", *z64) if z64 else b""
            s32 = 0xFFFFFFFF if big else size
            o32 = 0xFFFFFFFF if offset >= 0xFFFFFFFF else offset
            central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, 0x0808, 0, 0, 0, crc, s32, s32,
                                       len(full), len(cextra), 0, 0, 0, 0, o32) + full + cextra)
        cd_offset = f.tell()
        cd = b"".join(central)
        f.write(cd)
        z64 = f.tell()
        n = len(entries)
        f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x2D, 0, 0, n, n, len(cd), cd_offset))
        f.write(struct.pack("<IIQI", 0x07064B50, 0, z64, 1))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(cd), min(cd_offset, 0xFFFFFFFF), 0))
    return len(buf.getvalue())


# ---- the checkpoint --------------------------------------------------------

def llama_params(a):
    h, i, v = a.hidden, a.intermediate, a.vocab
    kv = h // a.heads * a.kv_heads
    params = [("model.embed_tokens.weight", (v, h))]
    for n in range(a.layers):
        p = f"model.layers.{n}."
        params += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i)),
                   (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    params += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return params


def sub_groups(params, world, sub_group_size):
    """HF Trainer's two param groups (decay: dim >= 2; no decay), each cut
    into DeepSpeed stage-3 sub-groups. Returns [(group, [(id, name, shape)])]."""
    ids = {name: k for k, (name, _) in enumerate(params)}
    groups = [[p for p in params if len(p[1]) >= 2], [p for p in params if len(p[1]) < 2]]
    out = []
    for g, members in enumerate(groups):
        cur, run = [], 0
        for k, (name, shape) in enumerate(members):
            cur.append((ids[name], name, shape))
            run += math.ceil(math.prod(shape) / world)
            if run >= sub_group_size or k == len(members) - 1:
                out.append((g, cur))
                cur, run = [], 0
    return out


def ds_config():
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-05, "torch_adam": True, "weight_decay": 0.0}},
            "zero_force_ds_cpu_optimizer": False,
            "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}


def model_states(params, subs, world):
    module = collections.OrderedDict()
    for name, shape in params:
        module[name] = Tensor(Storage(BFloat16Storage, 0), (0,))
    meta = collections.OrderedDict([("", {"version": 1}), ("model", {"version": 1})])
    module._metadata = meta
    return {
        "module": module,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [collections.OrderedDict((name, Size(shape)) for _, name, shape in members)
                         for _, members in subs],
        "frozen_param_shapes": collections.OrderedDict(),
        "shared_params": {},
        "frozen_param_fragments": collections.OrderedDict(),
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": 1,
        "global_samples": world,
        "dp_world_size": world,
        "mp_world_size": 1,
        "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
        "ds_config": ds_config(),
        "ds_version": "0.19.8",
    }


def optim_states(subs, world):
    ls = LossScaler()
    ls.__dict__.update(cur_scale=1.0, dynamic=False)
    state, flats, groups = {}, [], {}
    for k, (g, members) in enumerate(subs):
        numel = sum(math.ceil(math.prod(shape) / world) for _, _, shape in members)
        state[k] = {"step": Tensor(Storage(FloatStorage, 1), ()),
                    "exp_avg": Tensor(Storage(FloatStorage, numel), (numel,)),
                    "exp_avg_sq": Tensor(Storage(FloatStorage, numel), (numel,))}
        flats.append(FlatGroup(Storage(FloatStorage, numel), numel, f"{members[0][0]}_{members[-1][0]}"))
        groups.setdefault(g, []).append(k)
    param_groups = [{"lr": 1e-05, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.0 if g else 0.01,
                     "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                     "differentiable": False, "fused": None, "decoupled_weight_decay": True, "params": ks}
                    for g, ks in sorted(groups.items())]
    return {
        "optimizer_state_dict": {
            "zero_stage": ZeroStageEnum.weights,
            "loss_scaler": ls,
            "dynamic_loss_scale": False,
            "overflow": False,
            "partition_count": world,
            "optimizer_state_dict": {"state": state, "param_groups": param_groups},
            "fp32_flat_groups": flats,
        },
        "ds_config": ds_config(),
        "ds_version": "0.19.8",
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--ranks", type=int, default=256)
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--intermediate", type=int, default=28672)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--sub-group-size", type=float, default=1e9)
    a = ap.parse_args()
    params = llama_params(a)
    subs = sub_groups(params, a.ranks, a.sub_group_size)
    tag = "global_step1"
    os.makedirs(os.path.join(a.out, tag), exist_ok=True)
    with open(os.path.join(a.out, "latest"), "w") as f:
        f.write(tag)
    pkl_ms = pkl_opt = 0
    for r in range(a.ranks):
        d = os.path.join(a.out, tag)
        pkl_ms = write_pt(os.path.join(d, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"),
                          model_states(params, subs, a.ranks))
        pkl_opt = write_pt(os.path.join(d, f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"),
                           optim_states(subs, a.ranks))
    total = sum(math.prod(s) for _, s in params)
    print(f"make_deepspeed_scale: {total / 1e9:.2f}B params in {len(params)} tensors, ZeRO-3 from {a.ranks} "
          f"ranks, {len(subs)} sub-groups per rank (elements per rank: "
          f"{', '.join(str(sum(math.ceil(math.prod(s) / a.ranks) for _, _, s in m)) for _, m in subs)}); "
          f"data.pkl {pkl_ms} B (model states), {pkl_opt} B (optim) -> {a.out}")


if __name__ == "__main__":
    main()
