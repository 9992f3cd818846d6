"""Pools, batch orders and seeds of the trainer's data pipeline."""

from __future__ import annotations

import pytest
import torch

from l2p_fast.continual.batching import build_pool, derive_seed, eval_batches, generator, train_batches
from l2p_fast.continual.benchmarks import wordnet20


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "epoch", 1, 2) == derive_seed(0, "epoch", 1, 2)
    assert derive_seed(0, "epoch", 1, 2) != derive_seed(0, "epoch", 2, 1)
    assert 0 <= derive_seed("x") < 2**63


@pytest.mark.parametrize("lengths", [None, torch.tensor([5, 1, 9, 3, 3, 7, 2, 8, 6, 4, 1, 2, 9])])
def test_train_batches_cover_every_index_once_in_a_seeded_order(lengths):
    indices = torch.arange(3, 16)
    a = train_batches(indices, 4, generator(1, "e"), None if lengths is None else torch.cat([torch.zeros(3), lengths]))
    b = train_batches(indices, 4, generator(1, "e"), None if lengths is None else torch.cat([torch.zeros(3), lengths]))
    c = train_batches(indices, 4, generator(2, "e"), None if lengths is None else torch.cat([torch.zeros(3), lengths]))
    assert sorted(torch.cat(a).tolist()) == list(range(3, 16))
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert [x.tolist() for x in a] != [x.tolist() for x in c]
    assert all(1 <= len(x) <= 4 for x in a)


def test_eval_batches_sorted_by_length():
    lengths = torch.tensor([4, 1, 3, 2, 5])
    batches = eval_batches(torch.tensor([0, 2, 4, 1]), 2, lengths)
    assert [b.tolist() for b in batches] == [[1, 2], [0, 4]]
    assert [b.tolist() for b in eval_batches(torch.arange(3), 2)] == [[0, 1], [2]]


def test_text_pool_tokenizes_and_pads(tiny_backbone):
    bench = wordnet20(train_per_class=3, test_per_class=2)
    pool = build_pool(bench, "train", tiny_backbone.tokenizer, max_length=8)
    assert len(pool) == 60 and pool.labels.tolist()[:12] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert pool.tasks.tolist() == [t for t in range(5) for _ in range(12)]
    assert pool.task_indices(2).tolist() == list(range(24, 36))
    assert pool.task_indices([0, 4]).tolist() == list(range(12)) + list(range(48, 60))
    assert int(pool.lengths.max()) <= 8
    batch = pool.collate(torch.tensor([0, 5]))
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"].sum(dim=1).tolist() == pool.lengths[[0, 5]].tolist()
    assert pool.fingerprint() == build_pool(bench, "train", tiny_backbone.tokenizer, 8).fingerprint()
    assert pool.fingerprint() != build_pool(bench, "train", tiny_backbone.tokenizer, 6).fingerprint()
    with pytest.raises(ValueError, match="split"):
        build_pool(bench, "valid", tiny_backbone.tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        build_pool(bench, "train", None)


def test_pool_describe_names_items(tiny_backbone):
    pool = build_pool(wordnet20(train_per_class=2, test_per_class=1), "train", tiny_backbone.tokenizer, 12)
    text = pool.describe(torch.tensor([3, 0]))
    assert text.startswith(f"#3 {pool.texts[3][:40]!r}, #0 ")
    assert pool.describe(torch.arange(10), limit=2).endswith(" and 8 more")
