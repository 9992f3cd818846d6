"""The reference prompt pool against small hand-computed cases (docs/behaviour.md §4)."""

import math

import pytest
import torch

from l2p_fast import FusedPromptPool
from l2p_fast import reference as ref


def test_query_each_embedding_key() -> None:
    x = torch.tensor([[[1.0, 2.0], [3.0, -4.0]]])
    dtype = torch.float32
    assert ref.query(x, "mean", None, dtype).tolist() == [[2.0, -1.0]]
    assert ref.query(x, "max", None, dtype).tolist() == [[3.0, 2.0]]
    assert ref.query(x, "mean_max", None, dtype).tolist() == [[7.0, 0.0]]
    assert ref.query(x, "cls", None, dtype).tolist() == [[3.0, 2.0]]  # no cls_features: token max
    cls = torch.tensor([[5.0, -6.0]])
    assert ref.query(x, "cls", cls, dtype).tolist() == [[5.0, -6.0]]


def test_query_rejects_unknown_key() -> None:
    with pytest.raises(ValueError, match="embedding_key"):
        ref.query(torch.ones(1, 1, 1), "median", None, torch.float32)


def test_l2_normalize_clamps_the_squared_norm() -> None:
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-7, 0.0]], dtype=torch.float64)
    out = ref.l2_normalize(v)
    torch.testing.assert_close(out[0], torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert out[1].tolist() == [0.0, 0.0]
    # squared norm 1e-14 < 1e-12, so the scale is 1e6 (F.normalize would give [1, 0])
    torch.testing.assert_close(out[2], torch.tensor([0.1, 0.0], dtype=torch.float64))


def test_top_k_tie_rule_lower_id_first() -> None:
    sim = torch.tensor([[0.5, 0.9, 0.5, 0.9], [0.1, 0.1, 0.1, 0.1]])
    assert ref.top_k_ids(sim, 3).tolist() == [[1, 3, 0], [0, 1, 2]]


def test_batch_vote_order_by_count_then_lower_id() -> None:
    idx = torch.tensor([[0, 1], [1, 2], [2, 3], [1, 3]])
    # counts: id0 1, id1 3, id2 2, id3 2 → 1 first, then the tie 2/3 goes to 2
    assert ref.batch_vote(idx, pool_size=4, top_k=2).tolist() == [[1, 2]] * 4
    idx = torch.tensor([[3, 2, 1]])
    assert ref.batch_vote(idx, pool_size=5, top_k=3).tolist() == [[1, 2, 3]]


def test_select_with_mask_ignores_similarity_and_vote() -> None:
    sim = torch.randn(2, 5)
    mask = torch.tensor([[4, 4], [0, 3]], dtype=torch.int32)
    idx = ref.select(sim, top_k=2, batchwise=True, prompt_mask=mask)
    assert idx.dtype == torch.int64 and idx.tolist() == [[4, 4], [0, 3]]


def _identity_pool(top_k: int, batchwise: bool = False) -> FusedPromptPool:
    pool = FusedPromptPool(
        length=2, embed_dim=3, prompt_pool=True, prompt_key=True, pool_size=3, top_k=top_k,
        batchwise_prompt=batchwise, backend="reference",
    ).double()
    with torch.no_grad():
        pool.prompt_key.copy_(torch.eye(3, dtype=torch.float64) * 2.0)
        pool.prompt.copy_(torch.arange(18, dtype=torch.float64).reshape(3, 2, 3))
    return pool


def test_pool_k1_and_k_equals_m_by_hand() -> None:
    x = torch.tensor([[[1.0, 4.0, 0.0], [1.0, 0.0, 0.0]]], dtype=torch.float64)  # mean (1, 2, 0), B=1
    sqrt5 = math.sqrt(5.0)
    for top_k, expected_ids in ((1, [1]), (3, [1, 0, 2])):
        out = _identity_pool(top_k)(x)
        torch.testing.assert_close(out["x_embed_norm"], torch.tensor([[1 / sqrt5, 2 / sqrt5, 0.0]], dtype=torch.float64))
        torch.testing.assert_close(out["prompt_norm"], torch.eye(3, dtype=torch.float64))
        torch.testing.assert_close(out["similarity"], torch.tensor([[1 / sqrt5, 2 / sqrt5, 0.0]], dtype=torch.float64))
        assert out["prompt_idx"].tolist() == [expected_ids]
        expected_sum = sum([1 / sqrt5, 2 / sqrt5, 0.0][i] for i in expected_ids)
        torch.testing.assert_close(out["reduce_sim"], torch.tensor(expected_sum, dtype=torch.float64))
        prompts = torch.arange(18, dtype=torch.float64).reshape(3, 2, 3)
        expected = torch.cat([prompts[expected_ids].reshape(1, -1, 3), x], dim=1)
        assert torch.equal(out["prompted_embedding"], expected)
        assert out["total_prompt_len"] == 2 * top_k


def test_pool_batch_vote_by_hand() -> None:
    # rows prefer keys 0, 1, 1: the vote gives id 1 to every row (K=1)
    x = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.1, 1.0, 0.0]]], dtype=torch.float64)
    out = _identity_pool(1, batchwise=True)(x)
    assert out["prompt_idx"].tolist() == [[1], [1], [1]]
    selected = out["selected_key"][:, 0]
    assert torch.equal(selected, torch.tensor([[0.0, 1.0, 0.0]] * 3, dtype=torch.float64))


def test_pool_with_mask_by_hand() -> None:
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[2, 0], [1, 1]])
    out = _identity_pool(2)(x, prompt_mask=mask)
    assert out["prompt_idx"].tolist() == mask.tolist()
    prompts = torch.arange(18, dtype=torch.float64).reshape(3, 2, 3)
    assert torch.equal(out["prompted_embedding"][1, :4], prompts[[1, 1]].reshape(4, 3))
    expected = (out["prompt_norm"][mask] * out["x_embed_norm"].unsqueeze(1)).sum() / 2
    torch.testing.assert_close(out["reduce_sim"], expected)


def test_prepend_non_pool() -> None:
    prompt = torch.randn(3, 4)
    x = torch.randn(2, 5, 4)
    out = ref.prepend(prompt, x)
    assert out.shape == (2, 8, 4)
    assert torch.equal(out[1, :3], prompt) and torch.equal(out[0, 3:], x[0])


def test_compute_dtype_never_below_fp32() -> None:
    assert ref.compute_dtype(torch.bfloat16, torch.float32) == torch.float32
    assert ref.compute_dtype(torch.float16, torch.float16) == torch.float32
    assert ref.compute_dtype(torch.float32, torch.float64) == torch.float64
