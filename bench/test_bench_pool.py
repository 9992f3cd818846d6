"""Prompt pool: providers side by side (eager reference, torch.compile of it, every fused backend on
the device), forward (no grad) and forward+backward with x_embed frozen (L2P) or trainable, with peak memory; two
floors; and eager against each fused backend interleaved round by round (ratios under the same machine state).

Full run: `pytest bench/ --benchmark-only`; smoke run (seconds, CI): `pytest bench/ --benchmark-disable -q`.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from . import common, record

RESULTS = record.ROWS["pool"]  # saved to the machine's record at the end of a full run (bench/conftest.py)

# forward: no grad. forward_backward: the L2P training step, x_embed from the frozen patch embedding
# (gradients to prompt and prompt_key). forward_backward_x: x_embed needs a gradient too.
MODES = ("forward", "forward_backward", "forward_backward_x")


def _rounds(shape: common.Shape) -> int:
    # enough rounds for the best and the median round to settle on this noisy VM (the same kernel on the same inputs
    # varies by 1.5x between windows of a few ms), and more at B=16, where the eager step's own time is widely spread
    # (its index_put backward alone varies 2.5-4x from best to median round, bench/RESULTS.md)
    return 150 if shape.batch <= 16 else (60 if shape.batch <= 64 else 40)


def _record(benchmark, shape: common.Shape, provider: str, mode: str, nbytes: int | None) -> None:
    if benchmark.stats is None:  # benchmarks disabled (smoke mode)
        return
    RESULTS.append({"shape": shape.name, "provider": provider, "mode": mode,
                    "ms": benchmark.stats.stats.median * 1e3, "min_ms": benchmark.stats.stats.min * 1e3,
                    "rounds": benchmark.stats.stats.rounds, "bytes": nbytes})


@pytest.mark.parametrize("mode", MODES)
def test_pool(benchmark, shape: common.Shape, provider: str, mode: str, smoke: bool) -> None:
    dev = common.device()
    benchmark.group = f"{shape.name} {mode}"
    pool, forward = common.make_pool(shape, provider, dev)
    inputs = common.make_inputs(shape, dev, requires_grad=mode == "forward_backward_x")
    run = common.step_fn(pool, forward, inputs, mode)
    with common.cache_setting(provider):
        out = benchmark.pedantic(run, rounds=1 if smoke else _rounds(shape), warmup_rounds=0 if smoke else 2)
        fused = provider not in ("eager", "compile")
        nbytes = common.forward_bytes(shape, fused=fused) if mode == "forward" else None
        _record(benchmark, shape, provider, mode, nbytes)
        if mode != "forward" and provider != "compile" and dev.type == "cpu":
            # peak bytes allocated during one forward+backward (torch profiler), next to the timings
            peak = common.peak_memory_bytes(run)
            assert peak is None or peak > 0
            if benchmark.stats is not None:
                RESULTS.append({"shape": shape.name, "provider": provider, "mode": f"peak_{mode}", "bytes": peak})
    if smoke and provider != "eager":  # the smoke run also checks that every provider computes the same thing
        eager_pool, eager_forward = common.make_pool(shape, "eager", dev)
        expected = common.step_fn(eager_pool, eager_forward, inputs, mode)()
        assert torch.equal(out["prompt_idx"], expected["prompt_idx"])
        torch.testing.assert_close(out["prompted_embedding"], expected["prompted_embedding"], rtol=0, atol=0)
        torch.testing.assert_close(out["reduce_sim"], expected["reduce_sim"])


@pytest.mark.parametrize("floor", ["floor", "floor-reused"])
def test_floor(benchmark, shape: common.Shape, smoke: bool, floor: str) -> None:
    """'floor': allocate the (B, K·Lp+N, D) output and write it once (what a forward into fresh memory pays);
    'floor-reused': write it once into memory allocated beforehand (the bandwidth floor)."""
    dev = common.device()
    benchmark.group = f"{shape.name} forward"
    inputs = common.make_inputs(shape, dev, requires_grad=False)
    make = common.floor_fn if floor == "floor" else common.reused_floor_fn
    out = benchmark.pedantic(make(shape, inputs), rounds=1 if smoke else _rounds(shape),
                             warmup_rounds=0 if smoke else 2)
    assert out.shape == (shape.batch, shape.seq, shape.width)
    _record(benchmark, shape, floor, "forward", common.forward_bytes(shape, fused=True))


def test_step_floor(benchmark, shape: common.Shape, smoke: bool) -> None:
    """The floor of the L2P step (forward + backward, x_embed frozen; common.step_floor_fn) in its own benchmark,
    next to the providers' forward_backward rows."""
    dev = common.device()
    benchmark.group = f"{shape.name} forward_backward"
    inputs = common.make_inputs(shape, dev, requires_grad=False)
    run = common.step_floor_fn(shape, inputs)
    out = benchmark.pedantic(run, rounds=1 if smoke else _rounds(shape), warmup_rounds=0 if smoke else 2)
    split = shape.top_k * shape.length
    assert torch.equal(out["prompted_embedding"][:, split:], inputs["x_embed"])  # the tokens after the head
    heads = inputs["grad"][:, :split].reshape(shape.batch, shape.top_k, shape.length, shape.width)
    torch.testing.assert_close(out["prompt_grad"][: shape.top_k], heads.sum(0))
    assert not out["prompt_grad"][shape.top_k :].any()
    _record(benchmark, shape, common.STEP_FLOOR, "forward_backward", None)


def _eager_and_native_steps(shape: common.Shape, mode: str, with_floor: bool = False,
                            with_compile: bool = False) -> tuple[list[str], dict]:  # fmt: skip
    """The provider names (eager first, then every fused backend on the device, then ``torch.compile`` of the
    reference when ``with_compile``, then the mode's floor when ``with_floor`` and the mode has one) and
    each one's step in ``mode``, on its own inputs. The floor is the forward's (alloc + write once) in the
    forward mode and the step floor in the L2P step."""
    dev = common.device()
    names = ["eager"] + common.native_backends(dev.type) + (["compile"] if with_compile else [])
    steps = {}
    for name in names:
        pool, forward = common.make_pool(shape, name, dev)
        steps[name] = common.step_fn(pool, forward, common.make_inputs(shape, dev, mode == "forward_backward_x"), mode)
    floor = common.PAIRED_FLOORS.get(mode)
    if with_floor and floor is not None:
        make = common.step_floor_fn if floor == common.STEP_FLOOR else common.floor_fn
        names.append(floor)
        steps[floor] = make(shape, common.make_inputs(shape, dev, requires_grad=False))
    return names, steps


@pytest.mark.parametrize("mode", MODES)
def test_interleaved(benchmark, shape: common.Shape, mode: str, smoke: bool) -> None:
    """eager and each fused provider alternate within every round, so both see the same machine state; the
    median of the per-round ratios eager / provider is the table's 'interleaved' speed-up. As in the other
    benchmarks, each step's output stays alive until that step runs again."""
    benchmark.group = f"{shape.name} {mode} interleaved"
    names, steps = _eager_and_native_steps(shape, mode)
    times, _ = common.run_interleaved(benchmark, steps, rounds=1 if smoke else _rounds(shape), warmup=0 if smoke else 3)
    if benchmark.stats is None:
        return
    for name in names[1:]:
        ratio = common.median_ratio(times["eager"], times[name])
        RESULTS.append({"shape": shape.name, "provider": name, "mode": f"interleaved_{mode}", "ratio": ratio,
                        "rounds": len(times[name])})  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_paired_blocks(benchmark, shape: common.Shape, mode: str, smoke: bool) -> None:
    """Each fused provider's block of rounds right after a block of eager, in turns (common.run_paired_blocks): the
    median over turns of eager's best round / the provider's best round in the block after it is the table's
    'paired' speed-up: caches as warm as in the separate benchmarks, the machine's state shared by both sides of a
    ratio, and every provider (and eager) starting its block from another step's state. The mode's floor takes
    turns too (the forward: allocate the output and write it once, common.floor_fn; the L2P step: the step floor,
    common.step_floor_fn, the step's unavoidable memory work and PyTorch's fixed costs done by stock ops): eager /
    floor is the speed-up that work allows in the turn's machine state, and each provider / floor (both after an
    eager block in the same turn) how far the provider is from it. In the full run
    torch.compile of the reference takes turns as well: compile / provider in the same turn is the speed-up over
    compile under one machine state."""
    benchmark.group = f"{shape.name} {mode} paired blocks"
    names, steps = _eager_and_native_steps(shape, mode, with_floor=True, with_compile=not smoke)
    rounds = _rounds(shape)
    turns = common.run_paired_blocks(benchmark, steps, blocks=2 if smoke else 16, block_rounds=1 if smoke else
                                     max(4, rounds // 10))  # fmt: skip
    assert all(set(turn) == set(names[1:]) for turn in turns)
    if benchmark.stats is None:
        return
    floor = common.PAIRED_FLOORS.get(mode)
    for name in names[1:]:
        ratios = [turn[name][0] / turn[name][1] for turn in turns]
        row = {"shape": shape.name, "provider": name, "mode": f"paired_{mode}", "ratio": statistics.median(ratios),
               "turns": len(turns), "turn_ratios": ratios}  # fmt: skip
        if floor in steps and name != floor:  # against the floor of the same turn
            row["over_floor"] = statistics.median(turn[name][1] / turn[floor][1] for turn in turns)
        if "compile" in steps and name not in ("compile", floor):  # against compile in the same turn
            row["over_compile"] = statistics.median(turn["compile"][1] / turn[name][1] for turn in turns)
        RESULTS.append(row)


def test_reference_scatter_spread(benchmark, shape: common.Shape, smoke: bool) -> None:
    """The eager backward's prompt-gradient scatter alone (index_put with accumulate of the (B, K, Lp, D) gathered
    gradient into (M, Lp, D), as autograd runs it for ``prompt[idx]``): its best and median round, which show how
    widely the eager step's own time is spread (the reason the table gives speed-ups on the median too)."""
    if shape.batch > 16 and not smoke:
        pytest.skip("measured at B=16 only (the shapes whose speed-up target compares eager's best round)")
    benchmark.group = f"{shape.name} eager scatter"
    dev = common.device()
    gen = torch.Generator().manual_seed(2)
    idx = torch.randperm(shape.pool_size, generator=gen)[: shape.top_k].repeat(shape.batch, 1).to(dev)  # batch vote
    values = torch.randn(shape.batch, shape.top_k, shape.length, shape.width, generator=gen).to(dev)

    def scatter() -> torch.Tensor:
        grad = torch.zeros(shape.pool_size, shape.length, shape.width, device=dev)
        return grad.index_put_((idx,), values, accumulate=True)

    out = benchmark.pedantic(scatter, rounds=1 if smoke else 4 * _rounds(shape), warmup_rounds=0 if smoke else 2)
    torch.testing.assert_close(out.sum(), values.sum(), rtol=1e-4, atol=1e-2)  # every gathered row landed once
    _record(benchmark, shape, "eager scatter", "scatter", None)
