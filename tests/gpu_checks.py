"""GPU checks, not part of `make test` (this file is not named test_*): run them on a machine
with a CUDA device as `pytest tests/gpu_checks.py`, or through `scripts/gpu_check.sh`, which
adds the speed figures. On CPU-only machines the suite covers these paths; here the same code
runs on CUDA kernels (TF32 off, other kernel orders: float32 compared at 1e-4 scaled)."""

import sys
from pathlib import Path

import pytest
import torch

from pldr import Engine, InferenceCache, generate
from pldr.inference import CACHE_MODES
from fixture_utils import assert_close_scaled, expected, fixture_model, generation, inputs

sys.path.insert(0, str(Path(__file__).parent / "training"))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_parity_on_cuda():
    model = fixture_model(metric_includes_pad=True).cuda()
    for name in ("tokens", "tokens_padded"):
        with torch.no_grad():
            out = model(inputs()[name].cuda(), return_deductive=True)
        # TF32 or another kernel order may change the last bits: 1e-4 scaled
        assert_close_scaled(out.logits.cpu(), expected()[f"{name}/logits"], tol=1e-4)
        assert_close_scaled(out.deductive.G_LM.cpu(), expected()[f"{name}/G_LM"], tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_on_cuda(dtype):
    model = fixture_model().cuda().to(dtype)
    gen = generation()
    prompts = [gen["prompt"], [17, 5, 99]]
    for mode in CACHE_MODES:
        batch = generate(model, prompts, 12, cache=mode, temperature=0, eos_id=-1)
        alone = [generate(model, [p], 12, cache=mode, temperature=0, eos_id=-1)[0] for p in prompts]
        assert all(len(b) == 12 for b in batch)
        if dtype == torch.float32:  # bfloat16 kernels of other batch shapes may flip near ties
            assert batch == alone, mode
            assert batch[0] == gen[mode]["new_tokens"][:12], mode
    sampled = generate(model, prompts, 8, temperature=1.0, top_p=0.9, seed=3, eos_id=-1)
    assert sampled == generate(model, prompts, 8, temperature=1.0, top_p=0.9, seed=3, eos_id=-1)


def test_g_cache_on_cuda_matches_cpu():
    cpu = fixture_model()
    gpu = fixture_model().cuda()
    ids = inputs()["tokens"]
    with torch.no_grad():
        g_cpu = InferenceCache.for_mode(cpu.config, "g_only", 2, 0)
        g_gpu = InferenceCache.for_mode(gpu.config, "g_only", 2, 0, "cuda")
        a = cpu(ids, cache=g_cpu).logits
        b = gpu(ids.cuda(), cache=g_gpu).logits.cpu()
    assert_close_scaled(b, a, tol=1e-4)


def _train_cfg(tmp_path, **changes):
    from pldr.training import TrainConfig

    return TrainConfig(model="tiny", data="builtin", split="train[:20%]", val_split="none",
                       out=str(tmp_path / "run"), max_steps=20, batch_size=8,
                       context_length=64, lr=2e-3, warmup_steps=5, device="cuda",
                       precision="bf16-mixed", progress=False, tensorboard=False,
                       cache_dir=str(tmp_path / "cache"), log_every=5).replace(**changes)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-true"])
def test_training_steps_on_cuda(tmp_path, precision):
    from pldr.training import train

    result = train(_train_cfg(tmp_path, precision=precision))
    losses = result.train_losses
    assert losses[max(losses)] < losses[min(losses)]


def test_compiled_training_on_cuda_tracks_eager(tmp_path):
    from pldr.training import train

    eager = train(_train_cfg(tmp_path / "eager", max_steps=10)).train_losses
    compiled = train(_train_cfg(tmp_path / "compiled", max_steps=10, compile=True)).train_losses
    assert eager.keys() == compiled.keys()
    for step in eager:  # bf16 autocast: fused kernels round differently
        assert compiled[step] == pytest.approx(eager[step], rel=2e-2), step


def test_training_steps_do_not_sync_on_cuda(tmp_path):
    """On CUDA the counter also sees device-to-host copies: a non-logging step reads none."""
    from sync_run import count_syncs

    by_step, text = count_syncs(_train_cfg(tmp_path, max_steps=8, log_every=4))
    quiet = {s: by_step.get(s, 0) for s in (1, 2, 5, 6)}
    assert all(n == 0 for n in quiet.values()), f"{quiet}\n{text}"


@pytest.mark.parametrize("logprobs", [None, 3])
def test_decode_syncs_once_per_step_on_cuda(logprobs):
    from sync_count import SyncCounter

    model = fixture_model().cuda()
    engine = Engine(model, max_batch=2, max_len=64)
    for p in ([255, 84, 58, 257], [17, 5, 99]):
        engine.submit(p, 6, temperature=0.7, seed=1, logprobs=logprobs)
    steps = 0
    with SyncCounter(label=lambda: steps) as syncs:
        while engine.has_work:
            engine.step()
            steps += 1
    assert all(syncs.by_label().get(s, 0) <= 1 for s in range(steps)), syncs.describe()


def test_bf16_mixed_deductive_outputs_are_finite_on_cuda():
    model = fixture_model().cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(inputs()["tokens"].cuda(), return_deductive=True)
    d = out.deductive
    for name in ("A", "A_LM", "A_P", "G_LM"):
        assert torch.isfinite(getattr(d, name)).all(), name
    assert torch.isfinite(out.logits).all()


def test_engine_and_compiled_decode_on_cuda():
    # continuous batching and the CUDA-graph decode step give what generate gives alone
    model = fixture_model().cuda()
    prompts = [[255, 84, 58, 257], [17, 5, 99], [42, 7, 280, 9, 12]]
    alone = [generate(model, [p], 10, temperature=0, eos_id=-1)[0] for p in prompts]
    for compile in (False, True):
        engine = Engine(model, max_batch=2, max_len=64, compile=compile)
        reqs = [engine.submit(p, 10, temperature=0, eos_id=-1) for p in prompts]
        engine.run()
        assert [r.tokens for r in reqs] == alone, f"compile={compile}"
