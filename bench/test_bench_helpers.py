"""The benchmark helpers' scheduling, checked without timing (runs in the smoke run, skipped by --benchmark-only)."""

from __future__ import annotations

from . import common


class _CallingBenchmark:
    """Stands in for pytest-benchmark's fixture: ``pedantic`` calls the target warmup + rounds times."""

    def pedantic(self, target, rounds: int, warmup_rounds: int = 0):
        result = None
        for _ in range(warmup_rounds + rounds):
            result = target()
        return result


def test_paired_blocks_follow_the_base_and_never_repeat() -> None:
    calls: list[str] = []

    def step(name: str):
        def run() -> str:
            calls.append(name)
            return name
        return run

    names = ["eager", "cpu", "floor-step"]
    block_rounds, blocks = 3, 4
    turns = common.run_paired_blocks(_CallingBenchmark(), {n: step(n) for n in names}, blocks=blocks,
                                     block_rounds=block_rounds)  # fmt: skip
    assert len(turns) == blocks  # the warm-up turn dropped
    assert all(set(turn) == {"cpu", "floor-step"} for turn in turns)
    assert all(base > 0 and own > 0 for turn in turns for base, own in turn.values())
    sequence = calls[::block_rounds]  # one name per block
    assert calls == [name for name in sequence for _ in range(block_rounds)]  # whole blocks, one step each
    assert all(a != b for a, b in zip(sequence, sequence[1:], strict=False))  # no step runs two blocks in a row
    partners = sequence[1::2]
    assert sequence[::2] == ["eager"] * len(partners)  # every other block is the base's
    assert partners[:4] == ["cpu", "floor-step", "floor-step", "cpu"]  # the partners rotate turn by turn


def test_compile_lines_list_each_fused_provider_against_compile() -> None:
    from .conftest import _compile_lines

    rows = [
        {"shape": "B16", "provider": "cpu", "mode": "paired_forward", "ratio": 2.0, "over_compile": 1.25},
        {"shape": "B16", "provider": "compile", "mode": "paired_forward", "ratio": 1.6},
        {"shape": "B16", "provider": "cpu", "mode": "forward", "ms": 0.4, "min_ms": 0.3},
    ]
    text = _compile_lines(rows)
    assert text.splitlines()[-1] == "- B16 forward: cpu 1.25×"
    assert "compile 1.6" not in text
    assert _compile_lines(rows[1:]) == ""


def test_floor_lines_give_each_provider_against_the_mode_floor() -> None:
    from .conftest import _floor_lines

    rows = [
        {"shape": "B16", "provider": "floor", "mode": "paired_forward", "ratio": 3.0, "turn_ratios": [3.0]},
        {"shape": "B16", "provider": "cpu", "mode": "paired_forward", "ratio": 2.0, "over_floor": 1.1},
        {"shape": "B16", "provider": "floor-step", "mode": "paired_forward_backward", "ratio": 5.0,
         "turn_ratios": [5.0, 3.5, 4.5]},
        {"shape": "B16", "provider": "cpu", "mode": "paired_forward_backward", "ratio": 4.2, "over_floor": 1.2},
    ]
    text = _floor_lines(rows)
    assert "- B16: eager / floor 3.00; cpu / floor 1.10" in text.splitlines()
    assert "- B16: eager / floor 5.00 (below 4 in 1 of 3 turns); cpu / floor 1.20" in text.splitlines()
    assert text.index("Forward against its floor") < text.index("L2P step (x frozen) against its floor")
    assert _floor_lines(rows[1:2]) == ""
