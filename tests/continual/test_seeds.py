"""compare --seeds: per-seed runs, mean ± std in the table and comparison.json, spread plots, resume per seed;
settings files (--config)."""

from __future__ import annotations

import json

import pytest

from l2p_fast.continual.compare import compare
from l2p_fast.continual.report import comparison_table, diagnostics_table
from l2p_fast.continual.seeds import mean_std, parse_seeds, summarize_seeds
from l2p_fast.continual.settings import load_settings

pytest.importorskip("matplotlib", reason="needs matplotlib (plots)")


def test_parse_seeds():
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    assert parse_seeds([3]) == [3]
    for bad, match in (("0,x", "'x'"), ("-1", "'-1'"), ("1,1", "twice"), (" , ", "comma-separated")):
        with pytest.raises(ValueError, match=match):
            parse_seeds(bad)


def test_mean_std_is_the_sample_deviation():
    out = mean_std([50.0, 52.0, 57.0])
    assert out["mean"] == pytest.approx(53.0) and out["std"] == pytest.approx(3.605551, abs=1e-5)
    assert mean_std([4.0])["std"] is None and mean_std([None, None]) is None
    assert mean_std([1.0, None, 3.0])["values"] == [1.0, 3.0]


def _fake(method, seed, average, forgetting=10.0, matrix=None):
    return {"method": method, "average_accuracy": average, "forgetting": forgetting,
            "accuracy_matrix": matrix or [[average]], "config": {"seed": seed}, "seconds": 1.0,
            "trainable_parameters": 7, "train_examples_per_second": 10.0}


def test_table_shows_mean_and_std_per_method():
    results = [_fake("l2p", 0, 50.0, matrix=[[80.0], [40.0, 60.0]]), _fake("l2p", 1, 54.0, matrix=[[70.0], [48.0, 60.0]]),
               _fake("er", 0, 60.0)]
    summary = summarize_seeds(results)
    assert [row["method"] for row in summary] == ["l2p", "er"] and summary[0]["seeds"] == [0, 1]
    assert summary[0]["learning_accuracy"]["mean"] == pytest.approx(67.5)  # derived from the matrices' diagonals
    table = comparison_table(results)
    assert "| l2p | 2 | 52.00 ± 2.83 | 10.00 ± 0.00 | 67.50 ± 3.54 |" in table
    assert "| er | 1 | 60.00 | 10.00 |" in table
    assert diagnostics_table(results) == ""  # no prompt method with diagnostics


def test_compare_over_seeds_writes_per_seed_runs_summary_plots_and_resumes(tiny_backbone, tiny_config, tmp_path,
                                                                          capsys):
    cfg = tiny_config("l2p", tiny_backbone.name, use_prompt_mask=True, epochs=1)
    results = compare("l2p,seq-frozen", cfg, tmp_path, seeds="0,1", backbone=tiny_backbone,
                      method_settings={"seq-frozen": {"lr": 0.02}})
    assert [(r["method"], r["config"]["seed"]) for r in results] == [("l2p", 0), ("seq-frozen", 0), ("l2p", 1),
                                                                       ("seq-frozen", 1)]
    assert all(r["config"]["lr"] == 0.02 for r in results if r["method"] == "seq-frozen")
    for seed in (0, 1):
        for folder in ("l2p", "seq-frozen"):
            assert json.loads((tmp_path / f"seed{seed}" / folder / "results.json").read_text())["config"]["seed"] == seed
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["seeds"] == [0, 1] and len(saved["results"]) == 4
    assert saved["class_order"].startswith("fixed across seeds") and saved["evaluated_on"] == "test set"
    l2p = next(row for row in saved["summary"] if row["method"] == "l2p")
    assert l2p["average_accuracy"]["values"] == [r["average_accuracy"] for r in results if r["method"] == "l2p"]
    assert l2p["selection_accuracy"]["n"] == 2
    table = (tmp_path / "comparison.md").read_text()
    assert "| l2p | 2 |" in table and " ± " in table and "| seq-frozen | 2 |" in table
    assert "selection accuracy (%)" in table  # the diagnostics table follows
    for png in ("average_accuracy.png", "selection.png", "seed1/l2p/prompt_usage.png"):
        assert (tmp_path / png).stat().st_size > 2000, png
    assert "l2p (seed 1): average accuracy" in capsys.readouterr().out
    # --resume per seed: a deleted seed-1 run is trained again, every other run read back
    (tmp_path / "seed1" / "seq-frozen" / "results.json").unlink()
    again = compare("l2p,seq-frozen", cfg, tmp_path, seeds="0,1", backbone=tiny_backbone, resume=True,
                    method_settings={"seq-frozen": {"lr": 0.02}})
    assert [r["accuracy_matrix"] for r in again] == [r["accuracy_matrix"] for r in results]
    out = capsys.readouterr().out
    assert "seq-frozen (seed 1): average accuracy" in out and "l2p (seed 0): average accuracy" not in out


def test_compare_refuses_settings_of_methods_not_compared(tiny_backbone, tiny_config, tmp_path):
    with pytest.raises(ValueError, match=r"method_settings: names methods \['er'\]"):
        compare("l2p", tiny_config("l2p", tiny_backbone.name), tmp_path, method_settings={"er": {"lr": 1.0}},
                backbone=tiny_backbone)


def test_settings_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"config": {"epochs": 2}, "methods": {"l2p": {"lr": 0.1}, "er": {}}, "notes": []}))
    settings = load_settings(path)
    assert list(settings["methods"]) == ["l2p", "er"] and settings["config"] == {"epochs": 2}
    for bad, match in (({"config": {"epoch": 2}}, "unknown fields \\['epoch'\\]"),
                       ({"methods": {"l2q": {}}}, "unknown method 'l2q'"),
                       ({"method": {}}, "unknown keys \\['method'\\]"),
                       ({"methods": {"l2p": {"method": "er"}}}, "unknown fields \\['method'\\]")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_settings(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="cannot read it as JSON"):
        load_settings(path)


def test_cli_config_file_and_seeds(tiny_bert_path, tmp_path, capsys):
    from l2p_fast.cli import main

    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({
        "config": {"backbone": tiny_bert_path, "train_per_class": 4, "test_per_class": 2, "epochs": 1,
                   "batch_size": 4, "max_length": 12, "pool_size": 6, "top_k": 2, "prompt_length": 2,
                   "checkpoint_every": 0, "num_threads": 1, "precision": "fp32"},
        "methods": {"seq-frozen": {"lr": 0.02, "epochs": 2}}}))
    # --epochs on the command line wins over the file's per-method epochs; the methods come from the file
    assert main(["compare", "--config", str(settings), "--seeds", "0,1", "--epochs", "1", "--no-progress",
                 "--output", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert saved["methods"] == ["seq-frozen"] and saved["settings_file"] == str(settings)
    assert [(r["config"]["lr"], r["config"]["epochs"]) for r in saved["results"]] == [(0.02, 1), (0.02, 1)]
    assert "| seq-frozen | 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--seeds", "0", "--seed", "1", "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "give --seed or --seeds, not both" in capsys.readouterr().err


def test_cli_train_reads_the_method_settings_of_a_config_file(tiny_bert_path, tmp_path):
    from l2p_fast.cli import main

    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({
        "config": {"backbone": tiny_bert_path, "train_per_class": 4, "test_per_class": 2, "epochs": 1,
                   "max_length": 12, "checkpoint_every": 0, "num_threads": 1, "precision": "fp32"},
        "methods": {"seq-frozen": {"lr": 0.02}, "l2p": {"lr": 0.5}}}))
    assert main(["train", "--method", "seq-frozen", "--config", str(settings), "--batch-size", "4", "--no-progress",
                 "--output", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "results.json").read_text())["config"]
    assert (config["lr"], config["batch_size"], config["epochs"]) == (0.02, 4, 1)  # file, flag, file


def test_resume_reads_back_finished_runs_of_precision_auto(tiny_backbone, tiny_config, tmp_path, capsys):
    # a finished run records 'auto' resolved (bf16 or fp32 by the machine); --resume must still recognise it
    cfg = tiny_config("seq-frozen", tiny_backbone.name, precision="auto", epochs=1)
    first = compare("seq-frozen", cfg, tmp_path, seeds="0", backbone=tiny_backbone, plots=False)
    assert first[0]["config"]["precision"] in ("bf16", "fp32")
    capsys.readouterr()
    again = compare("seq-frozen", cfg, tmp_path, seeds="0", backbone=tiny_backbone, plots=False, resume=True)
    assert again == first and "average accuracy" not in capsys.readouterr().out  # read back, not run again
