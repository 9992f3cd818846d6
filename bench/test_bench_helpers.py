"""The benchmark helpers checked without timing: the paired blocks' schedule, the machine's record and the tables made
from it, the summary lines under the tables and the floors' mapped buffers (run in the smoke run, skipped by
--benchmark-only)."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import pytest
import torch

from . import common, record


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
    rows = [
        {"shape": "B16", "provider": "cpu", "mode": "paired_forward", "ratio": 2.0, "over_compile": 1.25},
        {"shape": "B16", "provider": "compile", "mode": "paired_forward", "ratio": 1.6},
        {"shape": "B16", "provider": "cpu", "mode": "forward", "ms": 0.4, "min_ms": 0.3},
    ]
    text = record.compile_lines(rows)
    assert text.splitlines()[-1] == "- B16 forward: cpu 1.25×"
    assert "compile 1.6" not in text
    assert record.compile_lines(rows[1:]) == ""


def test_floor_lines_give_each_provider_against_the_mode_floor() -> None:
    rows = [
        {"shape": "B16", "provider": "floor", "mode": "paired_forward", "ratio": 3.0, "turn_ratios": [3.0]},
        {"shape": "B16", "provider": "cpu", "mode": "paired_forward", "ratio": 2.0, "over_floor": 1.1},
        {"shape": "B16", "provider": "floor-step", "mode": "paired_forward_backward", "ratio": 5.0,
         "turn_ratios": [5.0, 3.5, 4.5]},
        {"shape": "B16", "provider": "cpu", "mode": "paired_forward_backward", "ratio": 4.2, "over_floor": 1.2},
    ]
    text = record.floor_lines(rows)
    assert "- B16: eager / floor 3.00; cpu / floor 1.10" in text.splitlines()
    assert "- B16: eager / floor 5.00 (below 4 in 1 of 3 turns); cpu / floor 1.20" in text.splitlines()
    assert text.index("Forward against its floor") < text.index("L2P step (x frozen) against its floor")
    assert record.floor_lines(rows[1:2]) == ""


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


def _fake_pool_rows() -> list[dict]:
    """Rows as bench/test_bench_pool.py records them, for one shape (times in ms)."""
    shape = "B16-D8"
    timed = {("eager", "forward"): 2.0, ("compile", "forward"): 1.0, ("cpu", "forward"): 0.5, ("floor", "forward"): 0.4,
             ("eager", "forward_backward"): 3.0, ("cpu", "forward_backward"): 0.75,
             ("floor-step", "forward_backward"): 0.6}  # fmt: skip
    rows = [{"shape": shape, "provider": p, "mode": m, "ms": 2 * t, "min_ms": t, "rounds": 5, "bytes": None}
            for (p, m), t in timed.items()]  # fmt: skip
    rows += [
        {"shape": shape, "provider": "cpu", "mode": "peak_forward_backward", "bytes": 12_500_000},
        {"shape": shape, "provider": "cpu", "mode": "paired_forward", "ratio": 3.5, "over_compile": 1.5},
        {"shape": shape, "provider": "cpu", "mode": "interleaved_forward", "ratio": 2.5},
    ]
    return rows


def _fake_model_rows() -> list[dict]:
    return [{"model": "vit", "variant": "upstream", "batch": 16, "ms": 20.0, "eps": 800.0, "ratio": 1.0},
            {"model": "vit", "variant": "ours", "batch": 16, "ms": 16.0, "eps": 1000.0, "ratio": 1.3}]  # fmt: skip


def test_write_suite_keeps_the_other_suite_and_replaces_its_own(tmp_path: Path) -> None:
    machine = record.machine_name("cpu", "AMD EPYC 7B13")
    assert machine == "cpu-amd-epyc-7b13"
    path = record.write_suite(machine, "pool", {"date": "d1"}, _fake_pool_rows(), folder=tmp_path)
    assert path == tmp_path / "cpu-amd-epyc-7b13.json"
    record.write_suite(machine, "models", {"date": "d2"}, _fake_model_rows(), folder=tmp_path)
    record.write_suite(machine, "pool", {"date": "d3"}, _fake_pool_rows()[:1], folder=tmp_path)
    saved = json.loads(path.read_text())
    assert saved["machine"] == machine
    assert saved["suites"]["pool"] == {"meta": {"date": "d3"}, "rows": _fake_pool_rows()[:1]}
    assert saved["suites"]["models"]["rows"] == _fake_model_rows()
    assert record.load(path) == saved
    with pytest.raises(ValueError, match="rows"):
        record.write_suite(machine, "pool", {}, [], folder=tmp_path)


def test_save_run_writes_the_record_and_regenerates_the_markdown(tmp_path: Path) -> None:
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text("# Results\n")
    rows = {"pool": _fake_pool_rows(), "models": []}  # only the pool suite ran
    saved = record.save_run("cpu-test", {"pool": {"date": "d"}, "models": {}}, rows, folder=tmp_path, markdown=markdown,
                            readme=None)
    assert json.loads((tmp_path / "cpu-test.json").read_text()) == saved
    assert list(saved["suites"]) == ["pool"]
    assert record.generated_block(markdown.read_text(), "cpu-test") == record.compact_tables(saved)
    with pytest.raises(ValueError, match="rows"):
        record.save_run("cpu-test", {}, {"pool": [], "models": []}, folder=tmp_path, markdown=markdown, readme=None)


def test_pool_tables_compute_each_ratio_from_the_rows() -> None:
    text = record.pool_tables(_fake_pool_rows())
    lines = text.splitlines()
    assert "| B16-D8 | cpu | 0.500 | 4.00 | 3.50 | 2.00 | 1.50 | 1.25 |  |" in lines  # forward: no peak
    assert "| B16-D8 | floor (alloc + write once) | 0.400 |  |  |  |  | 1.00 |  |" in lines
    assert "| B16-D8 | cpu | 0.750 | 4.00 |  |  |  | 1.25 | 12.5 |" in lines  # the step over floor-step
    assert "| B16-D8 | compile | 1.000 | 2.00 |  | 1.00 |  | 2.50 |  |" in lines
    assert text.index("**Forward (no grad)**") < text.index("**L2P step")
    assert "x_embed trainable" not in text  # a mode without rows gets no table


def test_compact_tables_of_a_record_and_the_block_in_markdown(tmp_path: Path) -> None:
    saved = {"machine": "cpu-test", "suites": {
        "pool": {"meta": {"date": "2026-01-01", "threads": 2}, "rows": _fake_pool_rows()},
        "models": {"meta": {"date": "2026-01-02"}, "rows": _fake_model_rows()}}}  # fmt: skip
    text = record.compact_tables(saved)
    assert "Prompt pool (date 2026-01-01; threads 2):" in text
    assert "| vit | 16 | 20.00 | 16.00 | 1000.0 | 1.30 |" in text.splitlines()
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text("# Results\n\nprose before\n")
    record.update_markdown(saved, markdown)
    assert record.generated_block(markdown.read_text(), "cpu-test") == text
    saved["suites"]["models"]["rows"][1]["ms"] = 10.0  # a new run replaces the block and keeps the prose
    record.update_markdown(saved, markdown)
    content = markdown.read_text()
    assert content.startswith("# Results\n\nprose before\n") and content.count("<!-- generated: cpu-test") == 1
    assert "| vit | 16 | 20.00 | 10.00 |" in record.generated_block(content, "cpu-test")


def test_summary_tables_give_the_l2p_shapes_of_each_fused_provider(tmp_path: Path) -> None:
    rows = [{**row, "shape": "B16-N196-D768-M10-K5-Lp5-cls"} for row in _fake_pool_rows()]
    saved = {"machine": "cpu-test", "suites": {"pool": {"meta": {"date": "d"}, "rows": rows}}}
    lines = record.summary_tables(saved).splitlines()
    assert "| B16-N196-D768-M10-K5-Lp5-cls | forward | cpu | 2.000 | 1.000 | 0.500 | 4.00 | 3.50 | 1.50 |  |" in lines
    assert "| B16-N196-D768-M10-K5-Lp5-cls | L2P step | cpu | 3.000 |  | 0.750 | 4.00 |  |  |  |" in lines
    assert not any("| eager |" in line or "floor" in line for line in lines)  # fused providers only
    readme = tmp_path / "README.md"
    readme.write_text("intro\n")
    assert not record.update_readme_summary(saved, readme)  # no block for this machine: left alone
    assert readme.read_text() == "intro\n"
    readme.write_text("intro\n<!-- generated: cpu-test summary (python -m bench.record) -->\n"
                      "<!-- end generated: cpu-test summary -->\nend\n")  # fmt: skip
    assert record.update_readme_summary(saved, readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\nend\n")
    assert record.generated_block(text, "cpu-test summary") == record.summary_tables(saved)


def test_results_md_and_readme_tables_are_generated_from_the_records() -> None:
    """Every record in bench/results/ has its block in bench/RESULTS.md, equal to the tables made from it, and the
    README's summary blocks equal the summaries of their records."""
    paths = sorted(record.RESULTS_DIR.glob("*.json"))
    assert paths, "no benchmark record in bench/results/"
    text, readme = record.RESULTS_MD.read_text(), record.README_MD.read_text()
    for path in paths:
        saved = record.load(path)
        assert record.generated_block(text, saved["machine"]) == record.compact_tables(saved), (
            f"bench/RESULTS.md is out of date for {path.name}: run `python -m bench.record`")
        summary = record.generated_block(readme, f"{saved['machine']} summary")
        assert summary in (None, record.summary_tables(saved)), (
            f"README.md's summary is out of date for {path.name}: run `python -m bench.record`")
