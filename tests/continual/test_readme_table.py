"""The README's results block is generated from a comparison.json (l2p-fast report), never typed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from l2p_fast.continual.readme_table import BEGIN, END, current_block, load_comparison, replace_block, results_block

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = ROOT / "docs" / "results" / "demo_comparison.json"


def _run(method, seed, average, forgetting, diagonal):
    matrix = [[diagonal], [average - 1.0, average + 1.0]] if forgetting is not None else [[average, average]]
    result = {"method": method, "benchmark": "wordnet20", "num_tasks": 2, "average_accuracy": average,
              "forgetting": forgetting, "accuracy_matrix": matrix, "seconds": 10.0, "trainable_parameters": 5,
              "train_examples_per_second": 50.0, "precision": "bf16", "device": "cpu",
              "config": {"seed": seed, "train_per_class": 40, "test_per_class": 30, "epochs": 1}}
    if method == "l2p":
        result["config"].update(top_k=2, pool_size=10)
        result["selection_diagnostics"] = {"selection_accuracy_per_task": [60.0, 40.0], "selection_accuracy": 50.0,
                                           "usage_entropy": 0.5, "usage_overlap_mean": 0.3,
                                           "key_query_similarity_per_epoch": [[0.2], [0.4]]}
    return result


COMPARISON = {
    "methods": ["l2p", "er", "joint"], "seeds": [0, 1], "class_order": "fixed across seeds (the benchmark's order)",
    "evaluated_on": "test set", "settings_file": "sweeps/wordnet20_demo.json",
    "results": [_run("l2p", 0, 50.0, 20.0, 70.0), _run("er", 0, 56.0, 30.0, 80.0), _run("joint", 0, 70.0, None, 0),
                _run("l2p", 1, 52.0, 22.0, 72.0), _run("er", 1, 58.0, 32.0, 82.0), _run("joint", 1, 72.0, None, 0)],
}


def test_block_says_what_was_run_and_where_l2p_stands():
    block = results_block(COMPARISON)
    assert block.startswith(BEGIN) and block.endswith(END)
    assert "seeds 0, 1, class order fixed across seeds" in block and "evaluated on the test set" in block
    assert "`sweeps/wordnet20_demo.json`" in block
    # learning accuracy: the diagonals (70, 51) and (72, 53)
    assert "| l2p | 2 | 51.00 ± 1.41 | 21.00 ± 1.41 | 61.50 ± 1.41 |" in block
    # L2P does not win here, and the block says so, with the noise it can compare against
    assert "er 57.0, l2p 51.0" in block and "L2P ranks 2 of 2, 6.0 points below er" in block
    assert "larger than the two methods' standard deviations added (2.8)" in block
    assert "| l2p | 50.0 ± 0.0 | 20 | 60 / 40 | 0.50 ± 0.00 | 0.30 ± 0.00 | 0.20 → 0.40 |" in block  # chance K/M


def test_replace_block_and_marker_errors():
    text = f"intro\n{BEGIN}\nold\n{END}\nrest\n"
    assert replace_block(text, "NEW") == "intro\nNEW\nrest\n"
    assert current_block(text) == f"{BEGIN}\nold\n{END}"
    with pytest.raises(ValueError, match="must hold the markers"):
        replace_block("no markers", "x")
    with pytest.raises(ValueError, match="must hold the markers"):
        replace_block(text + BEGIN, "x")


def test_report_command_writes_and_checks_a_readme(tmp_path, capsys):
    from l2p_fast.cli import main

    comparison = tmp_path / "comparison.json"
    comparison.write_text(json.dumps(COMPARISON))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{BEGIN}\nstale\n{END}\n\nafter\n")
    with pytest.raises(SystemExit) as stale:
        main(["report", str(comparison), "--readme", str(readme), "--check"])
    assert stale.value.code == 2 and "differs" in capsys.readouterr().err
    assert main(["report", str(comparison), "--readme", str(readme)]) == 0
    assert readme.read_text() == f"# title\n\n{results_block(COMPARISON)}\n\nafter\n"
    assert main(["report", str(comparison), "--readme", str(readme), "--check"]) == 0
    assert main(["report", str(comparison)]) == 0
    assert results_block(COMPARISON) in capsys.readouterr().out
    comparison.write_text("{}")
    with pytest.raises(SystemExit):
        main(["report", str(comparison)])
    assert "is not a comparison.json" in capsys.readouterr().err


def test_readme_results_block_is_generated_from_the_committed_snapshot():
    readme = (ROOT / "README.md").read_text()
    assert current_block(readme) == results_block(load_comparison(SNAPSHOT)), (
        "README.md's results block differs from docs/results/demo_comparison.json; regenerate it with: "
        "l2p-fast report docs/results/demo_comparison.json --readme README.md")


def test_diagnostics_table_of_coda_prompt_shows_its_component_mass_and_chance():
    from l2p_fast.continual.diagnostics import selection_diagnostics
    from l2p_fast.continual.report import diagnostics_table

    coda = {"method": "coda-prompt", "forgetting": 1.0, "accuracy_matrix": [[50.0], [40.0, 60.0]],
            "component_mass_test": [[3.0, 1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0, 0.0]], "config": {"seed": 0}}
    coda["selection_diagnostics"] = selection_diagnostics(coda)
    table = diagnostics_table([coda])
    # task 0 owns components 0-1 (4 of 5), task 1 owns 2-3 (2 of 3); chance: 2 of 5 components per task
    assert "| coda-prompt | 73.3 | 40 | 80 / 67 | – | – | – |" in table
