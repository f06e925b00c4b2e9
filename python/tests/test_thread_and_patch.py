"""A consolidation on a background thread leaves the main thread running;
patch() routes PyTorch's writer and a torchtitan-style flow through the
drop-ins, and undo restores the originals."""

import logging
import sys
import threading
import time
import types

import torch
from conftest import TORCH_PEER, assert_same_output, write_shards

import st_consolidate


class Recorder(logging.Handler):
    def __init__(self, counter=None):
        super().__init__(logging.DEBUG)
        self.counter = counter
        self.records = []

    def emit(self, record):
        value = self.counter[0] if self.counter is not None else None
        self.records.append((record.getMessage(), value))


def test_a_background_consolidation_leaves_the_main_thread_running(tmp):
    g = torch.Generator().manual_seed(4)
    tensors = {f"w{i}": torch.randn(2048, 1024, generator=g) for i in range(16)}  # 128 MB
    mapping = write_shards(tmp / "in", tensors, {n: 1 + i % 4 for i, n in enumerate(tensors)})
    counter = [0]
    recorder = Recorder(counter)
    log = logging.getLogger("st_consolidate")
    log.addHandler(recorder)
    log.setLevel(logging.INFO)
    # No forced GIL hand-over: had the call kept the GIL while copying, the
    # main thread could not run at all until it returned.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000)
    try:
        worker = threading.Thread(
            target=st_consolidate.consolidate_safetensors_files_on_every_rank,
            args=(tmp / "in", tmp / "out", mapping, 2),
        )
        worker.start()
        while worker.is_alive():
            counter[0] += 1
            time.sleep(0)  # releases the GIL, so the worker's log calls get it
        worker.join()
    finally:
        sys.setswitchinterval(interval)
        log.removeHandler(recorder)
        log.setLevel(logging.NOTSET)
    start = next(v for m, v in recorder.records if m.startswith("consolidating "))
    # Both lines come from inside the call: the last progress round ends
    # the copy.
    end = [v for m, v in recorder.records if m.startswith("progress: ")][-1]
    assert end > start, recorder.records
    TORCH_PEER(str(tmp / "in"), str(tmp / "torch"), mapping)
    assert_same_output(tmp / "out", tmp / "torch")


def known_functions():
    import nemo_automodel.components.checkpoint._backports.consolidate_hf_safetensors as nb
    import nemo_automodel.components.checkpoint._backports.hf_storage as nh
    import nemo_automodel.components.checkpoint.checkpointing as nc
    import torch.distributed.checkpoint._consolidate_hf_safetensors as tc
    import torch.distributed.checkpoint.hf_storage as th

    return {
        (tc, "consolidate_safetensors_files"),
        (tc, "consolidate_safetensors_files_on_every_rank"),
        (th, "consolidate_safetensors_files"),
        (nb, "consolidate_safetensors_files"),
        (nb, "consolidate_safetensors_files_on_every_rank"),
        (nh, "consolidate_safetensors_files"),
        (nc, "consolidate_safetensors_files_on_every_rank"),
    }


def test_patch_replaces_every_binding_and_undo_restores_exactly():
    import torch.distributed.checkpoint._consolidate_hf_safetensors as tc

    titan = types.ModuleType("fake_torchtitan_checkpoint")
    titan.merge = tc.consolidate_safetensors_files_on_every_rank  # bound under another name
    sys.modules[titan.__name__] = titan
    try:
        before = {(m, a): getattr(m, a) for m, a in known_functions()}
        with st_consolidate.patch() as patched:
            for (module, attr), original in before.items():
                assert getattr(module, attr) is getattr(st_consolidate, attr), (module, attr)
            assert titan.merge is st_consolidate.consolidate_safetensors_files_on_every_rank
            assert "fake_torchtitan_checkpoint.merge" in patched.replaced
        for (module, attr), original in before.items():
            assert getattr(module, attr) is original, (module, attr)
        assert titan.merge is tc.consolidate_safetensors_files_on_every_rank
    finally:
        del sys.modules[titan.__name__]


def save_sharded(path, tensors, **writer_options):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    writer = HuggingFaceStorageWriter(str(path), save_distributed=True, **writer_options)
    dcp.save(tensors, storage_writer=writer, no_dist=True)


def test_pytorchs_writer_consolidates_through_the_dropin(tmp, caplog):
    g = torch.Generator().manual_seed(5)
    tensors = {"a": torch.randn(8, 4, generator=g), "b": torch.randn(5, generator=g).bfloat16()}
    save_sharded(tmp / "theirs", tensors, enable_consolidation=True)
    with st_consolidate.patch(), caplog.at_level(logging.INFO, logger="st_consolidate"):
        save_sharded(tmp / "ours", tensors, enable_consolidation=True)
    said = [r.getMessage() for r in caplog.records if r.name == "st_consolidate"]
    assert any(m.startswith("consolidating 2 tensors") for m in said), said
    assert_same_output(tmp / "ours", tmp / "theirs")


def test_a_torchtitan_style_flow_goes_through_the_dropin(tmp, caplog):
    import torch.distributed.checkpoint._consolidate_hf_safetensors as tc

    # torchtitan binds the function at import time, before patch().
    titan = types.ModuleType("fake_torchtitan_checkpointer")
    titan.consolidate_safetensors_files_on_every_rank = tc.consolidate_safetensors_files_on_every_rank
    sys.modules[titan.__name__] = titan
    g = torch.Generator().manual_seed(6)
    tensors = {"tok.weight": torch.randn(6, 4, generator=g), "norm.weight": torch.randn(4, generator=g)}
    mapping = {"tok.weight": 1, "norm.weight": 2}
    try:
        save_sharded(tmp / "ckpt" / "sharded", tensors, fqn_to_index_mapping=mapping)
        with st_consolidate.patch(), caplog.at_level(logging.INFO, logger="st_consolidate"):
            titan.consolidate_safetensors_files_on_every_rank(
                str(tmp / "ckpt" / "sharded"), str(tmp / "ckpt"), mapping, num_threads=5
            )
    finally:
        del sys.modules[titan.__name__]
    said = [r.getMessage() for r in caplog.records if r.name == "st_consolidate"]
    assert any(m.startswith("consolidating 2 tensors") for m in said), said
    TORCH_PEER(str(tmp / "ckpt" / "sharded"), str(tmp / "torch"), mapping)
    assert_same_output(tmp / "ckpt", tmp / "torch")
