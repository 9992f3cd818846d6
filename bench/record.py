"""The benchmark record: one machine-readable file per machine, and the tables made from it.

A full run (``pytest bench/ --benchmark-only``) collects rows in ``ROWS`` (one list per suite: ``pool``, ``models``)
and, at the end, ``write_suite`` stores them in ``bench/results/<machine>.json``; a suite that did not run keeps its
earlier rows there. ``compact_tables`` turns that file into the markdown tables of ``bench/RESULTS.md`` and
``update_markdown`` replaces the machine's block there, so the tables are never copied by hand:
``python -m bench.record`` regenerates every block from the files.

Pool rows (``bench/test_bench_pool.py``): ``{shape, provider, mode, ms (median round), min_ms (best round), rounds,
bytes}`` per timed benchmark; ``mode`` ``peak_<mode>`` with ``bytes``; ``paired_<mode>`` / ``interleaved_<mode>``
with ``ratio`` (eager / provider), and for paired rows ``over_floor`` / ``over_compile``. Model rows
(``bench/test_bench_models.py``): ``{model, variant, batch, ms, eps, ratio?, note?}``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
RESULTS_MD = Path(__file__).parent / "RESULTS.md"
README_MD = Path(__file__).parent.parent / "README.md"
ROWS: dict[str, list[dict]] = {"pool": [], "models": []}

MODES = {"forward": "Forward (no grad)", "forward_backward": "L2P step: forward + backward, x_embed frozen",
         "forward_backward_x": "Forward + backward, x_embed trainable"}  # fmt: skip
FLOORS = {"forward": "floor", "forward_backward": "floor-step"}  # the floor each mode's "× floor" divides by
FLOOR_LABELS = {"floor": "floor (alloc + write once)", "floor-step": "floor-step"}


def machine_name(device_type: str, device_name: str) -> str:
    """The record's name for a machine: the device type and its model, e.g. ``cpu-amd-epyc``."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"
    return f"{device_type}-{slug}"


def record_path(machine: str, folder: Path = RESULTS_DIR) -> Path:
    """Where the record of ``machine`` lives."""
    return folder / f"{machine}.json"


def write_suite(machine: str, suite: str, meta: dict, rows: list[dict], folder: Path = RESULTS_DIR) -> Path:
    """Store one suite's ``meta`` (date, device, threads, …) and ``rows`` in the machine's record, keeping the
    other suites' earlier results. Returns the file's path."""
    if not rows:
        raise ValueError(f"rows: expected the rows of a benchmark run, got none for suite {suite!r}")
    path = record_path(machine, folder)
    record = load(path) if path.exists() else {"machine": machine, "suites": {}}
    record["suites"][suite] = {"meta": meta, "rows": rows}
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def load(path: Path) -> dict:
    """A machine's record as ``write_suite`` wrote it."""
    record = json.loads(Path(path).read_text())
    if not isinstance(record, dict) or "suites" not in record or "machine" not in record:
        kind = type(record).__name__
        raise ValueError(f"{path}: expected a benchmark record with 'machine' and 'suites', got a {kind}")
    return record


def save_run(machine: str, metas: dict[str, dict], rows: dict[str, list[dict]] | None = None,
             folder: Path = RESULTS_DIR, markdown: Path = RESULTS_MD, readme: Path | None = README_MD) -> dict:
    """The end of a full run: every suite with rows (``ROWS`` by default) goes into the machine's record with its
    meta, the machine's block in ``markdown`` is regenerated, and so is its summary block in ``readme`` where it has
    one. Returns the saved record."""
    rows = ROWS if rows is None else rows
    ran = [suite for suite, suite_rows in rows.items() if suite_rows]
    if not ran:
        raise ValueError("rows: expected the rows of at least one suite, got none")
    for suite in ran:
        path = write_suite(machine, suite, metas[suite], rows[suite], folder)
    saved = load(path)
    update_markdown(saved, markdown)
    if readme is not None:
        update_readme_summary(saved, readme)
    return saved


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}" if numerator and denominator else ""


def _row_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def pool_tables(rows: list[dict]) -> str:
    """One markdown table per mode: per shape, the mode's floor, eager, compile and each fused provider with its best
    round (ms), speed-up over eager and over torch.compile (best round / best round, each in its own benchmark, and
    median over turns of the paired blocks, same machine state), time over the mode's floor and peak MB."""
    timed = {(r["shape"], r["provider"], r["mode"]): r for r in rows if "min_ms" in r}
    extra = {(r["shape"], r["provider"], r["mode"]): r for r in rows if "min_ms" not in r}
    shapes = list(dict.fromkeys(r["shape"] for r in rows if "min_ms" in r))
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows if "min_ms" in r)
                 if p not in ("floor", "floor-reused", "floor-step", "eager scatter")]  # fmt: skip
    sections = []
    header = ["shape", "provider", "ms", "× eager", "× eager, paired", "× compile", "× compile, paired", "× floor",
              "peak MB"]  # fmt: skip
    for mode, title in MODES.items():
        lines = [f"**{title}**", "", _row_line(header), "| --- | --- |" + " ---: |" * (len(header) - 2)]
        floor_name = FLOORS.get(mode)
        for shape in shapes:
            eager, compiled = timed.get((shape, "eager", mode)), timed.get((shape, "compile", mode))
            floor = timed.get((shape, floor_name, mode)) if floor_name else None
            if floor:
                lines.append(_row_line([shape, FLOOR_LABELS[floor_name], f"{floor['min_ms']:.3f}", "", "", "", "",
                                        "1.00", ""]))  # fmt: skip
            for provider in providers:
                row = timed.get((shape, provider, mode))
                if row is None:
                    continue
                paired = extra.get((shape, provider, f"paired_{mode}"), {})
                peak = extra.get((shape, provider, f"peak_{mode}"), {}).get("bytes")
                lines.append(_row_line([
                    shape, provider, f"{row['min_ms']:.3f}",
                    _ratio(eager and eager["min_ms"], row["min_ms"]),
                    f"{paired['ratio']:.2f}" if "ratio" in paired else "",
                    _ratio(compiled and compiled["min_ms"], row["min_ms"]),
                    f"{paired['over_compile']:.2f}" if "over_compile" in paired else "",
                    _ratio(row["min_ms"], floor and floor["min_ms"]),
                    f"{peak / 1e6:.1f}" if peak else "",
                ]))  # fmt: skip
        if len(lines) > 4:
            sections.append("\n".join(lines))
    return "\n\n".join(sections)


def model_table(rows: list[dict]) -> str:
    """One markdown table: per model and variant of ours, the upstream-style and our step's median ms, our examples
    per second and the speed-up (median of per-round ratios where the steps alternated, else ms / ms)."""
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["variant"]] = row
    lines = ["| model | batch | upstream-style ms | ours ms | ours ex/s | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for model, variants in by_model.items():
        up = variants.get("upstream")
        for variant, row in variants.items():
            if variant == "upstream":
                continue
            label = model if variant == "ours" else f"{model} ({variant})"
            if up is None:  # no port's-way row (e.g. the input pipeline): ours alone
                lines.append(_row_line([label, str(row["batch"]), "", f"{row['ms']:.2f}", f"{row['eps']:.1f}", ""]))
                continue
            speedup = row.get("ratio") or up["ms"] / row["ms"]
            lines.append(_row_line([label, str(row["batch"]), f"{up['ms']:.2f}", f"{row['ms']:.2f}",
                                    f"{row['eps']:.1f}", f"{speedup:.2f}"]))  # fmt: skip
    return "\n".join(lines)


def _meta_line(meta: dict) -> str:
    keys = ("date", "device", "threads", "torch")
    return "; ".join(f"{key} {meta[key]}" for key in keys if key in meta)


def compact_tables(record: dict) -> str:
    """The markdown of one machine's record: per suite a line naming the run (date, device, threads, torch) and
    its tables."""
    parts = []
    suites = record["suites"]
    if "pool" in suites:
        pool = suites["pool"]
        parts.append(f"Prompt pool ({_meta_line(pool['meta'])}):\n\n{pool_tables(pool['rows'])}")
    if "models" in suites:
        models = suites["models"]
        parts.append(f"Training step of the prompted models ({_meta_line(models['meta'])}):\n\n"
                     f"{model_table(models['rows'])}")  # fmt: skip
    return "\n\n".join(parts)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated: {name} (python -m bench.record) -->", f"<!-- end generated: {name} -->"


def replace_block(text: str, name: str, content: str) -> str | None:
    """``text`` with the generated block ``name`` holding ``content``; None when ``text`` has no such block."""
    begin, end = _markers(name)
    if begin not in text or end not in text:
        return None
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{content}\n{end}{rest.split(end, 1)[1]}"


def update_markdown(record: dict, path: Path = RESULTS_MD) -> None:
    """Replace the machine's generated block in ``path`` with ``compact_tables(record)`` (appended, with a heading,
    when the file has no block for it yet)."""
    machine, content = record["machine"], compact_tables(record)
    text = path.read_text() if path.exists() else ""
    replaced = replace_block(text, machine, content)
    if replaced is None:
        begin, end = _markers(machine)
        replaced = text.rstrip("\n") + f"\n\n## {machine}\n\n{begin}\n{content}\n{end}\n"
    path.write_text(replaced)


def update_readme_summary(record: dict, path: Path = README_MD) -> bool:
    """Replace the README's summary block of this machine (``<machine> summary``) with ``summary_tables(record)``;
    a machine without a block there is left out (returns False)."""
    text = path.read_text() if path.exists() else ""
    replaced = replace_block(text, f"{record['machine']} summary", summary_tables(record))
    if replaced is None:
        return False
    path.write_text(replaced)
    return True


def generated_block(text: str, name: str) -> str | None:
    """The content of the generated block ``name`` (a machine, or ``<machine> summary``) in a markdown text, None
    when it has none."""
    begin, end = _markers(name)
    if begin not in text or end not in text:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


SUMMARY_SHAPES = ("B16-N196-D768-M10-K5-Lp5-cls", "B64-N196-D768-M10-K5-Lp5-cls", "B128-N196-D768-M10-K5-Lp5-cls")


def summary_tables(record: dict, shapes: tuple[str, ...] = SUMMARY_SHAPES) -> str:
    """The README's short version of a record: for the L2P shapes, the forward and the L2P step of eager, compile and
    each fused provider (best rounds, paired speed-ups, peak memory), then the models' table when there is one."""
    parts = []
    pool = record["suites"].get("pool")
    if pool:
        timed = {(r["shape"], r["provider"], r["mode"]): r for r in pool["rows"]}
        fused = [p for p in dict.fromkeys(r["provider"] for r in pool["rows"] if "min_ms" in r)
                 if p not in ("eager", "compile", "cpu-nocache", "floor", "floor-reused", "floor-step",
                              "eager scatter")]  # fmt: skip
        lines = [f"Prompt pool ({_meta_line(pool['meta'])}):", "",
                 "| shape | mode | provider | eager ms | compile ms | ms | × eager | × eager, paired "
                 "| × compile, paired | peak MB: ours (eager) |",
                 "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        labels = {"forward": "forward", "forward_backward": "L2P step"}
        for shape in shapes:
            for mode, label in labels.items():
                eager, compiled = timed.get((shape, "eager", mode)), timed.get((shape, "compile", mode))
                for provider in fused:
                    row = timed.get((shape, provider, mode))
                    if row is None or eager is None:
                        continue
                    paired = timed.get((shape, provider, f"paired_{mode}"), {})
                    peak = timed.get((shape, provider, f"peak_{mode}"), {}).get("bytes")
                    peak_eager = timed.get((shape, "eager", f"peak_{mode}"), {}).get("bytes")
                    lines.append(_row_line([
                        shape, label, provider, f"{eager['min_ms']:.3f}",
                        f"{compiled['min_ms']:.3f}" if compiled else "", f"{row['min_ms']:.3f}",
                        _ratio(eager["min_ms"], row["min_ms"]),
                        f"{paired['ratio']:.2f}" if "ratio" in paired else "",
                        f"{paired['over_compile']:.2f}" if "over_compile" in paired else "",
                        f"{peak / 1e6:.1f} ({peak_eager / 1e6:.1f})" if peak and peak_eager else "",
                    ]))  # fmt: skip
        parts.append("\n".join(lines))
    models = record["suites"].get("models")
    if models:
        parts.append(f"Training step of the prompted models ({_meta_line(models['meta'])}):\n\n"
                     f"{model_table(models['rows'])}")  # fmt: skip
    return "\n\n".join(parts)


# --- lines printed under the pool's table at the end of a full run (the details stay in the record) ---


def floor_lines(rows: list[dict]) -> str:
    """Per mode with a floor in the paired blocks, one line per shape: eager / floor (median over turns), for the L2P
    step the turns in which the floor is less than 4x faster than eager, and each other provider / floor in the same
    turns."""
    titles = {"forward": "Forward against its floor (alloc + write once), paired blocks (median over turns):",
              "forward_backward": "L2P step (x frozen) against its floor, paired blocks (median over turns):"}
    sections = []
    for mode, floor in FLOORS.items():
        lines = []
        for row in rows:
            if row["provider"] != floor or row["mode"] != f"paired_{mode}":
                continue
            below_text = ""
            if mode == "forward_backward":  # the step's target: 4x eager
                below = sum(ratio < 4 for ratio in row["turn_ratios"])
                below_text = f" (below 4 in {below} of {len(row['turn_ratios'])} turns)"
            others = [r for r in rows if r["shape"] == row["shape"] and r["mode"] == row["mode"] and "over_floor" in r]
            over = ", ".join(f"{r['provider']} / floor {r['over_floor']:.2f}" for r in others)
            lines.append(f"- {row['shape']}: eager / floor {row['ratio']:.2f}{below_text}; {over}")
        if lines:
            sections.append("\n\n" + titles[mode] + "\n" + "\n".join(lines))
    return "".join(sections)


def compile_lines(rows: list[dict]) -> str:
    """One line per shape and mode: each fused provider's speed-up over torch.compile in the paired blocks (median
    over turns of compile's best round / the provider's, both right after an eager block in the same turn)."""
    lines = [f"- {r['shape']} {r['mode'].removeprefix('paired_')}: {r['provider']} {r['over_compile']:.2f}×"
             for r in rows if "over_compile" in r]  # fmt: skip
    if not lines:
        return ""
    title = "Speed-up over torch.compile, paired blocks (median over turns of compile / provider):"
    return "\n\n" + title + "\n" + "\n".join(lines)


def scatter_lines(rows: list[dict]) -> str:
    """One line per shape: best and median round of the eager backward's index_put scatter alone."""
    lines = [f"- {r['shape']}: min {r['min_ms']:.3f} ms, median {r['ms']:.3f} ms "
             f"(median / min {r['ms'] / r['min_ms']:.2f})" for r in rows if r["mode"] == "scatter"]  # fmt: skip
    if not lines:
        return ""
    return "\n\neager prompt-gradient scatter alone (index_put, accumulate=True):\n" + "\n".join(lines)


def main(argv: list[str]) -> int:
    """``python -m bench.record [RECORD.json ...]``: regenerate the blocks of bench/RESULTS.md and the README's summary
    blocks from the records (every file in bench/results/ by default)."""
    paths = [Path(arg) for arg in argv] or sorted(RESULTS_DIR.glob("*.json"))
    for path in paths:
        saved = load(path)
        update_markdown(saved)
        print(f"{RESULTS_MD}: tables of {path.name} regenerated")
        if update_readme_summary(saved):
            print(f"{README_MD}: summary of {path.name} regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
