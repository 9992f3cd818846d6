"""compare(): one folder per method, the table, the plots; the feature cache; report helpers."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from l2p_fast.continual.batching import build_pool
from l2p_fast.continual.compare import compare, parse_methods
from l2p_fast.continual.features import cached_features, compute_features
from l2p_fast.continual.report import comparison_table, write_run_plots

pytest.importorskip("matplotlib", reason="needs matplotlib (plots)")


def test_parse_methods():
    assert parse_methods("l2p, seq,ewc") == ["l2p", "seq", "ewc"]
    assert parse_methods(["er"]) == ["er"]
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        parse_methods("l2p,foo")
    with pytest.raises(ValueError, match="twice"):
        parse_methods("seq,seq")
    with pytest.raises(ValueError, match="expected a comma-separated list"):
        parse_methods(" , ")


def test_compare_writes_runs_table_and_plots(tiny_backbone, tmp_path, capsys, tiny_config):
    cfg = tiny_config("l2p", tiny_backbone.name)
    results = compare("l2p,seq-frozen,joint", cfg, tmp_path, backbone=tiny_backbone)
    assert [r["method"] for r in results] == ["l2p", "seq-frozen", "joint"]
    for folder in ("l2p", "seq-frozen", "joint"):
        saved = json.loads((tmp_path / folder / "results.json").read_text())
        assert saved["method"] == folder
    for png in ("l2p/accuracy_matrix.png", "l2p/task_accuracy.png", "l2p/prompt_usage.png",
                "seq-frozen/accuracy_matrix.png", "average_accuracy.png"):
        assert (tmp_path / png).stat().st_size > 2000, png
    assert not (tmp_path / "joint" / "accuracy_matrix.png").exists()  # joint has one row: table only
    table = (tmp_path / "comparison.md").read_text()
    assert "| l2p |" in table and "| joint |" in table and "–" in table
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 2  # train + test, shared by l2p and seq-frozen
    assert "seq-frozen: average accuracy" in capsys.readouterr().out
    # resume reads the finished runs back instead of training again
    again = compare("l2p,seq-frozen,joint", cfg, tmp_path, backbone=tiny_backbone, resume=True)
    assert [r["accuracy_matrix"] for r in again] == [r["accuracy_matrix"] for r in results]


def test_feature_cache_is_reused_and_bad_files_recomputed(tiny_backbone, tmp_path):
    from l2p_fast.continual.benchmarks import wordnet20

    pool = build_pool(wordnet20(train_per_class=2, test_per_class=1), "test", tiny_backbone.tokenizer, 10)
    fresh = compute_features(tiny_backbone, pool, batch_size=7)
    assert fresh.shape == (20, 32)
    cached = cached_features(tiny_backbone, pool, tmp_path, "fp", batch_size=3)
    assert torch.allclose(cached, fresh, atol=1e-5)
    (file,) = tmp_path.glob("features-*.pt")
    torch.save(torch.zeros(3, 3), file)
    assert torch.allclose(cached_features(tiny_backbone, pool, tmp_path, "fp", batch_size=3), fresh, atol=1e-5)
    file.write_bytes(b"garbage")
    assert torch.allclose(cached_features(tiny_backbone, pool, tmp_path, "fp", batch_size=3), fresh, atol=1e-5)
    # one flipped bit in the stored features: torch.load would return changed features; the digest catches it
    stored = torch.load(file, weights_only=True)["features"]
    data = bytearray(file.read_bytes())
    data[bytes(data).index(stored[0, :2].numpy().tobytes()) + 3] ^= 0x20  # an exponent bit of features[0, 0]
    file.write_bytes(bytes(data))
    assert not torch.equal(torch.load(file, weights_only=True)["features"], stored)
    assert torch.equal(cached_features(tiny_backbone, pool, tmp_path, "fp", batch_size=3), stored)  # recomputed
    nan = fresh.clone()
    nan[1, 1] = float("nan")
    torch.save({"features": nan, "sha256": hashlib.sha256(nan.view(torch.uint8).numpy().tobytes()).hexdigest()}, file)
    assert torch.equal(cached_features(tiny_backbone, pool, tmp_path, "fp", batch_size=3), stored)


def test_query_cache_equals_l2p_query(tiny_backbone):
    from l2p_fast.continual.benchmarks import wordnet20
    from l2p_fast.models import L2PTextEncoder

    pool = build_pool(wordnet20(train_per_class=2, test_per_class=1), "test", tiny_backbone.tokenizer, 10)
    model = L2PTextEncoder(tiny_backbone.copy(), tokenizer=tiny_backbone.tokenizer, num_classes=20, pool_size=4,
                           top_k=2)
    batch = pool.collate(torch.arange(6))
    assert torch.allclose(model.query(**batch), compute_features(tiny_backbone, pool, 64)[:6], atol=1e-5)


def test_table_and_run_plots(tmp_path):
    results = {
        "method": "l2p", "benchmark": "b", "average_accuracy": 50.0, "forgetting": 12.5, "seconds": 3.0,
        "accuracy_matrix": [[90.0], [40.0, 60.0]], "trainable_parameters": 1234, "train_examples_per_second": 10.0,
        "prompt_counts_test": [[3, 0, 1], [0, 4, 0]],
    }
    table = comparison_table([results, {**results, "method": "joint", "forgetting": None}])
    # seeds, average accuracy, forgetting, learning accuracy (mean of the diagonal 90, 60), params, ex/s, seconds
    assert "| l2p | 1 | 50.00 | 12.50 | 75.00 | 1,234 | 10.0 | 3 |" in table and "| joint | 1 | 50.00 | – | – |" in table
    written = write_run_plots(results, tmp_path)
    assert sorted(p.name for p in written) == ["accuracy_matrix.png", "prompt_usage.png", "task_accuracy.png"]
