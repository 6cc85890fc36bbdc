"""GPU checks, not part of `make test` (this file is not named test_*): run them on a machine
with a CUDA device as `pytest tests/gpu_checks.py`. On CPU-only machines the suite covers these paths."""

import pytest
import torch

from pldr import InferenceCache, generate
from pldr.inference import CACHE_MODES
from fixture_utils import assert_close_scaled, expected, fixture_model, generation, inputs



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
        assert batch == alone
        if dtype == torch.float32:
            assert batch[0] == gen[mode]["new_tokens"][:12]
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


def test_training_steps_on_cuda(tmp_path):
    from pldr.training import TrainConfig, train

    result = train(TrainConfig(model="tiny", data="builtin", out=str(tmp_path / "run"),
                               max_steps=20, batch_size=8, context_length=64, lr=2e-3,
                               warmup_steps=5, device="cuda", dtype="bfloat16", progress=False,
                               tensorboard=False, cache_dir=str(tmp_path / "cache")))
    losses = result.train_losses
    assert losses[max(losses)] < losses[min(losses)]


def test_engine_and_compiled_decode_on_cuda():
    # continuous batching and the CUDA-graph decode step give what generate gives alone
    from pldr import Engine

    model = fixture_model().cuda()
    prompts = [[255, 84, 58, 257], [17, 5, 99], [42, 7, 280, 9, 12]]
    alone = [generate(model, [p], 10, temperature=0, eos_id=-1)[0] for p in prompts]
    for compile in (False, True):
        engine = Engine(model, max_batch=2, max_len=64, compile=compile)
        reqs = [engine.submit(p, 10, temperature=0, eos_id=-1) for p in prompts]
        engine.run()
        assert [r.tokens for r in reqs] == alone, f"compile={compile}"
