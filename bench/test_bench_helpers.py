"""The benchmark helpers checked without timing: the paired blocks' schedule, the summary lines under the table
and the floors' mapped buffers (run in the smoke run, skipped by --benchmark-only)."""

from __future__ import annotations

import mmap

import pytest
import torch

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


def _vm_flags(address: int) -> list[str] | None:
    """The VmFlags of the mapping holding ``address`` (/proc/self/smaps), None where there is no smaps."""
    try:
        with open("/proc/self/smaps") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


def test_mapped_buffer_is_private_zeroed_and_huge_page_advised() -> None:
    buffer = common.mapped_buffer((3, 5, 7), torch.device("cpu"))
    assert buffer.shape == (3, 5, 7) and buffer.dtype == torch.float32 and not buffer.any()
    assert buffer.data_ptr() % common.HUGE_PAGE == 0
    flags = _vm_flags(buffer.data_ptr())
    if flags is None:
        pytest.skip("no /proc/self/smaps on this system")
    assert "sh" not in flags  # a shared mapping would be shmem, which gets no transparent huge pages
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert "hg" in flags
