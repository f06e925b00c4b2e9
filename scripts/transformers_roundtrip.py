#!/usr/bin/env python3
"""The real-loader round trip, run by scripts/test-transformers.sh.

  transformers_roundtrip.py save WORK      a tiny Llama, saved twice into WORK:
      WORK/model/   save_pretrained (config, index, expected logits)
      WORK/shards/  DCP shards from 3 gloo ranks with HuggingFaceStorageWriter
                    (save_distributed=True): rows, columns and replicas
  transformers_roundtrip.py check WORK OUT    loads OUT (the consolidation
      with --hf-assets WORK/model) as it is with AutoModelForCausalLM.from_pretrained
      and compares its logits with the original's; also checks OUT against
      PyTorch's own consolidation.
  transformers_roundtrip.py cast WORK OUT DTYPE    OUT was consolidated with
      --dtype DTYPE and --hf-assets: every tensor must equal torch's
      tensor.to(dtype), bit for bit; config.json names the dtype and the model
      loads in it, with the logits of the original cast to it.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

WORLD = 3
INPUT = torch.arange(0, 24).reshape(2, 12) % 200


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def placement(name, tensor):
    """Row-shard embeddings and MLP up/gate, column-shard the rest, replicate 1-D."""
    if tensor.dim() == 1:
        return Replicate()
    if any(k in name for k in ("embed_tokens", "up_proj", "gate_proj", "lm_head")):
        return Shard(0)
    return Shard(1)


def save_rank(rank, work, mapping):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("RT_PORT", "29513"))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    state = {name: distribute_tensor(t.detach(), mesh, [placement(name, t)])
             for name, t in tiny_model().state_dict().items()}
    writer = HuggingFaceStorageWriter(path=f"{work}/shards", fqn_to_index_mapping=mapping, save_distributed=True)
    dcp.save(state, storage_writer=writer)
    dist.destroy_process_group()


def save(work):
    model = tiny_model()
    model.save_pretrained(f"{work}/model", max_shard_size="60KB", safe_serialization=True)
    with torch.no_grad():
        torch.save(model(INPUT).logits, f"{work}/model/expected_logits.pt")
    index = json.load(open(f"{work}/model/model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    mapping = {name: files.index(f) + 1 for name, f in index["weight_map"].items()}
    mp.spawn(save_rank, args=(work, mapping), nprocs=WORLD, join=True)
    print(f"saved {len(mapping)} tensors in {len(files)} files from {WORLD} ranks")


def check_assets(work, out, names=("config.json", "generation_config.json")):
    """--hf-assets copied the folder's config files (NAMES as they are), and
    none of its weights."""
    for name in names:
        assert open(f"{out}/{name}", "rb").read() == open(f"{work}/model/{name}", "rb").read(), \
            f"{name} not copied as it is"
    assert not os.path.exists(f"{out}/expected_logits.pt"), "a .pt file was copied"
    ours = json.load(open(f"{out}/model.safetensors.index.json"))
    # The consolidation's own index: total_size, and the mark by which a
    # later run recognises it as an earlier output.
    assert set(ours["metadata"]) == {"total_size", "written_by"}, "the index is not the consolidation's own"
    assert ours["metadata"]["written_by"] == "st-consolidate-mpi", ours["metadata"]


def check(work, out):
    check_assets(work, out)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"loading reported {problems}"
    with torch.no_grad():
        logits = model.eval()(INPUT).logits
    expected = torch.load(f"{work}/model/expected_logits.pt")
    assert torch.equal(logits, expected), f"logits differ: max {(logits - expected).abs().max()}"
    # Tensor for tensor equal to the original weights.
    original = tiny_model().state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    print(f"transformers {__import__('transformers').__version__} loaded {out}: "
          f"no missing or unexpected keys, logits equal")
    # Tensor for tensor equal to what PyTorch's own consolidation writes.
    from safetensors.torch import load_file
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files
    index = json.load(open(f"{work}/model/model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    mapping = {name: files.index(f) + 1 for name, f in index["weight_map"].items()}
    theirs_dir = f"{work}/torch-consolidated"
    os.makedirs(theirs_dir, exist_ok=True)
    consolidate_safetensors_files(f"{work}/shards", theirs_dir, fqn_to_index_mapping=mapping)
    ours, theirs = {}, {}
    for d, into in ((out, ours), (theirs_dir, theirs)):
        for f in os.listdir(d):
            if f.endswith(".safetensors"):
                into.update(load_file(os.path.join(d, f)))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    print(f"tensor for tensor equal to torch's consolidate_safetensors_files ({len(ours)} tensors)")


def check_cast(work, out, dtype_name):
    """OUT was consolidated with --dtype: each tensor must equal PyTorch's
    cast of the original, bit for bit."""
    from safetensors.torch import load_file
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype_name]
    got = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            got.update(load_file(os.path.join(out, f)))
    original = tiny_model().state_dict()
    check_assets(work, out, names=("generation_config.json",))
    torch_name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    config = json.load(open(f"{out}/config.json"))
    assert config.get("dtype", config.get("torch_dtype")) == torch_name, config
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(p.dtype == dtype for p in model.parameters()), "the model did not load in its dtype"
    with torch.no_grad():
        logits = model(INPUT).logits
        # The saved original, loaded by transformers in that dtype: the same
        # load path (tensor.to(dtype) at load time, buffers as transformers
        # makes them), so the logits must be equal bit for bit.
        reference = AutoModelForCausalLM.from_pretrained(f"{work}/model", dtype=dtype).eval()
        expected = reference(INPUT).logits
    assert torch.equal(logits, expected), f"{dtype_name} logits differ from the original's"
    print(f"--dtype {dtype_name} --hf-assets: config.json says {torch_name}, loads as {dtype}, "
          f"logits equal to the original loaded with dtype={dtype}")
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    for name, tensor in original.items():
        want = tensor.to(dtype)
        assert got[name].dtype == dtype, name
        assert torch.equal(got[name].view(view), want.view(view)), f"{name}: not bit-identical"
    print(f"--dtype {dtype_name}: {len(original)} tensors bit-identical to torch's tensor.to({dtype})")


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save(sys.argv[2])
    elif sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    else:
        check_cast(sys.argv[2], sys.argv[3], sys.argv[4])
