"""The several-seeds figures: the average-accuracy spread and the selection diagnostics."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib", reason="needs matplotlib (plots)")

from l2p_fast.continual.plots import plot_accuracy_spread, plot_selection  # noqa: E402

A = [[80.0], [50.0, 70.0]]
B = [[70.0], [40.0, 75.0]]


def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    return data


def test_accuracy_spread_draws_a_band_for_several_seeds(tmp_path):
    one = _png(plot_accuracy_spread({"l2p": [A]}, tmp_path / "one.png", title="t"))
    two = _png(plot_accuracy_spread({"l2p": [A, B]}, tmp_path / "two.png", title="t"))
    assert one != two
    _png(plot_accuracy_spread({"l2p": [A, B], "er": [B, A]}, tmp_path / "ref.png", reference={"joint": 80.0}))
    with pytest.raises(ValueError, match="empty mapping"):
        plot_accuracy_spread({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"runs\['l2p'\] is empty"):
        plot_accuracy_spread({"l2p": []}, tmp_path / "x.png")


def test_selection_plot_with_and_without_a_task_mask(tmp_path):
    masked = {"selection_accuracy_per_task": [60.0, None], "key_query_similarity_per_epoch": [[0.1, 0.2], [0.3]]}
    unmasked = {"usage_entropy_per_task": [0.5, 0.7]}
    coda = {"component_mass_share_per_task": [30.0, 25.0]}
    without = _png(plot_selection({"l2p": [masked, {**masked, "selection_accuracy_per_task": [40.0, None]}],
                                   "dualprompt": [unmasked]}, tmp_path / "sel.png"))
    with_coda = _png(plot_selection({"l2p": [masked], "dualprompt": [unmasked], "coda-prompt": [coda]},
                                    tmp_path / "coda.png"))
    assert with_coda != without
    with pytest.raises(ValueError, match="empty mapping"):
        plot_selection({}, tmp_path / "x.png")
