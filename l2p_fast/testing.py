"""Input factories, backend/device pairs and tolerances shared by the tests and the benchmarks.

Random inputs are fresh per call (never zeros or constants); sizes include odd ones (D=123, N=97),
B=1, K=1, K=M; views can be non-contiguous; keys can be duplicated to force exact similarity ties.
Shapes: B batch, N tokens, D width, M pool, K top-k, Lp prompt length.

Tolerances follow flash-attention's rule: a backend's error against an fp64 reference may be at
most twice the error of the reference itself computed in the same precision, plus a small floor
chosen by each tensor's own dtype (``assert_close_to_truth``). Gathered / prepended values are
copies and are compared bit-exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .pool import FusedPromptPool
from .reference import EMBEDDING_KEYS

# Kernel vs the reference run in the same dtype, for tests that have no fp64 truth at hand.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}
# Absolute floor of the flash-attention rule per tensor dtype, relative to max(1, max|truth|): a few ulps of
# the dtype, so that an error both runs get by chance (a differently ordered sum) cannot fail the rule.
ERROR_FLOORS: dict[torch.dtype, float] = {
    torch.float64: 1e-13,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUTPUT_KEYS = ("prompt_norm", "x_embed_norm", "similarity", "selected_key", "reduce_sim")
GRAD_KEYS = ("x_embed", "cls_features", "prompt", "prompt_key")

# Every (backend, device type) the kernel tests run: CPU tensors for the reference, the C++ CPU kernels and
# Triton (its interpreter), CUDA tensors for the reference, the CUDA kernels and Triton when a GPU exists.
BACKEND_DEVICES: tuple[tuple[str, str], ...] = (
    ("reference", "cpu"),
    ("cpu", "cpu"),
    ("triton", "cpu"),
    ("reference", "cuda"),
    ("cuda", "cuda"),
    ("triton", "cuda"),
)
FUSED_BACKEND_DEVICES = tuple(pair for pair in BACKEND_DEVICES if pair[0] != "reference")


def backend_skip_reason(backend: str, device: str) -> str | None:
    """Why ``FusedPromptPool(backend=backend)`` cannot run on ``device`` tensors here (None when it can)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton on CPU tensors needs TRITON_INTERPRET=1 (not set: tests set it only when no GPU is present)"
    try:
        FusedPromptPool(length=1, embed_dim=1, backend=backend).resolved_backend(device)
    except RuntimeError as error:
        return str(error)
    return None


def max_error(value: Tensor, truth: Tensor) -> float:
    """max |value − truth| in fp64 (0 for empty tensors); NaNs must sit at the same places."""
    value, truth = value.detach().double().cpu(), truth.detach().double().cpu()
    nan = torch.isnan(truth)
    assert torch.equal(torch.isnan(value), nan), "NaN at different places"
    if not value.numel():
        return 0.0
    return (value[~nan] - truth[~nan]).abs().max().item() if (~nan).any() else 0.0


def assert_close_to_truth(name: str, got: Tensor, low: Tensor, truth: Tensor, scale: float | None = None) -> None:
    """flash-attention's rule: max|got − truth| ≤ 2·max|low − truth| + floor(got.dtype)·scale.

    ``truth``: the reference in fp64 on the same inputs; ``low``: the reference in the precision ``got`` was
    computed in (same dtypes, same device). ``got`` and ``low`` must agree in dtype and shape. ``scale``: the
    magnitude the floor is relative to, by default max(1, max|truth|); a sum with cancellation should pass the
    sum of its terms' magnitudes (e.g. K for ``reduce_sim``, a sum of K cosines per row averaged over B).
    """
    assert got.dtype == low.dtype, f"{name}: dtype {got.dtype}, reference {low.dtype}"
    assert got.shape == low.shape, f"{name}: shape {tuple(got.shape)}, reference {tuple(low.shape)}"
    if scale is None:
        finite = truth.detach().double().abs().nan_to_num(0.0, 0.0, 0.0)
        scale = max(1.0, finite.max().item()) if truth.numel() else 1.0
    error, low_error = max_error(got, truth), max_error(low, truth)
    bound = 2 * low_error + ERROR_FLOORS[got.dtype] * scale
    assert error <= bound, (
        f"{name} ({got.dtype}): error {error:.3e} against fp64 > bound {bound:.3e} "
        f"(2 × the {low.dtype} reference's error {low_error:.3e} + floor at scale {scale:.3g})"
    )


def select_by_rule(similarity: Tensor, top_k: int, batchwise: bool) -> Tensor:
    """Ids (B, K) of docs/behaviour.md §4.3 from a similarity (B, M), written independently of l2p_fast:
    a stable descending sort (equal values: lower id first); the vote counts ids and sorts the counts alike."""
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :top_k]
    if not batchwise:
        return order
    counts = torch.zeros(similarity.shape[1], dtype=torch.int64, device=similarity.device)
    counts.scatter_add_(0, order.reshape(-1), torch.ones_like(order.reshape(-1)))
    winners = torch.sort(counts, descending=True, stable=True).indices[:top_k]
    return winners.expand(similarity.shape[0], top_k)


@dataclasses.dataclass(frozen=True)
class PoolCase:
    """One prompt-pool configuration and input shape."""

    batch: int = 4
    tokens: int = 9
    width: int = 16
    pool_size: int = 6
    top_k: int = 3
    length: int = 2
    embedding_key: str = "mean"
    batchwise: bool = False
    use_cls: bool = False
    use_mask: bool = False
    learnable_key: bool = True
    dtype: torch.dtype = torch.float32
    non_contiguous: bool = False
    duplicate_keys: bool = False

    def module_kwargs(self) -> dict:
        """Constructor arguments of ``FusedPromptPool`` for this case."""
        return {
            "length": self.length,
            "embed_dim": self.width,
            "embedding_key": self.embedding_key,
            "prompt_pool": True,
            "prompt_key": self.learnable_key,
            "pool_size": self.pool_size,
            "top_k": self.top_k,
            "batchwise_prompt": self.batchwise,
        }


def random_cases(count: int, seed: int, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> list[PoolCase]:
    """``count`` fresh random configurations covering odd sizes, B=1, K=1, K=M, masks, every key."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        pool_size = rng.choice([1, 2, 5, 10, 17, 33])
        top_k = rng.choice([1, pool_size, rng.randint(1, pool_size)])
        cases.append(
            PoolCase(
                batch=rng.choice([1, 2, 3, 8, 13]),
                tokens=rng.choice([1, 3, 7, 97]),
                width=rng.choice([8, 16, 33, 64, 123]),
                pool_size=pool_size,
                top_k=top_k,
                length=rng.choice([1, 2, 5]),
                embedding_key=EMBEDDING_KEYS[i % len(EMBEDDING_KEYS)],
                batchwise=rng.random() < 0.5,
                use_cls=rng.random() < 0.5,
                use_mask=rng.random() < 0.25,
                learnable_key=rng.random() < 0.8,
                dtype=dtypes[i % len(dtypes)],
                non_contiguous=rng.random() < 0.3,
                duplicate_keys=rng.random() < 0.2,
            )
        )
    return cases


def make_inputs(case: PoolCase, device: str | torch.device = "cpu", seed: int | None = None) -> dict:
    """Random forward inputs of ``case``: x_embed (B, N, D), cls_features (B, D) | None, prompt_mask (B, K) | None."""
    gen = torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**31))
    shape = (case.batch, case.tokens, case.width)
    if case.non_contiguous:  # a transposed view of a (B, D, N) buffer
        x_embed = torch.randn(case.batch, case.width, case.tokens, generator=gen).transpose(1, 2)
    else:
        x_embed = torch.randn(shape, generator=gen)
    cls_features = torch.randn(case.batch, case.width, generator=gen) if case.use_cls else None
    prompt_mask = None
    if case.use_mask:
        prompt_mask = torch.randint(0, case.pool_size, (case.batch, case.top_k), generator=gen)
    return {
        "x_embed": x_embed.to(device=device, dtype=case.dtype),
        "cls_features": None if cls_features is None else cls_features.to(device=device, dtype=case.dtype),
        "prompt_mask": None if prompt_mask is None else prompt_mask.to(device),
    }


def make_pool(
    case: PoolCase, backend: str = "reference", device: str | torch.device = "cpu", seed: int | None = None
) -> FusedPromptPool:
    """A ``FusedPromptPool`` of ``case`` with random fp32 parameters (fp64 when case.dtype is fp64)."""
    if seed is not None:
        torch.manual_seed(seed)
    pool = FusedPromptPool(**case.module_kwargs(), backend=backend)
    with torch.no_grad():
        pool.prompt.normal_()
        if pool.prompt_key is not None:
            pool.prompt_key.normal_()
            if case.duplicate_keys and case.pool_size > 1:
                pool.prompt_key[-1].copy_(pool.prompt_key[0])  # exact ties between id 0 and M-1
    if case.dtype == torch.float64:
        pool = pool.double()
    return pool.to(device)


def clone_pool(pool: FusedPromptPool, backend: str) -> FusedPromptPool:
    """A copy of ``pool`` with the same parameters running on ``backend``."""
    twin = FusedPromptPool(
        length=pool.length,
        embed_dim=pool.embed_dim,
        embedding_key=pool.embedding_key,
        prompt_pool=pool.prompt_pool,
        prompt_key=pool.learnable_key,
        pool_size=pool.pool_size,
        top_k=pool.top_k,
        batchwise_prompt=pool.batchwise_prompt,
        backend=backend,
    ).to(device=pool.prompt.device, dtype=pool.prompt.dtype)
    twin.load_state_dict(pool.state_dict())
    return twin


def loss_weights(out: dict, seed: int = 0) -> dict[str, Tensor]:
    """Random weights for a scalar test loss touching every float output of the pool."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for key, value in out.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            weights[key] = torch.randn(value.shape, generator=gen).to(value.device, value.dtype)
    return weights


def weighted_loss(out: dict, weights: dict[str, Tensor]) -> Tensor:
    """Σ over outputs of ⟨output, weight⟩ (computed in fp64 so the loss itself adds no rounding)."""
    total = sum((out[key].double() * weights[key].double()).sum() for key in weights)
    return total


def forward_and_grads(pool: FusedPromptPool, inputs: dict, weights: dict[str, Tensor] | None = None):
    """Run ``pool`` on fresh leaf copies of ``inputs``; return (outputs, grads by input/parameter name)."""
    x_embed = inputs["x_embed"].detach().clone().requires_grad_(True)
    cls_features = inputs["cls_features"]
    if cls_features is not None:
        cls_features = cls_features.detach().clone().requires_grad_(True)
    pool.zero_grad(set_to_none=True)
    out = pool(x_embed, prompt_mask=inputs["prompt_mask"], cls_features=cls_features)
    weights = weights if weights is not None else loss_weights(out)
    weighted_loss(out, weights).backward()
    grads = {
        "x_embed": x_embed.grad,
        "cls_features": None if cls_features is None else cls_features.grad,
        "prompt": pool.prompt.grad,
        "prompt_key": None if pool.prompt_key is None else pool.prompt_key.grad,
    }
    return out, grads, weights


def tiny_vit(seed: int = 0, **kwargs: object) -> nn.Module:
    """A seeded random-weight timm ViT (img 32, patch 4, D=64, 2 blocks, 10 classes; ``kwargs`` override
    them) in eval mode, with non-trivial CLS and positions (timm starts CLS near zero). Needs timm."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    config = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4, "num_classes": 10}
    vit = VisionTransformer(**{**config, **kwargs})
    with torch.no_grad():
        for param in (vit.cls_token, vit.pos_embed):
            if param is not None:  # class_token=False has no CLS
                param.normal_()
    return vit.eval()


def tiny_bert(seed: int = 0, **overrides: object) -> nn.Module:
    """A seeded random-weight Hugging Face ``BertModel`` (width 24, 3 layers, 4 heads, vocabulary 60; ``overrides``
    change its ``BertConfig``), frozen, in eval mode. Needs transformers."""
    import transformers

    torch.manual_seed(seed)
    config = {
        "vocab_size": 60, "hidden_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
        "intermediate_size": 40, "max_position_embeddings": 40, "type_vocab_size": 2, "hidden_act": "gelu",
    }  # fmt: skip
    return transformers.BertModel(transformers.BertConfig(**{**config, **overrides})).eval().requires_grad_(False)


def peak_memory_bytes(step: Callable[[], object]) -> int | None:
    """Peak bytes allocated above the starting level during one call of ``step`` (torch profiler; ``step`` runs
    once before, as a warm-up). None when the profiler recorded no allocation. Shared by tests and benchmarks."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            events = json.load(handle)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    if not memory:
        return None
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - start


class Interrupted(Exception):
    """Raised by the hook of :func:`interrupt_after`: a run stopped from outside, as a kill would."""


def interrupt_after(step: int) -> Callable[[int], None]:
    """A trainer ``step_hook`` that raises :class:`Interrupted` once global step ``step`` has run."""

    def hook(current: int) -> None:
        if current == step:
            raise Interrupted(f"interrupted after step {step}")

    return hook
