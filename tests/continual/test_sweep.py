"""scripts/sweep.py on a tiny budget: equal trials per method, the choice is the validation best, files written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from l2p_fast.continual.settings import load_settings

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sweep.py"


def _load_sweep():
    spec = importlib.util.spec_from_file_location("sweep_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_sets():
    sweep = _load_sweep()
    assert sweep.parse_sets(["epochs=2", "backbone=some/path", "lr=0.5"]) == {"epochs": 2, "backbone": "some/path",
                                                                            "lr": 0.5}
    with pytest.raises(ValueError, match="--set: expected field=value"):
        sweep.parse_sets(["nofield=1"])


def test_sweep_on_a_tiny_budget(tiny_bert_path, tmp_path, capsys):
    sweep = _load_sweep()
    tiny = ["backbone=" + tiny_bert_path, "train_per_class=4", "test_per_class=2", "max_length=12", "pool_size=6",
            "prompt_length=2", "num_threads=1", "precision=\"fp32\"", "buffer_per_class=2"]
    args = ["--methods", "l2p,seq-frozen", "--output", str(tmp_path / "runs"), "--write", str(tmp_path / "out")]
    for item in tiny:
        args += ["--set", item]
    assert sweep.main(args) == 0
    record = json.loads((tmp_path / "out" / "wordnet20.json").read_text())
    trials = record["trials"]
    for method in ("l2p", "seq-frozen"):
        mine = [t for t in trials if t["method"] == method and t["stage"] != "probe"]
        assert len(mine) == sweep.TRIALS  # the same budget for every method
        best = max(mine, key=lambda t: t["validation_accuracy"])
        assert record["best"][method] == best["settings"]
        probe = [t for t in trials if t["method"] == method and t["stage"] == "probe"]
        assert probe and probe[0]["settings"] == {**best["settings"], "epochs": sweep.PROBE_EPOCHS}
    assert {t["settings"]["pull_lambda"] for t in trials if t["method"] == "l2p"} == {0.1, 1.0}  # the knob
    # every trial ran on the validation split: 3 of each class's 4 training examples train, 1 is evaluated
    results = json.loads(next((tmp_path / "runs" / "seq-frozen").glob("*/results.json")).read_text())
    assert results["config"]["validation_fraction"] == sweep.VALIDATION_FRACTION
    assert results["train_size"] == 60 and results["test_size"] == 20
    demo = load_settings(tmp_path / "out" / "wordnet20_demo.json")
    assert demo["methods"]["l2p"] == {**sweep.FIXED["l2p"], **record["best"]["l2p"]}
    assert demo["config"]["batch_size"] == 8
    assert "| l2p | lr |" in (tmp_path / "out" / "wordnet20.md").read_text()
    assert record["probed"] == ["l2p", "seq-frozen"]
    # a second call reads every finished trial back instead of training again
    capsys.readouterr()
    assert sweep.main([*args, "--probe", "l2p"]) == 0
    again = json.loads((tmp_path / "out" / "wordnet20.json").read_text())
    assert again["best"] == record["best"] and again["probed"] == ["l2p"]
    assert [t["seconds"] for t in again["trials"]] == [t["seconds"] for t in record["trials"] if
                                                       t["stage"] != "probe" or t["method"] == "l2p"]


def test_learning_rate_only_sweep(tiny_bert_path, tmp_path):
    sweep = _load_sweep()
    args = ["--methods", "seq-frozen,l2p", "--no-knob", "--no-probe", "--output", str(tmp_path / "runs"),
            "--write", str(tmp_path / "out"), "--set", "backbone=" + tiny_bert_path, "--set", "train_per_class=4",
            "--set", "test_per_class=2", "--set", "max_length=12", "--set", "num_threads=1"]
    assert sweep.main(args) == 0
    record = json.loads((tmp_path / "out" / "wordnet20.json").read_text())
    assert record["trials_per_method"] == sweep.LR_ONLY_TRIALS and record["probed"] == []
    for method in ("seq-frozen", "l2p"):
        assert [t["stage"] for t in record["trials"] if t["method"] == method] == ["lr"] * sweep.LR_ONLY_TRIALS
    # the knob keeps its first (default) value, so a later full sweep reuses these runs
    assert {t["settings"]["pull_lambda"] for t in record["trials"] if t["method"] == "l2p"} == {0.1}


def test_committed_demo_settings_are_the_sweeps_choice():
    # make demo passes sweeps/wordnet20_demo.json; every setting in it must be the committed sweep's winner
    sweep = _load_sweep()
    root = SCRIPT.parents[1]
    record = json.loads((root / "sweeps" / "wordnet20.json").read_text())
    demo = load_settings(root / "sweeps" / "wordnet20_demo.json")
    assert "--config sweeps/wordnet20_demo.json" in (root / "Makefile").read_text()
    assert list(demo["methods"]) == list(record["best"])
    for method, chosen in record["best"].items():
        trials = [t for t in record["trials"] if t["method"] == method and t["stage"] != "probe"]
        assert len(trials) == record["trials_per_method"]
        best = max(trials, key=lambda t: t["validation_accuracy"])  # the first of equal scores, as the script
        assert chosen == best["settings"], method
        assert demo["methods"][method] == {**sweep.FIXED.get(method, {}), **chosen}
    assert record["validation_fraction"] == sweep.VALIDATION_FRACTION
