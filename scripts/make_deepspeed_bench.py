#!/usr/bin/env python3
"""Writes the DeepSpeed ZeRO-3 checkpoint that scripts/bench-deepspeed.sh times.

A stack of LAYERS untied Linear(HIDDEN, HIDDEN, bias=False) layers (24 x
2048 x 2048 = 100.7M parameters by default), trained in bf16 with AdamW
(torch_adam) for STEPS steps by DeepSpeed on CPU with gloo, WORLD processes,
then engine.save_checkpoint(OUT). Untied, so that zero_to_fp32.py
--safe_serialization can write it.

usage (with the DeepSpeed venv, see scripts/setup-deepspeed.sh):
    DS_ACCELERATOR=cpu PATH=$PWD/target/ds-venv/bin:$PATH \
        target/ds-venv/bin/python scripts/make_deepspeed_bench.py OUT [--layers 24] [--hidden 2048]
"""
import argparse
import os
import socket
import sys

import torch.multiprocessing as mp

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


def worker(rank, args, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch
    from torch import nn
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    deepspeed.init_distributed(dist_backend="gloo")

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(args.hidden, args.hidden, bias=False)
                                         for _ in range(args.layers)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x.float().pow(2).mean()

    torch.manual_seed(1234)
    model = Stack()
    with torch.no_grad():  # keep activations bounded through the stack
        for layer in model.layers:
            layer.weight.mul_(0.5)
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True, "weight_decay": 0.0}},
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": True},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    for step in range(args.steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(2, args.hidden, generator=g).to(torch.bfloat16)
        loss = engine(x)
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(args.out)
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.world, join=True)
    print(f"make_deepspeed_bench: {args.layers} x {args.hidden}^2 = "
          f"{args.layers * args.hidden ** 2 / 1e6:.1f}M params, ZeRO-3 from {args.world} ranks -> {args.out}")


if __name__ == "__main__":
    main()
