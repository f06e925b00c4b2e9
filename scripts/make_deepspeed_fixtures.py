#!/usr/bin/env python3
"""Writes the DeepSpeed ZeRO fixtures under tests/fixtures/deepspeed/.

Each case trains a tiny model for 2 steps with DeepSpeed (CPU, gloo, one
process per rank), saves it with engine.save_checkpoint, runs DeepSpeed's own
converters on the saved folder (zero_to_fp32.py as .bin and with
--safe_serialization, zero_to_torch.py --dtype bf16) and writes

    tests/fixtures/deepspeed/<case>/checkpoint/   the save_dir as DeepSpeed wrote it
    tests/fixtures/deepspeed/<case>/manifest.json per-tensor dtype/shape/sha256

The converters' outputs stay in target/ds-fixtures/<case>/out/ (not committed);
scripts/check_deepspeed_reference.py compares an output folder with a manifest.

usage (with the DeepSpeed venv, see scripts/setup-deepspeed.sh):
    target/ds-venv/bin/python scripts/make_deepspeed_fixtures.py [--only CASE ...] [--list]
"""
import argparse
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "deepspeed")
WORK = os.path.join(REPO, "target", "ds-fixtures")
SEED = 1234
STEPS = 2

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# ninja (installed into the venv by pip) must be on PATH for the JIT build of
# DeepSpeed's CPU shm_comm op.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

# Every case: stage, dp world size, precision, tied head, and what it covers.
# 'zero' adds zero_optimization keys, 'extra' adds top-level config keys.
CASES = {
    "z1-w2-bf16": dict(stage=1, world=2, precision="bf16", tied=True,
                       covers="ZeRO-1, 2 ranks, bf16, tied head, frozen params (zero_to_fp32 drops them: "
                              "stage 1 saves no frozen_param_*; live_masters holds them from module)"),
    "z2-w2-bf16": dict(stage=2, world=2, precision="bf16", tied=True,
                       covers="ZeRO-2, 2 ranks, bf16, tied head, frozen params"),
    "z3-w2-bf16": dict(stage=3, world=2, precision="bf16", tied=True,
                       covers="ZeRO-3, 2 ranks, bf16, tied head, frozen params"),
    "z2-w3-bf16": dict(stage=2, world=3, precision="bf16", tied=True,
                       covers="ZeRO-2, 3 ranks (partitions not a power of two), bf16, tied head, frozen params"),
    "z3-w3-bf16": dict(stage=3, world=3, precision="bf16", tied=True,
                       covers="ZeRO-3, 3 ranks (frozen.bias of 7 elements leaves padding), bf16, tied, frozen"),
    "z2-w2-fp32-untied": dict(stage=2, world=2, precision="fp32", tied=False,
                              covers="ZeRO-2, 2 ranks, fp32 training (no bf16_ prefix), untied head, frozen"),
    "z3-w2-fp32-untied": dict(stage=3, world=2, precision="fp32", tied=False,
                              covers="ZeRO-3, 2 ranks, fp32 training (no bf16_ prefix), untied head, frozen"),
    "z2-w2-bf16-roundrobin": dict(stage=2, world=2, precision="bf16", tied=True,
                                  zero={"round_robin_gradients": True},
                                  covers="ZeRO-2 round_robin_gradients: flat order differs from model order"),
    "z2-w3-bf16-align": dict(stage=2, world=3, precision="bf16", tied=True,
                             zero={"parameter_alignment": True},
                             covers="ZeRO-2 parameter_alignment (param_alignment_paddings non-zero), 3 ranks"),
    "z3-w2-bf16-subgroups-untied": dict(stage=3, world=2, precision="bf16", tied=False,
                                        zero={"sub_group_size": 200},
                                        covers="ZeRO-3 sub_group_size 200: several fp32_flat_groups per rank, "
                                               "untied head, bf16"),
    "bf16opt-z1-w2": dict(stage=1, world=2, precision="bf16", tied=True,
                          extra={"data_types": {"grad_accum_dtype": "fp32"}},
                          covers="BF16_Optimizer (bf16 + stage 1 + grad_accum_dtype fp32): no zero_stage key, "
                                 "untrimmed partitions; zero_to_fp32 refuses, live_masters is the truth"),
    "z2-w2-bf16-exclude-frozen": dict(stage=2, world=2, precision="bf16", tied=True, exclude_frozen=True,
                                      covers="ZeRO-2 save_checkpoint(exclude_frozen_parameters=True)"),
    "z3-w2-bf16-exclude-frozen": dict(stage=3, world=2, precision="bf16", tied=True, exclude_frozen=True,
                                      covers="ZeRO-3 save_checkpoint(exclude_frozen_parameters=True)"),
    "z2-tp2-dp2-bf16": dict(stage=2, world=2, tp=2, precision="bf16", tied=True,
                            covers="tensor parallel 2 x data parallel 2 (minimal mpu): mp_rank_00 and mp_rank_01 "
                                   "files; a refusal fixture (each mp rank's values differ, as slices would)"),
    "z2-w2-bf16-twotags": dict(stage=2, world=2, precision="bf16", tied=True, save_steps=[1, 2],
                               covers="two tags in one save_dir (global_step1, global_step2; latest names the "
                                      "second): --tag tests; per-tag references under 'tags'"),
    "hf-trainer-z3-w2-bf16": dict(stage=3, world=2, precision="bf16", tied=True, hf_trainer=True,
                                  zero={"stage3_gather_16bit_weights_on_model_save": True},
                                  covers="HF Trainer layout: checkpoint-2/ with config.json, a 16-bit "
                                         "model.safetensors, trainer_state.json and rng_state_{0,1}.pth beside "
                                         "latest/global_step2 (the side files are made by this script, not by "
                                         "HF Trainer)"),
}

VOCAB, HIDDEN, INTER, FROZEN_OUT, SEQ = 37, 19, 23, 7, 11


def build_model(tied):
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = nn.Linear(HIDDEN, INTER, bias=True)
            self.norm = nn.LayerNorm(INTER)
            self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)
            self.register_buffer("scale", torch.linspace(0.5, 1.5, 5))

        def forward(self, h):
            u = torch.nn.functional.gelu(self.up_proj(h)) * self.scale.mean().to(h.dtype)
            return self.down_proj(self.norm(u))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
            self.layers = nn.ModuleList([Layer()])
            self.frozen_proj = nn.Linear(HIDDEN, FROZEN_OUT, bias=True)
            self.register_buffer("position_ids", torch.arange(SEQ, dtype=torch.int64))
            # non-persistent: in neither module nor buffer_names
            self.register_buffer("inv_freq", torch.ones(3), persistent=False)

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()
            self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
            if tied:
                self.lm_head.weight = self.model.embed_tokens.weight
            for p in self.model.frozen_proj.parameters():
                p.requires_grad_(False)

        def forward(self, tokens):
            m = self.model
            h = m.embed_tokens(tokens) + m.embed_tokens(m.position_ids[: tokens.shape[1]] % VOCAB)
            h = h + m.layers[0].mlp(h)
            f = m.frozen_proj(h)
            logits = self.lm_head(h)
            targets = torch.roll(tokens, -1, dims=1)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
            return loss + 0.01 * f.float().pow(2).mean()

    return TinyLM()


def ds_config(case):
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1000,
        "wall_clock_breakdown": False,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True, "weight_decay": 0.0}},
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": {"stage": case["stage"], **case.get("zero", {})},
    }
    if case["precision"] == "bf16":
        cfg["bf16"] = {"enabled": True}
    cfg.update(case.get("extra", {}))
    return cfg


def describe(t):
    import torch
    t = t.detach().cpu().contiguous()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
            "sha256": hashlib.sha256(data).hexdigest()}


def describe_all(tensors):
    return {name: describe(t) for name, t in sorted(tensors.items())}


class MinimalMpu:
    """Just enough of Megatron's mpu for DeepSpeed: tp x dp over the world,
    model-parallel ranks adjacent (rank = dp * tp + mp)."""

    def __init__(self, tp):
        import torch.distributed as dist
        world, rank = dist.get_world_size(), dist.get_rank()
        self.tp, self.mp_rank, self.dp_rank = tp, rank % tp, rank // tp
        self.dp_size = world // tp
        for d in range(self.dp_size):
            ranks = list(range(d * tp, (d + 1) * tp))
            g = dist.new_group(ranks)
            if rank in ranks:
                self.mp_group = g
        for m in range(tp):
            ranks = list(range(m, world, tp))
            g = dist.new_group(ranks)
            if rank in ranks:
                self.dp_group, self.dp_ranks = g, ranks

    def get_model_parallel_rank(self): return self.mp_rank
    def get_model_parallel_world_size(self): return self.tp
    def get_model_parallel_group(self): return self.mp_group
    def get_tensor_model_parallel_rank(self): return self.mp_rank
    def get_tensor_model_parallel_world_size(self): return self.tp
    def get_tensor_model_parallel_group(self): return self.mp_group
    def get_tensor_model_parallel_src_rank(self): return self.dp_rank * self.tp
    def get_data_parallel_rank(self): return self.dp_rank
    def get_data_parallel_world_size(self): return self.dp_size
    def get_data_parallel_group(self): return self.dp_group
    def get_data_parallel_group_ranks(self): return self.dp_ranks


def live_state(engine, model, case, dp_group):
    """Collective (every rank calls it). Returns, for the caller's mp rank,
    the fp32 masters, the training-dtype module values and the buffers."""
    import torch
    import torch.distributed as dist
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    names = {}
    for n, p in model.named_parameters():  # first name wins: the owner
        names.setdefault(id(p), n)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    safe_get = {n: safe_get_full_fp32_param(params[n]).detach().cpu().clone() for n in trainable}

    opt = engine.optimizer
    if hasattr(opt, "round_robin_bit16_groups"):
        # ZeRO-1/2: gather the live fp32 partitions and cut them in the flat
        # buffer's own order (round robin aware, unlike safe_get_full_fp32_param).
        masters = {}
        for i, part in enumerate(opt.single_partition_of_fp32_groups):
            grp = opt.real_dp_process_group[i]
            parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group=grp))]
            dist.all_gather(parts, part.detach().contiguous(), group=grp)
            flat = torch.cat(parts)
            for p, meta, off in zip(opt.round_robin_bit16_groups[i], opt.round_robin_bit16_meta[i],
                                    opt.round_robin_bit16_offsets[i]):
                masters[names[id(p)]] = flat.narrow(0, off, meta.numel()).view(meta.shape).clone()
        masters_source = "the ZeRO-1/2 optimizer's fp32 partitions, all-gathered and cut by its flat-buffer offsets"
    else:
        masters = safe_get
        masters_source = "deepspeed.utils.safe_get_full_fp32_param"

    module = {}
    if case["stage"] == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            for n, p in model.named_parameters():
                module[n] = p.detach().cpu().clone()
    else:
        for n, p in model.named_parameters():
            module[n] = p.detach().cpu().clone()
    buffers = {n: b.detach().cpu().clone() for n, b in model.state_dict().items()
               if n in dict(model.named_buffers())}
    differs = sorted(n for n in trainable if not torch.equal(safe_get[n], masters[n]))
    return masters, module, buffers, differs, masters_source


def worker(local_rank, case_name, case, ckpt_dir, report_dir, port):
    world = case["world"] * case.get("tp", 1)
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()

    tp = case.get("tp", 1)
    mpu = MinimalMpu(tp) if tp > 1 else None
    mp_rank = rank % tp
    dp_rank = rank // tp

    torch.manual_seed(SEED)
    model = build_model(case["tied"])
    if tp > 1:  # each mp rank holds different values, as slices would
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.001 * mp_rank)
    seen, decay, no_decay = set(), [], []
    for n, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    cfg = ds_config(case)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg, mpu=mpu)

    save_steps = case.get("save_steps", [STEPS])
    reports = {}
    for step in range(1, max(save_steps) + 1):
        g = torch.Generator().manual_seed(1000 * step + dp_rank)
        tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        loss = engine(tokens)
        engine.backward(loss)
        engine.step()
        if step in save_steps:
            tag = f"global_step{engine.global_steps}"
            engine.save_checkpoint(ckpt_dir, exclude_frozen_parameters=case.get("exclude_frozen", False))
            masters, module, buffers, differs, source = live_state(engine, engine.module, case, None)
            hf16 = engine._zero3_consolidated_16bit_state_dict() if case.get("hf_trainer") else None
            if dp_rank == 0:
                reports[tag] = dict(masters=describe_all(masters), module=describe_all(module),
                                    buffers=describe_all(buffers), safe_get_differs=differs,
                                    masters_source=source, loss=float(loss.detach()),
                                    masters_bf16=describe_all({n: t.to(torch.bfloat16) for n, t in masters.items()}),
                                    frozen_fp32=describe_all({n: t.float() for n, t in module.items()
                                                              if n.startswith("model.frozen_proj.")}),
                                    frozen_bf16=describe_all({n: t.to(torch.bfloat16) for n, t in module.items()
                                                              if n.startswith("model.frozen_proj.")}),
                                    buffers_bf16=describe_all({n: t.to(torch.bfloat16) if t.is_floating_point()
                                                               else t for n, t in buffers.items()}))
                if hf16 is not None and rank == 0:
                    write_hf_trainer_files(ckpt_dir, hf16, engine, float(loss.detach()))
            if case.get("hf_trainer"):
                # Trainer writes rng_state_{process_index}.pth on every rank
                import numpy as np
                torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                            "cpu": torch.random.get_rng_state()},
                           os.path.join(ckpt_dir, f"rng_state_{rank}.pth"))
    if dp_rank == 0:
        with open(os.path.join(report_dir, f"mp{mp_rank}.json"), "w") as f:
            json.dump(reports, f)
    dist.barrier()
    dist.destroy_process_group()


def write_hf_trainer_files(ckpt_dir, sd16, engine, loss):
    """Side files of an HF Trainer checkpoint-N folder, written by this
    script (HF Trainer is not run): a tiny config.json, the 16-bit
    model.safetensors with the tied alias left out (as save_pretrained does),
    and a trainer_state.json."""
    from safetensors.torch import save_file
    sd = {n: t.detach().cpu().contiguous() for n, t in sd16.items() if n != "lm_head.weight"}
    save_file(sd, os.path.join(ckpt_dir, "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["TinyLMForCausalLM"], "model_type": "tiny_lm", "vocab_size": VOCAB,
              "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": 1,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "5.24.0"}
    with open(os.path.join(ckpt_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    state = {"best_metric": None, "best_model_checkpoint": None, "epoch": 1.0, "eval_steps": 500,
             "global_step": engine.global_steps, "is_hyper_param_search": False, "is_local_process_zero": True,
             "is_world_process_zero": True,
             "log_history": [{"epoch": 1.0, "grad_norm": None, "learning_rate": 0.05, "loss": round(loss, 4),
                              "step": engine.global_steps}],
             "logging_steps": 1, "max_steps": engine.global_steps, "num_input_tokens_seen": 0,
             "num_train_epochs": 1, "save_steps": engine.global_steps, "stateful_callbacks": {},
             "total_flos": 0.0, "train_batch_size": 2, "trial_name": None, "trial_params": None}
    with open(os.path.join(ckpt_dir, "trainer_state.json"), "w") as f:
        json.dump(state, f, indent=2)
        f.write("\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_converter(script, ckpt, out, args):
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, script, ckpt, out] + args
    p = subprocess.run(cmd, capture_output=True, text=True)
    tail = "\n".join((p.stderr.strip() or p.stdout.strip()).splitlines()[-6:]) if p.returncode else ""
    # machine-independent paths in the manifest
    import torch
    site = os.path.dirname(os.path.dirname(torch.__file__))
    tail = tail.replace(out, "OUT").replace(ckpt, "CHECKPOINT").replace(site, "SITE-PACKAGES")
    argv = [os.path.basename(script), "CHECKPOINT", "OUT"] + args
    return {"argv": argv, "exit_code": p.returncode, "error_tail": tail}


def load_output(out):
    """Every tensor of a converter's output folder, by name (as it gives them)."""
    import torch
    from safetensors.torch import load_file
    tensors = {}
    if not os.path.isdir(out):
        return None
    for fname in sorted(os.listdir(out)):
        path = os.path.join(out, fname)
        if fname.endswith(".safetensors"):
            tensors.update(load_file(path))
        elif fname.endswith(".bin"):
            tensors.update(torch.load(path, map_location="cpu", weights_only=True))
    return tensors or None


def convert_and_describe(ckpt, outdir, tag, untied):
    z2f = os.path.join(ckpt, "zero_to_fp32.py")
    z2t = os.path.join(ckpt, "zero_to_torch.py")
    t = ["-t", tag] if tag else []
    sfx = f"-{tag}" if tag else ""
    runs = {
        "zero_to_fp32_bin": (z2f, t),
        "zero_to_fp32_safetensors": (z2f, t + ["--safe_serialization"]),
        "zero_to_torch_bf16_safetensors": (z2t, t + ["--dtype", "bf16", "--safe_serialization"]),
        "zero_to_torch_bf16_bin": (z2t, t + ["--dtype", "bf16"]),
    }
    if untied:
        runs["zero_to_fp32_safetensors_sharded"] = (z2f, t + ["--safe_serialization", "--max_shard_size", "4KB"])
    results, outputs = {}, {}
    for name, (script, args) in runs.items():
        out = os.path.join(outdir, name + sfx)
        results[name] = run_converter(script, ckpt, out, args)
        outputs[name] = load_output(out) if results[name]["exit_code"] == 0 else None
        print(f"    {name}{sfx}: exit {results[name]['exit_code']}", flush=True)
    ref = {}
    for key, prefer in (("zero_to_fp32", ["zero_to_fp32_safetensors", "zero_to_fp32_bin"]),
                        ("zero_to_torch_bf16", ["zero_to_torch_bf16_safetensors", "zero_to_torch_bf16_bin"])):
        described = {n: describe_all(outputs[n]) for n in prefer if outputs[n] is not None}
        if described:
            first = prefer[0] if prefer[0] in described else prefer[1]
            ref[key] = described[first]
            ref[key + "_from"] = first
            if len(described) == 2 and described[prefer[0]] != described[prefer[1]]:
                ref[key + "_bin_differs"] = True
    if outputs.get("zero_to_fp32_safetensors_sharded") is not None:
        if describe_all(outputs["zero_to_fp32_safetensors_sharded"]) != ref.get("zero_to_fp32"):
            ref["zero_to_fp32_sharded_differs"] = True
    return results, ref


def make_case(name, case):
    t0 = time.time()
    import torch.multiprocessing as mp
    work = os.path.join(WORK, name)
    shutil.rmtree(work, ignore_errors=True)
    report_dir = os.path.join(work, "reports")
    os.makedirs(report_dir)
    save_name = f"checkpoint-{STEPS}" if case.get("hf_trainer") else "checkpoint"
    ckpt = os.path.join(work, save_name)
    world = case["world"] * case.get("tp", 1)
    print(f"== {name}: stage {case['stage']}, {world} processes", flush=True)
    mp.spawn(worker, args=(name, case, ckpt, report_dir, free_port()), nprocs=world, join=True)

    reports = {}
    for f in sorted(os.listdir(report_dir)):
        reports[int(f[2:-5])] = json.load(open(os.path.join(report_dir, f)))
    latest = open(os.path.join(ckpt, "latest")).read().strip()

    # what the checkpoint says about itself (rank 0's model states)
    import torch
    tagdir = os.path.join(ckpt, latest)
    ms_name = ("zero_pp_rank_0_mp_rank_00_model_states.pt" if case["stage"] == 3 else "mp_rank_00_model_states.pt")
    ms = torch.load(os.path.join(tagdir, ms_name), map_location="cpu", weights_only=False)
    shared = dict(ms.get("shared_params") or {})
    buffer_names = list(ms.get("buffer_names") or [])

    untied = not case["tied"]
    results, ref = convert_and_describe(ckpt, os.path.join(work, "out"), None, untied)
    live = reports[0][latest]
    frozen = ["model.frozen_proj.bias", "model.frozen_proj.weight"]

    manifest = {
        "deepspeed": __import__("deepspeed").__version__,
        "torch": torch.__version__,
        "ds_config": ds_config(case),
        "stage": case["stage"],
        "world_size": case["world"],
        "tensor_parallel": case.get("tp", 1),
        "precision": case["precision"],
        "steps": max(case.get("save_steps", [STEPS])),
        "tied": case["tied"],
        "exclude_frozen_parameters": bool(case.get("exclude_frozen")),
        "save_dir": save_name,
        "tag": latest,
        "covers": case["covers"],
        "notes": [],
        "shared_params": shared,
        "frozen": frozen,
        "buffers": buffer_names,
        "converters": results,
    }
    manifest.update(ref)
    lm = frozen_masters(case, live)
    manifest["live_masters"] = lm
    manifest["live_masters_bf16"] = bf16_of(case, live)
    manifest["module"] = live["module"]
    manifest["live_masters_source"] = live["masters_source"]
    if live["safe_get_differs"]:
        manifest["safe_get_full_fp32_param_differs"] = live["safe_get_differs"]
    for mp_rank in sorted(reports)[1:]:
        manifest[f"live_masters_mp_rank_{mp_rank:02d}"] = frozen_masters(case, reports[mp_rank][latest])
    other_tags = sorted(t for t in reports[0] if t != latest)
    if other_tags:
        manifest["tags"] = {}
        for tag in other_tags:
            r2, ref2 = convert_and_describe(ckpt, os.path.join(work, "out"), tag, untied)
            manifest["tags"][tag] = dict(converters=r2, **ref2, live_masters=frozen_masters(case, reports[0][tag]),
                                         live_masters_bf16=bf16_of(case, reports[0][tag]),
                                         module=reports[0][tag]["module"])
    manifest["cross_checks"] = cross_checks(manifest)
    manifest["notes"] = notes_for(name, case, manifest)

    dest = os.path.join(FIXTURES, name)
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    shutil.copytree(ckpt, os.path.join(dest, save_name))
    with open(os.path.join(dest, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"   done in {time.time() - t0:.0f} s", flush=True)


def frozen_masters(case, rep):
    """live_masters: trainable params' fp32 masters, frozen params upcast to
    float32 from the training dtype (exact), persistent buffers as saved."""
    out = dict(rep["masters"])
    if not case.get("exclude_frozen"):
        for n in ("model.frozen_proj.bias", "model.frozen_proj.weight"):
            out[n] = rep["frozen_fp32"][n]
    out.update(rep["buffers"])
    return dict(sorted(out.items()))


def bf16_of(case, rep):
    out = dict(rep["masters_bf16"])
    if not case.get("exclude_frozen"):
        for n in ("model.frozen_proj.bias", "model.frozen_proj.weight"):
            out[n] = rep["frozen_bf16"][n]
    for n, d in rep["buffers"].items():
        out[n] = rep["buffers_bf16"][n]
    return dict(sorted(out.items()))


def cross_checks(m):
    """Names on which the references disagree (empty lists are the good news)."""
    def differ(a, b, names=None):
        if a is None or b is None:
            return None
        names = names if names is not None else sorted(set(a) & set(b))
        return sorted(n for n in names if a.get(n) != b.get(n))
    alias = set(m["shared_params"])
    lm, lb = m["live_masters"], m["live_masters_bf16"]
    z, zb = m.get("zero_to_fp32"), m.get("zero_to_torch_bf16")
    trainable = sorted(n for n in lm if n not in m["frozen"] and n not in m["buffers"])
    out = {
        "zero_to_fp32_vs_live_masters": differ(z, lm),
        "zero_to_fp32_names_missing_vs_live_masters": None if z is None else sorted(set(lm) - set(z)),
        "zero_to_fp32_names_extra_vs_live_masters": None if z is None else sorted(set(z) - set(lm) - alias),
        "zero_to_torch_bf16_vs_live_masters_bf16": differ(zb, lb),
        "module_vs_live_masters_bf16_trainable": differ(m["module"], lb, trainable)
        if m["precision"] == "bf16" else None,
        "aliases_equal_owner_in_zero_to_fp32": None if z is None else all(
            z.get(a) == z.get(o) for a, o in m["shared_params"].items() if a in z),
    }
    return out


def error_line(tail):
    """The exception line of a traceback tail (with its next line when the
    message starts there)."""
    lines = tail.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", lines[i]):
            msg = lines[i].strip()
            if msg.endswith(":") and i + 1 < len(lines):
                msg += " " + lines[i + 1].strip()
            return msg
    return lines[-1].strip() if lines else ""


def notes_for(name, case, m):
    notes = [
        f"Written by DeepSpeed {m['deepspeed']} with torch {m['torch']} on CPU (gloo, one process per rank, "
        f"{m['steps']} AdamW steps, seed {SEED}) by scripts/make_deepspeed_fixtures.py.",
        "'zero_to_fp32' / 'zero_to_torch_bf16': sha256 of each tensor's bytes as DeepSpeed's own converters "
        "(the zero_to_fp32.py / zero_to_torch.py copied into the save_dir) wrote them; '*_from' names the run "
        "used (the safetensors run when it succeeded, else the .bin run). Tied aliases appear as the "
        "converter gives them.",
        "'live_masters': the live engine's values at save time, as the tool should write them by default: "
        "fp32 masters of trainable params (source in 'live_masters_source'), frozen params upcast exactly to "
        "float32 from their training-dtype values, persistent buffers as saved (int64 kept). No tied alias. "
        "'live_masters_bf16' is the same rounded with torch .to(bfloat16) (integer buffers kept). 'module': "
        "every parameter's training-dtype value in the live engine (ZeRO-3: gathered).",
    ]
    if case["stage"] == 1 and "data_types" not in case.get("extra", {}):
        notes.append("ZeRO-1 saves no frozen_param_*: zero_to_fp32 leaves model.frozen_proj.* out; they are "
                     "in 'module' of mp_rank_00_model_states.pt and in live_masters.")
    if case.get("exclude_frozen"):
        notes.append("Saved with exclude_frozen_parameters=True: the frozen params are absent from the "
                     "checkpoint, from the converters' outputs and from live_masters ('frozen' still names them).")
    if "data_types" in case.get("extra", {}):
        notes.append("BF16_Optimizer: zero_to_fp32 and zero_to_torch refuse this checkpoint (see "
                     "'converters'); live_masters is the reference. Stage 1 path: frozen params are not in "
                     "the optimizer files, take them from module.")
    if case.get("tp", 1) > 1:
        notes.append("Tensor parallel 2 x data parallel 2 through a minimal mpu (scripts/make_deepspeed_fixtures.py "
                     "MinimalMpu); the model is not really sliced: mp rank 1's values are mp rank 0's + 0.001 at "
                     "init. live_masters is mp rank 0's, live_masters_mp_rank_01 mp rank 1's. The tool must refuse.")
    if case.get("hf_trainer"):
        notes.append("HF Trainer layout made by this script, HF Trainer not run: config.json and "
                     "trainer_state.json are plausible fabrications; model.safetensors is "
                     "engine._zero3_consolidated_16bit_state_dict() (stage3_gather_16bit_weights_on_model_save) "
                     "without the tied alias lm_head.weight, as save_pretrained leaves it out; rng_state_{rank}.pth "
                     "is torch.save of python/numpy/cpu RNG states as Trainer writes them.")
    if m.get("safe_get_full_fp32_param_differs"):
        notes.append("deepspeed.utils.safe_get_full_fp32_param returned other values than the optimizer's flat "
                     "partitions for: " + ", ".join(m["safe_get_full_fp32_param_differs"]) + ".")
    for k, r in m["converters"].items():
        if r["exit_code"]:
            notes.append(f"{k} exited {r['exit_code']}: {error_line(r['error_tail'])}")
    if "tags" in m:
        notes.append("Two tags: 'latest' names " + m["tag"] + "; the top-level references are for it, 'tags' holds "
                     "the references for the other tag (converted with -t).")
    return notes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="case name (repeatable)")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    if a.list:
        for n, c in CASES.items():
            print(f"{n}: {c['covers']}")
        return
    names = a.only or list(CASES)
    for n in names:
        if n not in CASES:
            sys.exit(f"unknown case {n}; --list shows them")
    os.makedirs(FIXTURES, exist_ok=True)
    for n in names:
        make_case(n, CASES[n])


if __name__ == "__main__":
    main()
