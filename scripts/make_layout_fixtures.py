#!/usr/bin/env python3
"""Writes DCP checkpoints laid out the way torchtitan and accelerate save them,
for the tests that run the README's examples as written.

    make_layout_fixtures.py FIXTURES_DIR

Into FIXTURES_DIR:
  layout-orig/          a tiny Llama saved by transformers' save_pretrained in
                        several files (config.json, model.safetensors.index.json):
                        the "original model" the examples pass to --hf-index
  layout-torchtitan/    dcp.save of torchtitan's state: the model's state dict
                        flattened at the top level, the optimizer under
                        `optimizer` (get_optimizer_state_dict with
                        flatten_optimizer_state_dict=True, after one AdamW
                        step), and `lr_scheduler`, `dataloader`, `train_state`
  layout-accelerate/    dcp.save({"model": state_dict}), as accelerate saves
                        FSDP's SHARDED_STATE_DICT (pytorch_model_fsdp_0)
  layout-manifest.json  {name: sha256} of every tensor of the original model

One process, CPU. Run with the torch virtualenv:
    target/torch-venv/bin/python scripts/make_layout_fixtures.py tests/fixtures
"""
import hashlib
import json
import os
import shutil
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

out = sys.argv[1]
torch.manual_seed(20261201)
config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                     tie_word_embeddings=False)
model = LlamaForCausalLM(config)

orig = os.path.join(out, "layout-orig")
shutil.rmtree(orig, ignore_errors=True)
model.save_pretrained(orig, max_shard_size="8KB", safe_serialization=True)

# One optimizer step, so that exp_avg and exp_avg_sq exist.
optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, 48, (2, 8))
model(input_ids=ids, labels=ids).loss.backward()
optim.step()
optim.zero_grad()
scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0)

# The weights after the step are the model of both checkpoints.
model_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
shutil.rmtree(orig)
model.save_pretrained(orig, max_shard_size="8KB", safe_serialization=True)

titan = os.path.join(out, "layout-torchtitan")
shutil.rmtree(titan, ignore_errors=True)
state = dict(model_sd)
state["optimizer"] = get_optimizer_state_dict(
    model, optim, options=StateDictOptions(flatten_optimizer_state_dict=True))
state["lr_scheduler"] = scheduler.state_dict()
state["lr_scheduler"].pop("lr_lambdas", None)
state["dataloader"] = {"world_size": 1, "sample_index": 16, "epoch": 0}
state["train_state"] = {"step": 1, "ntokens_seen": 16}
dcp.save(state, checkpoint_id=titan, no_dist=True)

accel = os.path.join(out, "layout-accelerate")
shutil.rmtree(accel, ignore_errors=True)
dcp.save({"model": model_sd}, checkpoint_id=accel, no_dist=True)

manifest = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in model_sd.items()}
with open(os.path.join(out, "layout-manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
print(f"torch {torch.__version__}: wrote {orig}, {titan}, {accel}")
