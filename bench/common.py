"""Shapes, providers, the floor and the byte model of the prompt-pool benchmarks.

Providers come from the dispatch table: every backend that runs on the benchmark device (besides the
reference) as ``FusedPromptPool(backend=name)``, next to the reference in eager mode (behaves like
the upstream module) and ``torch.compile`` of the reference. Shapes: B batch, N tokens, D width,
M pool, K top-k, Lp prompt length.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import mmap
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch

import l2p_fast
from l2p_fast import FusedPromptPool, available_backends
from l2p_fast.testing import peak_memory_bytes  # noqa: F401  (the suites call common.peak_memory_bytes)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmarked configuration (batch vote on, query from cls_features: the L2P setting)."""

    batch: int
    tokens: int
    width: int
    pool_size: int
    top_k: int
    length: int
    embedding_key: str = "cls"

    @property
    def seq(self) -> int:
        return self.top_k * self.length + self.tokens

    @property
    def name(self) -> str:
        return (f"B{self.batch}-N{self.tokens}-D{self.width}-M{self.pool_size}-K{self.top_k}-Lp{self.length}"
                f"-{self.embedding_key}")


L2P_CONFIGS = ((10, 5, 5), (20, 4, 10))  # (M, K, Lp): Split CIFAR-100 and 5-datasets
FULL_SHAPES = tuple(
    Shape(batch, 196, width, *config)
    for width, configs in ((768, L2P_CONFIGS), (192, L2P_CONFIGS[:1]))
    for config in configs
    for batch in (16, 64, 128)
) + (Shape(16, 196, 768, 10, 5, 5, "mean"),)
SMOKE_SHAPES = (Shape(2, 7, 16, 4, 2, 2), Shape(3, 5, 8, 4, 2, 3, "mean_max"))


def device() -> torch.device:
    """The benchmark device: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_backends(device_type: str) -> list[str]:
    """Fused backends to benchmark on ``device_type`` (Triton's CPU interpreter is not a benchmark)."""
    names = [name for name in available_backends(device_type) if name != "reference"]
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        names = [name for name in names if name != "triton"]
    return names


# the native CPU kernels with their output cache off (every output a fresh allocation), next to 'cpu'
NO_CACHE = "cpu-nocache"
# the floor of the L2P step (step_floor_fn), a row of its own in the tables
STEP_FLOOR = "floor-step"
# the floor of the forward (floor_fn: allocate the output and write it once)
FORWARD_FLOOR = "floor"
# the floor each mode's paired blocks take turns with (the trainable-x step has none)
PAIRED_FLOORS = {"forward": FORWARD_FLOOR, "forward_backward": STEP_FLOOR}


def provider_names(device_type: str, with_compile: bool) -> list[str]:
    """Providers side by side: eager reference, compiled reference, then every fused backend (in the full run
    also the native CPU kernels with the output cache off)."""
    natives = native_backends(device_type)
    extra = [NO_CACHE] if with_compile and "cpu" in natives else []
    return ["eager"] + (["compile"] if with_compile else []) + natives + extra


def backend_of(provider: str) -> str:
    """The FusedPromptPool backend a provider runs."""
    return {"eager": "reference", "compile": "reference", NO_CACHE: "cpu"}.get(provider, provider)


@contextlib.contextmanager
def cache_setting(provider: str) -> Iterator[None]:
    """Inside the block the CPU output cache is off for the 'cpu-nocache' provider (restored after)."""
    if provider != NO_CACHE:
        yield
        return
    limit = l2p_fast.cpu_cache_stats()["limit_bytes"]
    l2p_fast.empty_cpu_cache()
    l2p_fast.set_cpu_cache_limit(0)
    try:
        yield
    finally:
        l2p_fast.set_cpu_cache_limit(limit / 2**20)


def make_pool(shape: Shape, provider: str, dev: torch.device, seed: int = 0) -> tuple[FusedPromptPool, Callable]:
    """The module of ``provider`` with seeded random parameters, and the callable to time."""
    torch.manual_seed(seed)
    backend = backend_of(provider)
    pool = FusedPromptPool(length=shape.length, embed_dim=shape.width, embedding_key=shape.embedding_key,
                           prompt_pool=True, prompt_key=True, pool_size=shape.pool_size, top_k=shape.top_k,
                           batchwise_prompt=True, backend=backend).to(dev)
    if provider == "compile":
        torch._dynamo.reset()  # a fresh graph per shape (each pool instance would count as a recompile)
    forward = torch.compile(pool.forward, fullgraph=True) if provider == "compile" else pool.forward
    return pool, forward


def make_inputs(shape: Shape, dev: torch.device, requires_grad: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    """x_embed (B, N, D), cls_features (B, D), and the upstream gradient of prompted_embedding."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.batch, shape.tokens, shape.width, generator=gen).to(dev).requires_grad_(requires_grad)
    cls = torch.randn(shape.batch, shape.width, generator=gen).to(dev)
    grad = torch.randn(shape.batch, shape.seq, shape.width, generator=gen).to(dev)
    return {"x_embed": x, "cls_features": cls, "grad": grad}


def step_fn(pool: FusedPromptPool, forward: Callable, inputs: dict, mode: str) -> Callable[[], object]:
    """'forward': forward under no_grad; otherwise forward, then backward of prompted + pull term (x_embed gets a
    gradient when it requires one)."""
    x, cls, grad = inputs["x_embed"], inputs["cls_features"], inputs["grad"]
    if mode == "forward":
        def run():
            with torch.no_grad():
                return forward(x, cls_features=cls)
        return run
    one = torch.ones((), device=x.device)

    def run_backward():
        out = forward(x, cls_features=cls)
        torch.autograd.backward([out["prompted_embedding"], out["reduce_sim"]], [grad, one])
        if x.requires_grad:
            x.grad = None
        pool.zero_grad(set_to_none=True)
        return out
    return run_backward


def _write_once(out: torch.Tensor, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Write the (B, K·Lp+N, D) output once: the (K·Lp, D) head block before every sample's tokens x (B, N, D)."""
    split = head.shape[0]
    out[:, split:].copy_(x)
    out[:, :split].copy_(head.expand(x.shape[0], -1, -1))
    return out


def floor_fn(shape: Shape, inputs: dict) -> Callable[[], torch.Tensor]:
    """The floor of the forward: allocate the (B, K·Lp+N, D) output and write it once (tokens copied from
    x_embed, the prompt head from a (K·Lp, D) block), nothing else."""
    x = inputs["x_embed"].detach()
    head = torch.randn(shape.top_k * shape.length, shape.width, device=x.device)

    def run():
        return _write_once(torch.empty(shape.batch, shape.seq, shape.width, device=x.device), x, head)
    return run


HUGE_PAGE = 2 * 1024 * 1024


def mapped_buffer(sizes: tuple[int, ...], dev: torch.device) -> torch.Tensor:
    """An fp32 buffer allocated beforehand for the floors. On the CPU: fresh private anonymous memory, 2 MiB-aligned
    and advised to use transparent huge pages, as the native output cache maps its large blocks, so that a floor
    pays no more TLB misses than the cache's outputs (torch.empty of a large size gets 4 KiB pages here; a shared
    mapping would be shmem, which gets none)."""
    if dev.type != "cpu":
        return torch.empty(sizes, device=dev)
    nbytes = math.prod(sizes) * 4
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # private: shared memory gets no THP
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    offset = -address % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):  # advice only: without it the buffer is still valid memory
        region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    buffer = torch.frombuffer(region, dtype=torch.float32, count=nbytes // 4, offset=offset).view(sizes)
    buffer.fill_(0)  # touch every page now, not inside the timed rounds
    return buffer


def reused_floor_fn(shape: Shape, inputs: dict) -> Callable[[], torch.Tensor]:
    """The bandwidth floor: write the (B, K·Lp+N, D) output once into a buffer allocated beforehand (what a
    kernel pays when its output memory is reused, e.g. from the native CPU output cache)."""
    x = inputs["x_embed"].detach()
    head = torch.randn(shape.top_k * shape.length, shape.width, device=x.device)
    out = mapped_buffer((shape.batch, shape.seq, shape.width), x.device)

    def run():
        return _write_once(out, x, head)
    return run


class _TwoLeaves(torch.nn.Module):
    """Two one-element parameters: the smallest graph whose backward has the L2P step's shape for autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt = torch.nn.Parameter(torch.zeros(1))
        self.key = torch.nn.Parameter(torch.zeros(1))


def step_floor_fn(shape: Shape, inputs: dict) -> Callable[[], dict[str, torch.Tensor]]:
    """The floor of the L2P training step (forward + backward, x_embed frozen), as stock PyTorch ops do it.

    Every benchmarked step's output stays alive until that step runs again, so a new output cannot reuse the
    previous one's memory: the floor writes the (B, K·Lp+N, D) output once into the older of two buffers
    allocated beforehand (``mapped_buffer``; tokens from x_embed, the head from a (K·Lp, D) block), sums the
    prompt rows of the upstream gradient (B, K·Lp, D) over the batch into K prompts' gradients of an (M, Lp, D)
    buffer (the other rows zeroed), and pays PyTorch's fixed costs that every drop-in module pays in this step:
    ``torch.autograd.backward`` of two roots into two parameters' ``.grad`` (one-element parameters, a view
    each) and ``zero_grad(set_to_none=True)``. No selection, no key gradient, no Python forward.

    An estimate, not a strict bound: the work is done by stock PyTorch ops (two copies, a reduction, a fill),
    and the fused step has come in below it when each runs in its own benchmark (bench/RESULTS.md).
    """
    x, grad = inputs["x_embed"].detach(), inputs["grad"]
    batch, split = shape.batch, shape.top_k * shape.length
    head = torch.randn(split, shape.width, device=x.device)
    buffers = [mapped_buffer((batch, shape.seq, shape.width), x.device) for _ in range(2)]
    prompt_grad = torch.empty(shape.pool_size, shape.length, shape.width, device=x.device)
    head_grad = grad[:, :split].view(batch, shape.top_k, shape.length, shape.width)
    leaves = _TwoLeaves().to(x.device)
    seeds = [torch.ones(1, device=x.device), torch.ones((), device=x.device)]
    turn = [0]

    def run() -> dict[str, torch.Tensor]:
        turn[0] ^= 1
        out = _write_once(buffers[turn[0]], x, head)
        torch.autograd.backward([leaves.prompt.view(1), leaves.key.view(())], seeds)
        torch.sum(head_grad, dim=0, out=prompt_grad[: shape.top_k])
        prompt_grad[shape.top_k :].zero_()
        leaves.zero_grad(set_to_none=True)
        return {"prompted_embedding": out, "prompt_grad": prompt_grad}
    return run


def copy_bandwidth(dev: torch.device, megabytes: int = 64, repeats: int = 10) -> float:
    """The machine's copy bandwidth in GB/s (bytes read + written) on preallocated large buffers."""
    import time

    src = torch.randn(megabytes * 2**20 // 4, device=dev)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best / 1e9


def forward_bytes(shape: Shape, fused: bool, itemsize: int = 4) -> int:
    """Bytes the forward moves through memory (byte model; small vectors ignored).

    Fused: read x once (query reduced from the same reads), read the selected prompts, write the output
    once. Original (upstream-like): the query reads x again (not for 'cls'), prompt[idx] is written to a
    (B, K·Lp, D) temporary and read back by torch.cat, which also reads x and writes the output.
    """
    x = shape.batch * shape.tokens * shape.width
    head = shape.batch * shape.top_k * shape.length * shape.width
    out = shape.batch * shape.seq * shape.width
    if fused:
        return (x + head + out) * itemsize
    query_reads = 0 if shape.embedding_key == "cls" else x
    return (query_reads + head + 2 * head + x + out) * itemsize


def run_interleaved(benchmark, steps: dict[str, Callable[[], object]], rounds: int,
                    warmup: int) -> tuple[dict[str, list[float]], dict[str, object]]:  # fmt: skip
    """Time every step once per round, rotating the order, so the machine's state hits all steps alike
    (pytest-benchmark times whole rounds). Each step's output stays alive until that step runs again.
    Returns the seconds of every step after the ``warmup`` rounds, and each step's last output."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    outs: dict[str, object] = {}
    order = list(steps)

    def one_round() -> None:
        for name in order:
            start = time.perf_counter()
            outs[name] = steps[name]()
            times[name].append(time.perf_counter() - start)
        order.append(order.pop(0))

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup)
    return {name: values[warmup:] for name, values in times.items()}, outs


def run_paired_blocks(benchmark, steps: dict[str, Callable[[], object]], blocks: int, block_rounds: int,
                      base: str = "eager") -> list[dict[str, tuple[float, float]]]:  # fmt: skip
    """Every step runs ``block_rounds`` times in a row (a block warms its own caches, as a benchmark of its own
    does) and each block's best round is kept. In every turn each other step's block comes right after a block
    of ``base`` (the other steps rotate their order from turn to turn), so every block follows a block of a
    different step: no step runs two blocks in a row (which would warm it longer than the others), every other
    step starts from the state ``base`` leaves, and ``base`` from the state another step leaves. Returns, per
    turn, every other step's (``base``'s best seconds in the block just before, its own best seconds): the two
    sides of a ratio share the machine's state, so the ratio is not moved by the machine drifting between
    benchmarks run at different times. The first turn warms up and is dropped."""
    partners = [name for name in steps if name != base]
    turns: list[dict[str, tuple[float, float]]] = []
    outs: dict[str, object] = {}

    def best_of_block(name: str) -> float:
        best = float("inf")
        for _ in range(block_rounds):
            start = time.perf_counter()
            outs[name] = steps[name]()
            best = min(best, time.perf_counter() - start)
        return best

    def one_turn() -> None:
        turn = {}
        for name in partners:
            turn[name] = (best_of_block(base), best_of_block(name))
        partners.append(partners.pop(0))
        turns.append(turn)

    benchmark.pedantic(one_turn, rounds=blocks, warmup_rounds=1)
    return turns[1:]


def median_ratio(base: list[float], other: list[float]) -> float:
    """Median over rounds of base / other (the speed-up of ``other`` over ``base``, round by round)."""
    return statistics.median(b / o for b, o in zip(base, other, strict=True))
