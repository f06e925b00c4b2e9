#!/usr/bin/env python3
"""The DeepSpeed end-to-end round trip, run by scripts/test-deepspeed.sh.

  deepspeed_roundtrip.py train WORK     (target/ds-venv/bin/python)
      2 gloo ranks (one process each, DS_ACCELERATOR=cpu) train a tiny
      LlamaForCausalLM with tied embeddings under DeepSpeed ZeRO-3, bf16,
      AdamW (torch_adam), for 2 steps and save it as HF Trainer's folder does:
        WORK/checkpoint-2/   engine.save_checkpoint (latest, global_step2/),
                             config.json (model.config.save_pretrained), a
                             16-bit model.safetensors without the tied alias
                             (stage3_gather_16bit_weights_on_model_save, as
                             Trainer.save_model writes it), trainer_state.json
        WORK/masters.safetensors   the live fp32 masters after step 2
                             (deepspeed.utils.safe_get_full_fp32_param of every
                             parameter, lm_head.weight as a copy of its own)
  deepspeed_roundtrip.py check WORK OUT[:f32|:bf16] ...    (no DeepSpeed needed)
      Each OUT is a consolidation of WORK/checkpoint-2 (with --dtype bf16 for
      :bf16); one line each, PASS OUT or FAIL OUT: why. Loads OUT with
      LlamaForCausalLM.from_pretrained(OUT, dtype=...): no missing,
      unexpected or mismatched keys; lm_head.weight tied to
      model.embed_tokens.weight; every parameter bit-identical to the masters
      (cast with .to(torch.bfloat16) for bf16); OUT's safetensors files hold
      exactly the masters' names without the alias, in the dtype asked for;
      logits on a fixed input torch.equal to those of the same architecture
      given the masters with load_state_dict (cast for bf16).
Exits non-zero if any OUT differs (the FAIL line names the tensor).
"""
import json
import os
import socket
import sys

SEED = 1234
STEPS = 2
WORLD = 2
VOCAB = 64
INPUT_IDS = [[(7 * i + 3) % VOCAB for i in range(16)], [(5 * i + 11) % VOCAB for i in range(16)]]


def llama_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True)


def ds_config():
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1000,
        "wall_clock_breakdown": False,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True, "weight_decay": 0.01}},
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    }


def worker(rank, work, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import LlamaForCausalLM
    deepspeed.init_distributed(dist_backend="gloo")
    assert dist.get_rank() == rank

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(llama_config())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config())
    for step in range(1, STEPS + 1):
        g = torch.Generator().manual_seed(1000 * step + rank)
        tokens = torch.randint(0, VOCAB, (2, 12), generator=g)
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
    assert engine.global_steps == STEPS
    ckpt = os.path.join(work, f"checkpoint-{STEPS}")
    engine.save_checkpoint(ckpt)

    # collectives: every rank calls them
    masters = {}
    for name, p in engine.module.named_parameters(remove_duplicate=False):
        masters[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
    sd16 = engine._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        from safetensors.torch import save_file
        assert "lm_head.weight" in masters and torch.equal(masters["lm_head.weight"],
                                                           masters["model.embed_tokens.weight"])
        assert all(t.dtype == torch.float32 for t in masters.values())
        save_file(masters, os.path.join(work, "masters.safetensors"))
        # HF Trainer's side files: config.json, its 16-bit model.safetensors
        # (the tied alias left out, as save_pretrained does), trainer_state.json
        engine.module.config.save_pretrained(ckpt)
        sd16 = {n: t.detach().cpu().contiguous() for n, t in sd16.items() if n != "lm_head.weight"}
        assert all(t.dtype == torch.bfloat16 for t in sd16.values())
        save_file(sd16, os.path.join(ckpt, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(ckpt, "trainer_state.json"), "w") as f:
            json.dump({"global_step": STEPS, "max_steps": STEPS, "log_history": [{"loss": float(loss.detach()), "step": STEPS}]},
                      f, indent=2)
        print(f"deepspeed_roundtrip: trained {STEPS} steps under ZeRO-3 on {WORLD} ranks, loss {float(loss.detach()):.4f}; "
              f"saved {ckpt} and {len(masters)} fp32 masters", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def train(work):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # ninja (installed into the venv by pip) must be on PATH for the JIT build
    # of DeepSpeed's CPU shm_comm op
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    import torch.multiprocessing as mp
    os.makedirs(work, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(work, port), nprocs=WORLD, join=True)


def check(work, out, dtype_name):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    masters = load_file(os.path.join(work, "masters.safetensors"))
    expected = {n: t.to(dtype) for n, t in masters.items()}

    # the files themselves: every master but the tied alias, in DTYPE
    st_dtype = {"f32": "F32", "bf16": "BF16"}[dtype_name]
    written = {}
    for fname in sorted(os.listdir(out)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(out, fname), "pt") as f:
                for name in f.keys():
                    assert name not in written, f"{name} written twice"
                    written[name] = f.get_tensor(name)
                    assert f.get_slice(name).get_dtype() == st_dtype, (name, f.get_slice(name).get_dtype())
    want = set(masters) - {"lm_head.weight"}
    assert set(written) == want, f"names differ: {sorted(set(written) ^ want)}"
    for name, t in written.items():
        assert t.dtype == dtype and torch.equal(t, expected[name]), f"{name}: the file differs from the masters"

    # from_pretrained, as a user loads it
    model, info = LlamaForCausalLM.from_pretrained(out, dtype=dtype, output_loading_info=True)
    model.eval()
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"from_pretrained: {bad}"
    assert model.lm_head.weight is model.model.embed_tokens.weight, "lm_head.weight is not tied to embed_tokens"
    loaded = dict(model.named_parameters(remove_duplicate=False))
    assert set(loaded) == set(masters), sorted(set(loaded) ^ set(masters))
    for name, t in loaded.items():
        assert t.dtype == dtype, (name, t.dtype)
        assert torch.equal(t.detach(), expected[name]), f"{name}: the loaded parameter differs from the masters"

    # the reference: the same architecture given the live masters (cast to
    # DTYPE). Built in DTYPE as from_pretrained builds it, not cast with
    # .to(dtype) afterwards, which would also round the rotary inv_freq
    # buffer that from_pretrained keeps in fp32.
    torch.manual_seed(0)  # init values are overwritten by load_state_dict
    reference = LlamaForCausalLM._from_config(model.config, dtype=dtype).eval()
    reference.load_state_dict(expected, strict=True)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    for name, t in reference.named_parameters(remove_duplicate=False):
        assert t.dtype == dtype and torch.equal(t.detach(), expected[name]), name
    for (name, b), (rname, rb) in zip(model.named_buffers(), reference.named_buffers()):
        assert name == rname and torch.equal(b, rb), f"buffer {name} differs from the reference's"
    ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want_logits = reference(input_ids=ids).logits
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert torch.equal(got, want_logits), \
        f"logits differ: max |diff| {(got.float() - want_logits.float()).abs().max().item()}"
    if dtype_name != "f32":
        cfg = json.load(open(os.path.join(out, "config.json")))
        assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16", f"config.json dtype: {cfg.get('dtype')}"
    print(f"deepspeed_roundtrip: {out} ({dtype_name}): {len(written)} tensors equal to the live fp32 masters"
          f"{' cast to ' + dtype_name if dtype_name != 'f32' else ''}, from_pretrained ties lm_head, "
          f"logits {tuple(got.shape)} torch.equal to the masters'", flush=True)


def check_all(work, specs):
    """One process for every output (transformers' import dominates the
    time): one line each, PASS OUT or FAIL OUT: why; exit 1 if any failed."""
    import traceback
    failed = 0
    for spec in specs:
        out, _, dtype_name = spec.partition(":")
        try:
            check(work, out, dtype_name or "f32")
            print(f"PASS {out}", flush=True)
        except Exception as e:  # an AssertionError names the tensor
            failed += 1
            if not isinstance(e, AssertionError):
                traceback.print_exc()
            print(f"FAIL {out}: {type(e).__name__}: {e}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "train":
        train(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "check":
        check_all(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(__doc__)
