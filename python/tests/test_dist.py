"""Under torchrun with gloo: on_every_rank with the default group,
process_group=None and a subgroup without global rank 0 writes what
PyTorch's function writes; a failure on one rank raises on every rank with
the same message."""

import json
from pathlib import Path

import pytest
import torch
from conftest import NEMO_PEER, assert_same_output, run_torchrun, write_shards

WORKER = Path(__file__).with_name("dist_worker.py")


def checkpoint(tmp):
    g = torch.Generator().manual_seed(3)
    tensors = {f"layer.{i}.w": torch.randn(8, 3 + i, generator=g) for i in range(6)}
    tensors["ids"] = torch.arange(10)
    mapping = {name: 1 + i % 5 for i, name in enumerate(sorted(tensors))}
    write_shards(tmp / "in", tensors, mapping, ranks=4)
    (tmp / "mapping.json").write_text(json.dumps(mapping))
    return mapping


def results(folder, world):
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_on_every_rank_with_default_none_and_subgroup(nproc, tmp):
    mapping = checkpoint(tmp)
    (tmp / "results").mkdir()
    done = run_torchrun(WORKER, nproc, "outputs", tmp / "in", tmp / "mapping.json", tmp / "out", tmp / "results")
    assert done.returncode == 0, done.stderr[-3000:]
    # The checkpoint holds an integer tensor, on which PyTorch 2.15
    # crashes: NeMo's function is the reference.
    NEMO_PEER(str(tmp / "in"), str(tmp / "peer"), mapping)
    for variant in ["default", "none", "sub"]:
        assert_same_output(tmp / "out" / variant, tmp / "peer")
    seen = results(tmp / "results", nproc)
    assert [s["world"] for s in seen] == [nproc] * nproc
    members = range(1, nproc) if nproc > 1 else [0]
    assert all(seen[r]["sub_files"] == 1 for r in members)


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_a_failure_on_one_rank_raises_the_same_message_on_every_rank(nproc, tmp):
    checkpoint(tmp)
    (tmp / "results").mkdir()
    done = run_torchrun(WORKER, nproc, "failure", tmp / "in", tmp / "mapping.json", tmp / "out", tmp / "results")
    assert done.returncode == 0, done.stderr[-3000:]
    seen = results(tmp / "results", nproc)
    errors = [s["error"] for s in seen]
    assert all(e == errors[0] for e in errors), errors
    name, message, is_value, is_runtime = errors[0]
    assert name == "InputError" and is_value and is_runtime
    if nproc > 1:
        # The failing rank's own message, naming it, on every rank.
        assert message.startswith(f"rank {nproc - 1} refused its input: "), message
    assert "in-missing" in message
    assert not (tmp / "out" / "fail").exists() or not list((tmp / "out" / "fail").glob("*.safetensors"))
