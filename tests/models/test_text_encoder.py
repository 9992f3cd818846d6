"""L2PTextEncoder on the offline all-MiniLM-L6-v2: prompted forward vs hand-built BERT inputs, query cache."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

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
def backbone(minilm):
    return minilm


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


@pytest.mark.parametrize(
    ("backend", "head_type"),
    [(backend, head) for backend in ("reference", "auto") for head in ("prompt", "token", "token+prompt", "gap")]
    + [pytest.param("triton", head, marks=pytest.mark.requires_backend("triton")) for head in ("prompt", "gap")],
)
def test_prompted_forward_equals_hand_built_bert(backbone, head_type: str, backend: str) -> None:
    model = make(backbone, head_type=head_type, backend=backend)
    batch = model.tokenize(TEXTS)
    out = model(**batch)
    expected = hand_built(model, batch, out["prompt_idx"])
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
    valid = mask.bool()
    assert (~valid).any()  # the batch has padding
    assert out["x"].shape == expected.shape
    torch.testing.assert_close(out["x"][valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert (out["x"][~valid] == 0).all()  # the padding-free path leaves pad positions at zero
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


@pytest.mark.parametrize("final_tokens", ["all", "head"])
def test_autocast_bf16_close_to_fp32(backbone, final_tokens: str) -> None:
    """bf16 autocast: similarities stay fp32; logits (scale ~0.45) within 2e-2 and similarities within 5e-3 of the
    fp32 run (measured over 3 seeds: at most 3.7e-3 and 6e-4), the same prompts."""
    model = make(backbone, final_tokens=final_tokens)
    batch = model.tokenize(TEXTS)
    expected = model(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out["similarity"].dtype == torch.float32
    torch.testing.assert_close(out["logits"].float(), expected["logits"], rtol=0, atol=2e-2)
    torch.testing.assert_close(out["similarity"], expected["similarity"], rtol=0, atol=5e-3)
    assert torch.equal(out["prompt_idx"], expected["prompt_idx"])


def head_rows_of(head_type: str, k_lp: int, seq: int) -> slice:
    return {"token": slice(0, 1), "prompt": slice(1, 1 + k_lp), "token+prompt": slice(0, 1 + k_lp)}.get(
        head_type, slice(0, seq)
    )


def step_grads(model: L2PTextEncoder, batch: dict, cache: torch.Tensor) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, cls_features=cache)
    labels = torch.arange(out["logits"].shape[0]) % model.num_classes
    (torch.nn.functional.cross_entropy(out["logits"], labels) - 0.1 * out["reduce_sim"]).backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("head_type", ["prompt", "token", "token+prompt", "gap"])
def test_final_tokens_head_equals_all(backbone, head_type: str) -> None:
    full = make(backbone, head_type=head_type, final_tokens="all")
    head = make(backbone, head_type=head_type, final_tokens="head")
    assert head.final_tokens == "head" and "final_tokens='head'" in repr(head)
    batch = full.tokenize(TEXTS)
    cache = full.encode_queries(TEXTS)
    out_all, grads_all = step_grads(full, batch, cache)
    out_head, grads_head = step_grads(head, batch, cache)
    for key in ("logits", "pre_logits", "reduce_sim", "similarity"):
        torch.testing.assert_close(out_head[key], out_all[key], rtol=1e-5, atol=1e-5)
    assert torch.equal(out_head["prompt_idx"], out_all["prompt_idx"])
    assert set(grads_head) == set(grads_all) == {"prompt.prompt", "prompt.prompt_key", "head.weight", "head.bias"}
    for name, grad in grads_all.items():
        torch.testing.assert_close(grads_head[name], grad, rtol=1e-5, atol=1e-5)
    # x holds only the rows the head reads
    rows = head_rows_of(head_type, out_all["total_prompt_len"], out_all["x"].shape[1])
    torch.testing.assert_close(out_head["x"], out_all["x"][:, rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("final_tokens", ["all", "head"])
def test_packed_equals_hf_path(backbone, final_tokens: str) -> None:
    """The padding-free path gives HF's numbers (packed=False runs HF's forward)."""
    packed = make(backbone, final_tokens=final_tokens)
    plain = make(backbone, final_tokens=final_tokens, packed=False)
    batch = packed.tokenize(TEXTS)
    cache = plain.encode_queries(TEXTS)
    torch.testing.assert_close(packed.encode_queries(TEXTS), cache, rtol=1e-5, atol=1e-5)
    out_p, grads_p = step_grads(packed, batch, cache)
    out_h, grads_h = step_grads(plain, batch, cache)
    for key in ("logits", "reduce_sim"):
        torch.testing.assert_close(out_p[key], out_h[key], rtol=1e-5, atol=1e-5)
    assert torch.equal(out_p["prompt_idx"], out_h["prompt_idx"])
    for name, grad in grads_h.items():
        torch.testing.assert_close(grads_p[name], grad, rtol=1e-5, atol=1e-5)


def test_fallback_backbone_gives_hf_results() -> None:
    """A decoder BertModel is not supported padding-free: the prompted forward is HF's, unchanged."""
    from l2p_fast.models.bert_packed import packed_unsupported

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, is_decoder=True,
    )  # fmt: skip
    bert = transformers.BertModel(config)
    assert "decoder" in packed_unsupported(bert)
    model = L2PTextEncoder(bert, num_classes=3, length=2, pool_size=4, top_k=2, head_type="gap", final_tokens="head")
    ids = torch.randint(1, 50, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    out = model(ids, mask)
    reference = make_reference_inputs(model, ids, mask, out["prompt_idx"])
    with torch.no_grad():
        expected = bert(**reference).last_hidden_state
    torch.testing.assert_close(out["x"], expected)  # every position, pads included: HF's forward ran


def make_reference_inputs(model: L2PTextEncoder, ids: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor) -> dict:
    words = model.backbone.get_input_embeddings()(ids)
    bsz, k = idx.shape
    lp, width = model.prompt.prompt.shape[1:]
    prompts = model.prompt.prompt[idx].reshape(bsz, k * lp, width)
    return {
        "inputs_embeds": torch.cat([words[:, :1], prompts, words[:, 1:]], dim=1),
        "attention_mask": torch.cat([mask[:, :1].expand(-1, 1 + k * lp), mask[:, 1:]], dim=1),
        "position_ids": torch.tensor([0] * (1 + k * lp) + list(range(1, ids.shape[1]))).expand(bsz, -1),
        "token_type_ids": torch.zeros(bsz, 1 + k * lp + ids.shape[1] - 1, dtype=torch.int64),
    }


def test_bad_final_tokens(backbone) -> None:
    with pytest.raises(ValueError, match=r"final_tokens.*'all', 'head'.*'cls'"):
        make(backbone, final_tokens="cls")
    with pytest.raises(ValueError, match="packed"):
        make(backbone, packed="yes")
