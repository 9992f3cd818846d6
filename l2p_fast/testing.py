"""Input factories and tolerances shared by the tests and the benchmarks.

Random inputs are fresh per call (never zeros or constants); sizes include odd ones (D=123, N=97),
B=1, K=1, K=M; views can be non-contiguous; keys can be duplicated to force exact similarity ties.
Shapes: B batch, N tokens, D width, M pool, K top-k, Lp prompt length.
"""

from __future__ import annotations

import dataclasses
import random

import torch
from torch import Tensor

from .pool import FusedPromptPool
from .reference import EMBEDDING_KEYS

# Tolerances for similarity-derived values of a kernel vs the reference run in the same dtype.
# Gathered / prepended values are copies and are compared bit-exactly.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUTPUT_KEYS = ("prompt_norm", "x_embed_norm", "similarity", "selected_key", "reduce_sim")


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
