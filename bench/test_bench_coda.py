"""CODA-Prompt: the prompt module's forward + backward and the CODA ViT training step, the original's way vs ours.

ViT-B shapes, the paper's setting: D = Dk = 768, M = 100 components over 10 tasks, Lp = 8, 5 prompted layers, B = 16,
training at the last task (F = 100 rows used, the first 90 frozen: the heaviest step), query ``x_querry`` given (the
frozen model's CLS in the paper, computed once beforehand: the same for every side). One step: every layer's
[Ek, Ev], then the backward of random-weighted prefixes.

- upstream: the plain composition the original writes (``l2p_fast.coda.reference``: rows sliced with the old ones
  detached by ``torch.cat``, q ⊙ A materialised (B, F, Dk), ``F.normalize`` twice, two einsums), eager;
- torch.compile: the same function compiled;
- ours: ``FusedCodaPrompt(backend='auto')`` (the fused op: weights from two (B, Dk) × (Dk, F) products, one mix
  product, the frozen rows handled inside the op, no copies).

CODA ViT step (12 blocks, D = 768, 12 heads, 224² images, B = 16; the same prompt setting, forward, CE, backward,
Adam on the trainable set), all fp32: the original's structure (the plain composition, prefixes concatenated in front
of k and v + SDPA, the last block on every token) against ours (the fused op, ``prefix_attention``,
``final_tokens='head'``). ``cls_features`` is computed once beforehand (the same for both).

Every side runs interleaved round by round (``common.run_interleaved``), and the peak memory of one step of each is
measured (not for torch.compile). Rows go to the machine's record as model rows (``bench/record.py``). Full run:
``pytest bench/test_bench_coda.py --benchmark-only``; smoke (tiny shapes, each step once, outputs checked):
``--benchmark-disable``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from l2p_fast.coda import FusedCodaPrompt
from l2p_fast.coda import reference as ref

from .common import run_interleaved
from .test_bench_dualprompt import VIT_FULL, VIT_SMOKE, attention_of_prefix_blocks, concat_sdpa, peaks_of, record_pair

# (B, D, M, T, Lp, layers)
FULL, SMOKE = (16, 768, 100, 10, 8, 5), (3, 16, 10, 5, 4, 2)


def plain_layers(q, params: list[tuple], start: int, stop: int) -> list[torch.Tensor]:
    """The original's composition for every layer: [Ek, Ev, Ek, Ev, …]."""
    out = []
    for keys, attn, prompt in params:
        out.extend(ref.split_prefix(ref.coda_prompt(q, keys, attn, prompt, start, stop)))
    return out


def test_coda_module_forward_backward(benchmark, smoke: bool) -> None:
    batch, width, pool, tasks, length, layers = SMOKE if smoke else FULL
    torch.manual_seed(0)
    module = FusedCodaPrompt(width, tasks, [pool, length, 0.0], key_dim=width, layers=range(layers),
                             generator=torch.Generator().manual_seed(0))
    module.set_task(tasks - 1, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(batch, width, generator=gen)
    block = torch.zeros(batch, 1, width)
    grads = [torch.randn(batch, length // 2, width, generator=gen) for _ in range(2 * layers)]
    params = [module.layer_params(i) for i in module.e_layers]
    start, stop = module.used_rows(True)

    def ours() -> list[torch.Tensor]:
        out = []
        for i in module.e_layers:
            out.extend(module(q, i, block, train=True)[0])
        return out

    torch._dynamo.reset()
    compiled = torch.compile(plain_layers, fullgraph=True)

    def step(forward: Callable[[], list[torch.Tensor]]) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            out = forward()
            torch.autograd.backward(out, grads)
            module.zero_grad(set_to_none=True)
            return [t.detach() for t in out]
        return run

    steps = {
        "upstream": step(lambda: plain_layers(q, params, start, stop)),
        "torch.compile": step(lambda: compiled(q, params, start, stop)),
        "ours": step(ours),
    }
    benchmark.group = "CODA-Prompt module forward+backward (plain composition, torch.compile, ours; interleaved)"
    series, outs = run_interleaved(benchmark, steps, rounds=1 if smoke else 200, warmup=0 if smoke else 20)
    for name in ("torch.compile", "ours"):
        for got, want in zip(outs[name], outs["upstream"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    peaks = peaks_of(steps, smoke, skip=("torch.compile",))
    if peaks.get("ours") is not None and peaks.get("upstream") is not None:
        assert peaks["ours"] <= peaks["upstream"], peaks
    batch, width, pool, tasks, length, layers = FULL
    record_pair(benchmark, series, f"CODA-Prompt fwd+bwd D{width} M{pool} Lp{length} L{layers} B{batch} (train, "
                                   f"last of {tasks} tasks)", q.shape[0], peaks)


def test_coda_vit_step(benchmark, smoke: bool) -> None:
    timm_vit = pytest.importorskip("timm.models.vision_transformer", reason="timm is not installed")
    from l2p_fast.models.coda_vit import CodaViT

    kwargs = VIT_SMOKE if smoke else VIT_FULL
    batch, classes = (2, 10) if smoke else (16, 100)
    _, _, pool, tasks, length, _ = SMOKE if smoke else FULL
    torch.manual_seed(0)
    vit = timm_vit.VisionTransformer(**kwargs, num_classes=classes).eval()
    model = CodaViT(vit, n_tasks=tasks, pool_size=pool, length=length, final_tokens="head",
                    generator=torch.Generator().manual_seed(0))
    model.set_task(tasks - 1, torch.Generator().manual_seed(1))
    plain = copy.copy(model)  # shares every module and parameter (the dict of submodules too); only the last
    plain.final_tokens = "all"  # block's rows differ, and the prompt backend while its step runs (mix_backend)
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(batch, 3, kwargs["img_size"], kwargs["img_size"], generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    cls_features = model.query(images)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)

    @contextlib.contextmanager
    def mix_backend(name: str):
        saved, model.prompt.backend = model.prompt.backend, name
        try:
            yield
        finally:
            model.prompt.backend = saved

    def train_step(variant: CodaViT, attention=None, backend: str = "auto") -> Callable[[], dict]:
        def step() -> dict:
            with attention_of_prefix_blocks(attention) if attention is not None else contextlib.nullcontext(), \
                    mix_backend(backend):
                out = variant(images, cls_features=cls_features, train=True)
                loss = F.cross_entropy(out["logits"], labels) + out["ortho_loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            return out
        return step

    with torch.no_grad():  # before any step both compute the same numbers
        want = model(images, cls_features=cls_features, train=True)["logits"]
        with attention_of_prefix_blocks(concat_sdpa), mix_backend("reference"):
            got = plain(images, cls_features=cls_features, train=True)["logits"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    steps = {"upstream": train_step(plain, concat_sdpa, "reference"), "ours": train_step(model)}
    benchmark.group = "CODA ViT step (plain composition + concat/SDPA vs fused op + prefix_attention; interleaved)"
    series, _ = run_interleaved(benchmark, steps, rounds=1 if smoke else 4, warmup=0 if smoke else 1)
    peaks = peaks_of(steps, smoke)
    if peaks.get("ours") is not None and peaks.get("upstream") is not None:
        assert peaks["ours"] <= peaks["upstream"], peaks
    record_pair(benchmark, series, f"CODA ViT-B/16 step (12 blocks D768 H12, M{FULL[2]} Lp{FULL[4]} layers 0-4, "
                                   "fp32): original's way vs ours", batch, peaks)
