#!/usr/bin/env python3
"""An independent reader of DeepSpeed ZeRO checkpoints (Python standard
library only: zipfile + an unpickler that builds inert stand-ins and runs no
code), following ../shared/DEEPSPEED-FORMAT.md §3. Used to cross-check the
fixtures' manifests; it is not the tool.

usage:
  ds_reference_reader.py check CASE_DIR [--key zero_to_fp32|live_masters]
      rebuilds every tensor of CASE_DIR's checkpoint (fp32, as zero_to_fp32
      writes it; ZeRO-1 frozen params and BF16_Optimizer included) and
      compares sha256s with CASE_DIR/manifest.json
  ds_reference_reader.py globals DIR...
      lists every pickle global named by any data.pkl of the .pt files under DIR
"""
import collections
import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import struct
import sys
import zipfile

ELEM = {"FloatStorage": ("float32", 4), "BFloat16Storage": ("bfloat16", 2), "LongStorage": ("int64", 8),
        "HalfStorage": ("float16", 2), "IntStorage": ("int32", 4), "DoubleStorage": ("float64", 8)}


class Rec:
    """Inert record of a DeepSpeed object (NEWOBJ + BUILD)."""
    def __setstate__(self, state):
        self.state = state


class TensorRef:
    def __init__(self, storage, offset, size, stride, *rest):
        self.storage, self.offset, self.size = storage, offset, tuple(size)

    @property
    def numel(self):
        return math.prod(self.size)


class Loader(pickle.Unpickler):
    def __init__(self, data, zf, prefix):
        super().__init__(io.BytesIO(data))
        self.zf, self.prefix = zf, prefix

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full == "collections.OrderedDict":
            return collections.OrderedDict
        if full == "torch.Size":
            return lambda t: tuple(t)
        if full == "torch._utils._rebuild_tensor_v2":
            return TensorRef
        if full == "torch._tensor._rebuild_from_type_v2":
            return lambda func, typ, args, state: func(*args)
        if module == "torch" and name in ELEM:
            return name
        if full == "torch.Tensor":
            return "Tensor"
        if full == "deepspeed.runtime.zero.config.ZeroStageEnum":
            return int
        if full in ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                    "deepspeed.utils.tensor_fragment.fragment_address"):
            return type(name, (Rec,), {})
        raise pickle.UnpicklingError(f"global {full} is not allowed")

    def persistent_load(self, pid):
        _, cls, key, _, numel = pid
        return (cls, key)


class PtFile:
    def __init__(self, path):
        self.zf = zipfile.ZipFile(path)
        pkl = next(n for n in self.zf.namelist() if n.endswith("/data.pkl"))
        self.prefix = pkl[: -len("data.pkl")]
        self.obj = Loader(self.zf.read(pkl), self.zf, self.prefix).load()

    def elems(self, t, start=0, count=None):
        """(dtype, bytes) of elements [start, start+count) of tensor ref t."""
        cls, key = t.storage
        dtype, size = ELEM[cls]
        count = t.numel - start if count is None else count
        raw = self.zf.read(f"{self.prefix}data/{key}")
        b = (t.offset + start) * size
        return dtype, raw[b: b + count * size]


def to_f32(dtype, data):
    if dtype == "float32" or dtype.startswith("int"):
        return dtype, data
    if dtype == "bfloat16":
        return "float32", b"".join(b"\0\0" + data[i:i + 2] for i in range(0, len(data), 2))
    raise ValueError(f"no upcast for {dtype}")


def read_case(ckpt, tag=None):
    tag = tag or open(os.path.join(ckpt, "latest")).read().strip()
    d = os.path.join(ckpt, tag)
    names = os.listdir(d)
    rank = lambda n: int(re.search(r"zero_pp_rank_(\d+)_", n).group(1))
    optim = sorted((n for n in names if n.endswith("_optim_states.pt") and "mp_rank_00" in n), key=rank)
    opt = [PtFile(os.path.join(d, n)).obj["optimizer_state_dict"] for n in optim]
    opt_files = [PtFile(os.path.join(d, n)) for n in optim]
    W = len(optim)
    stage3 = "fp32_flat_groups" in opt[0]
    if stage3:
        ms = [PtFile(os.path.join(d, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")) for r in range(W)]
    else:
        ms = [PtFile(os.path.join(d, "mp_rank_00_model_states.pt"))]
    m0 = ms[0].obj
    out = collections.OrderedDict()
    for b in m0["buffer_names"]:
        out[b] = (m0["module"][b].size,) + to_f32(*ms[0].elems(m0["module"][b]))
    if m0.get("frozen_param_shapes"):
        for n, shape in m0["frozen_param_shapes"].items():
            numel = math.prod(shape)
            if stage3:
                per = math.ceil(numel / W)
                parts = [f.elems(f.obj["frozen_param_fragments"][n], 0, per) for f in ms]
                dtype, data = parts[0][0], b"".join(p[1] for p in parts)
                data = data[: numel * len(data) // (per * W)]
            else:
                dtype, data = ms[0].elems(m0["frozen_param_fragments"][n], 0, numel)
            out[n] = (tuple(shape),) + to_f32(dtype, data)
    elif m0.get("frozen_param_shapes") is None and not stage3:
        # ZeRO-1 / BF16_Optimizer: frozen params only in module (training dtype)
        trainable = {n for g in m0["param_shapes"] for n in g}
        for n, t in m0["module"].items():
            if n not in trainable and n not in m0["buffer_names"] and n not in m0["shared_params"]:
                out[n] = (t.size,) + to_f32(*ms[0].elems(t))
    for g, shapes in enumerate(m0["param_shapes"]):
        if stage3:
            T = [(f, f.obj["optimizer_state_dict"]["fp32_flat_groups"][g]) for f in opt_files]
            o = 0
            for n, shape in shapes.items():
                numel = math.prod(shape)
                per = math.ceil(numel / W)
                data = b"".join(f.elems(t, o, per)[1] for f, t in T)[: numel * 4]
                out[n] = (tuple(shape), "float32", data)
                o += per
            assert all(o == t.numel for _, t in T), "ZeRO-3 group length"
        else:
            flat = b"".join(f.elems(f.obj["optimizer_state_dict"]["single_partition_of_fp32_groups"][g])[1]
                            for f in opt_files)
            pads = opt[0].get("param_alignment_paddings", [[0] * len(shapes)] * len(m0["param_shapes"]))[g]
            off = 0
            for (n, shape), pad in zip(shapes.items(), pads):
                numel = math.prod(shape)
                out[n] = (tuple(shape), "float32", flat[off * 4: (off + numel) * 4])
                off += numel + pad
            assert math.ceil(off / (2 * W)) == math.ceil(len(flat) // 4 / (2 * W)), "ZeRO-1/2 group length"
    for alias, owner in m0["shared_params"].items():
        out[alias] = out[owner]
    return out


def check(case_dir, key):
    manifest = json.load(open(os.path.join(case_dir, "manifest.json")))
    got = read_case(os.path.join(case_dir, manifest["save_dir"]))
    want = manifest[key]
    bad = 0
    for n in sorted(set(got) | set(want)):
        if n not in want or n not in got:
            print(f"  {n}: only in {'reader' if n in got else key}")
            bad += 1
            continue
        shape, dtype, data = got[n]
        g = (dtype, list(shape), hashlib.sha256(data).hexdigest())
        w = (want[n]["dtype"], want[n]["shape"], want[n]["sha256"])
        if g != w:
            print(f"  {n}: reader {g} != {key} {w}")
            bad += 1
    print(f"{os.path.basename(case_dir.rstrip('/'))}: reader vs {key}: {len(got)} tensors, {bad} differ")
    return bad


def pickle_globals(paths):
    found = collections.Counter()
    for top in paths:
        for root, _, files in os.walk(top):
            for fn in files:
                if not (fn.endswith(".pt") or fn.endswith(".pth") or fn.endswith(".bin")):
                    continue
                with zipfile.ZipFile(os.path.join(root, fn)) as zf:
                    pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
                    for op, arg, _ in pickletools.genops(zf.read(pkl)):
                        if op.name in ("GLOBAL", "INST"):
                            found[arg.replace(" ", ".")] += 1
                        elif op.name == "STACK_GLOBAL":
                            found["<STACK_GLOBAL>"] += 1
    for g, c in sorted(found.items()):
        print(f"{c:6d}  {g}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "check":
        key = sys.argv[sys.argv.index("--key") + 1] if "--key" in sys.argv else "zero_to_fp32"
        sys.exit(1 if check(sys.argv[2], key) else 0)
    if len(sys.argv) >= 3 and sys.argv[1] == "globals":
        pickle_globals(sys.argv[2:])
        sys.exit(0)
    sys.exit(__doc__)
