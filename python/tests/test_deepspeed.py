"""The DeepSpeed drop-ins, through patch(), against DeepSpeed 0.19.8's own
functions on the fixtures DeepSpeed wrote (tests/fixtures/deepspeed): the
tensors equal what DeepSpeed's converters wrote (sha256 of each tensor's
bytes, from the fixtures' manifests), the file names are DeepSpeed's, a
tied model converts (DeepSpeed's own safetensors run fails on it), and
``safe_serialization=False`` runs DeepSpeed's own function.

Needs DeepSpeed: scripts/test-deepspeed.sh runs it with target/ds-venv."""

import hashlib
import json
import os
import struct
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
import deepspeed.utils.zero_to_fp32 as ds

import st_consolidate

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "deepspeed"
DTYPES = {"F32": "float32", "BF16": "bfloat16", "I64": "int64"}


def case(name):
    manifest = json.loads((FIXTURES / name / "manifest.json").read_text())
    return FIXTURES / name / manifest["save_dir"], manifest


def tensors(folder):
    """{name: (dtype, shape, sha256)} of every safetensors file in folder."""
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        header.pop("__metadata__", None)
        for name, t in header.items():
            start, end = t["data_offsets"]
            body = data[8 + length + start : 8 + length + end]
            out[name] = (DTYPES[t["dtype"]], t["shape"], hashlib.sha256(body).hexdigest())
    return out


def expected(manifest, key):
    aliases = set(manifest["shared_params"])
    return {
        name: (t["dtype"], t["shape"], t["sha256"])
        for name, t in manifest[key].items()
        if name not in aliases
    }


def test_one_file_is_model_safetensors_and_equals_zero_to_fp32(tmp_path):
    ckpt, manifest = case("z2-w2-fp32-untied")
    with st_consolidate.patch() as patched:
        assert f"{ds.__name__}.convert_zero_checkpoint_to_fp32_state_dict" in patched.replaced
        assert ds.convert_zero_checkpoint_to_fp32_state_dict(str(ckpt), tmp_path, safe_serialization=True) is None
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert tensors(tmp_path) == expected(manifest, "zero_to_fp32")
    # Undone: DeepSpeed's own function is back.
    assert ds.convert_zero_checkpoint_to_fp32_state_dict is st_consolidate._deepspeed.originals[
        "convert_zero_checkpoint_to_fp32_state_dict"
    ]


def test_a_tied_model_converts_where_deepspeeds_safetensors_run_fails(tmp_path):
    ckpt, manifest = case("z3-w2-bf16")
    with pytest.raises(RuntimeError, match="share memory"):
        ds.convert_zero_checkpoint_to_fp32_state_dict(str(ckpt), tmp_path / "theirs", safe_serialization=True)
    with st_consolidate.patch():
        ds.convert_zero_checkpoint_to_fp32_state_dict(str(ckpt), tmp_path / "ours", safe_serialization=True)
    assert tensors(tmp_path / "ours") == expected(manifest, "zero_to_fp32")


def test_sharded_names_and_index_are_deepspeeds(tmp_path):
    ckpt, manifest = case("z3-w2-bf16")
    with st_consolidate.patch():
        ds.convert_zero_checkpoint_to_fp32_state_dict(
            ckpt, tmp_path, max_shard_size="3KB", safe_serialization=True, tag="global_step2"
        )
    names = sorted(os.listdir(tmp_path))
    assert names[-1] == "model.safetensors.index.json"
    count = len(names) - 1
    assert count > 1
    assert names[:-1] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((tmp_path / names[-1]).read_text())
    assert set(index["weight_map"]) == set(expected(manifest, "zero_to_fp32"))
    assert tensors(tmp_path) == expected(manifest, "zero_to_fp32")


def test_dtype_bf16_equals_zero_to_torch(tmp_path):
    ckpt, manifest = case("z2-w3-bf16")
    with st_consolidate.patch():
        ds.convert_zero_checkpoint_to_state_dict(ckpt, tmp_path, dtype=torch.bfloat16, safe_serialization=True)
    assert tensors(tmp_path) == expected(manifest, "zero_to_torch_bf16")


def test_without_safe_serialization_deepspeeds_own_function_runs(tmp_path):
    ckpt, _ = case("z2-w2-fp32-untied")
    with st_consolidate.patch():
        ds.convert_zero_checkpoint_to_fp32_state_dict(str(ckpt), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["pytorch_model.bin"]
