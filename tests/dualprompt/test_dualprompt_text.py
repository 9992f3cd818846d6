"""``DualPromptTextEncoder`` on a tiny random BERT: shapes, the trainable set, the query, and both modes in fp64
against an explicit computation (HF's own layer modules, attention over the concatenated prefix / tokens with
the padding mask, selection by the plain-PyTorch reference) within rtol 1e-10, atol 1e-12; named errors."""

import pytest
import torch

from l2p_fast.dualprompt import reference
from l2p_fast.models.dualprompt_text import DualPromptTextEncoder, bert_prefix_layer
from l2p_fast.models.text import mean_pool
from l2p_fast.testing import tiny_bert

pytest.importorskip("transformers", reason="transformers is not installed")

TOL = {"rtol": 1e-10, "atol": 1e-12}
LAYERS = {"g_prompt_layer_idx": (0,), "e_prompt_layer_idx": (1, 2)}  # tiny_bert has 3 layers


def build(dtype=torch.float64, **options: object) -> DualPromptTextEncoder:
    config = dict(num_classes=5, length=2, pool_size=4, top_k=1, g_prompt_length=3, **LAYERS)
    config.update(options)
    torch.manual_seed(7)
    return DualPromptTextEncoder(tiny_bert(), **config).to(dtype)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0  # one padded sequence
    mask[2, 6:] = 0
    return ids, mask


def explicit_forward(model: DualPromptTextEncoder, ids, mask, cls_features, prompt_mask) -> dict:
    """The model's computation written out: reference selection, then per layer q/k/v by HF's linears and attention
    over [prefix; tokens] by concat + masked softmax (prefix mode), or tokens prepended (prompt-tuning)."""
    bert = model.backbone
    e = model.e_prompt
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    h = bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids), position_ids=positions)
    sel = reference.eprompt_forward(h[:, :1], e.prompt, e.prompt_key, embedding_key="cls", top_k=e.top_k,
                                    batchwise=e.batchwise_prompt, cls_features=cls_features, prompt_mask=prompt_mask)
    valid = mask.bool()
    for i, layer in enumerate(bert.encoder.layer):
        prompt = None
        if i in model.g_prompt_layer_idx:
            g = model.g_prompt[model.g_prompt_layer_idx.index(i)]
            prompt = g.unsqueeze(0).expand(ids.shape[0], *g.shape)
            prefix = model.use_prefix_tune_for_g_prompt
        elif i in model.e_prompt_layer_idx:
            prompt = sel["batched_prompt"][model.e_prompt_layer_idx.index(i)]
            prefix = model.use_prefix_tune_for_e_prompt
        if prompt is not None and not prefix:
            h = torch.cat([prompt, h], dim=1)
            valid = torch.cat([valid.new_ones(ids.shape[0], prompt.shape[1]), valid], dim=1)
        sa = layer.attention.self
        b, s, _ = h.shape
        shape = (b, s, sa.num_attention_heads, sa.attention_head_size)
        q, k, v = (lin(h).view(shape).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
        keep = valid
        if prompt is not None and prefix:
            k = torch.cat([prompt[:, 0].transpose(1, 2), k], dim=2)
            v = torch.cat([prompt[:, 1].transpose(1, 2), v], dim=2)
            keep = torch.cat([valid.new_ones(b, prompt.shape[2]), valid], dim=1)
        scores = (q @ k.transpose(-2, -1)) * sa.attention_head_size**-0.5
        attn = scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1) @ v
        out = layer.attention.output(attn.transpose(1, 2).reshape(b, s, -1), h)
        h = layer.output(layer.intermediate(out), out)
    if model.head_type == "token":
        pre = h[:, model.total_prompt_len]
    else:
        w = valid.to(h.dtype).unsqueeze(-1)
        pre = (h * w).sum(1) / w.sum(1)
    return {**sel, "x": h, "pre_logits": pre, "logits": model.head(pre)}


def loss_of(out: dict) -> torch.Tensor:
    weight = torch.linspace(-1, 1, out["logits"].numel(), dtype=out["logits"].dtype).view_as(out["logits"])
    return (out["logits"] * weight).sum() - out["reduce_sim"]


@pytest.mark.parametrize("g_prefix,e_prefix,head_type", [(True, True, "token"), (False, False, "token"),
                                                         (True, False, "gap"), (False, True, "gap")])
def test_against_explicit_concat_fp64(g_prefix: bool, e_prefix: bool, head_type: str) -> None:
    model = build(use_prefix_tune_for_g_prompt=g_prefix, use_prefix_tune_for_e_prompt=e_prefix, head_type=head_type,
                  batchwise_prompt=False, pool_size=5)
    ids, mask = batch()
    cls = torch.randn(3, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for train, task in ((False, -1), (True, 2)):
        out = model(ids, mask, task_id=task, cls_features=cls, train=train)
        prompt_mask = torch.full((3, 1), 2) if train else None
        want = explicit_forward(model, ids, mask, cls, prompt_mask)
        assert torch.equal(out["prompt_idx"], want["prompt_idx"])
        if train:
            assert out["prompt_idx"].flatten().tolist() == [2, 2, 2]
        for key in ("logits", "pre_logits", "reduce_sim", "similarity"):
            torch.testing.assert_close(out[key], want[key], **TOL, msg=key)
        valid_rows = torch.cat([torch.ones(3, model.total_prompt_len, dtype=torch.bool), mask.bool()], dim=1)
        torch.testing.assert_close(out["x"][valid_rows], want["x"][valid_rows], **TOL)
        params = model.trainable_parameters()
        got = torch.autograd.grad(loss_of(out), params, allow_unused=True)
        expected = torch.autograd.grad(loss_of(want), params, allow_unused=True)
        for (name, _), g, e in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), got, expected,
                                   strict=True):
            assert (g is None) == (e is None), name
            if g is not None:
                torch.testing.assert_close(g, e, **TOL, msg=name)


def test_layer_without_prompt_is_hf_bert() -> None:
    """The layer loop without prompts is the backbone's own forward (valid positions, fp64)."""
    model = build()
    ids, mask = batch()
    bert = model.backbone
    h = bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids),
                        position_ids=torch.arange(7).expand_as(ids))
    for layer in bert.encoder.layer:
        h = bert_prefix_layer(layer, h, mask.bool(), None)
    want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(h[mask.bool()], want[mask.bool()], **TOL)


def test_shapes_trainable_set_and_query() -> None:
    model = build(dtype=torch.float32, use_prefix_tune_for_e_prompt=False, top_k=2, batchwise_prompt=True)
    ids, mask = batch()
    out = model(ids, mask, train=True, task_id=0)
    assert model.total_prompt_len == 2 * 2 * 2
    assert out["x"].shape == (3, 8 + 7, 24) and out["logits"].shape == (3, 5)
    assert out["prompt_idx"].shape == (3, 2) and out["batched_prompt"].shape == (2, 3, 4, 24)
    assert out["prompt_idx"].tolist() == [[0, 1]] * 3  # the task mask
    loss_of(out).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"g_prompt", "e_prompt.prompt", "e_prompt.prompt_key", "head.weight", "head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained
    assert all(p.grad is None for p in model.backbone.parameters())
    # the query is the frozen, prompt-free encoder's mean-pooled embedding, and the default one
    hidden = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    query = model.query(ids, mask)
    torch.testing.assert_close(query, mean_pool(hidden, mask), rtol=1e-5, atol=1e-6)
    model.eval()
    torch.testing.assert_close(model(ids, mask)["logits"], model(ids, mask, cls_features=query)["logits"])
    assert model.training is False and model.train().backbone.training is False


def test_prefix_shapes_layout_and_bf16() -> None:
    model = build(dtype=torch.float32, layout="port", batchwise_prompt=True)
    ids, mask = batch()
    out = model(ids, mask)
    assert out["x"].shape == (3, 7, 24) and model.total_prompt_len == 0
    assert out["batched_prompt"].shape == (2, 3, 2, 2, 4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids, mask)
    assert low["logits"].dtype == torch.bfloat16 and low["reduce_sim"].dtype == torch.float32
    assert torch.equal(low["prompt_idx"], out["prompt_idx"])
    torch.testing.assert_close(low["logits"].float(), out["logits"], rtol=0.1, atol=0.1)
    loss_of(low).float().backward()
    assert model.e_prompt.prompt.grad is not None and model.g_prompt.grad.dtype == torch.float32


def test_errors_are_named() -> None:
    with pytest.raises(ValueError, match=r"e_prompt_layer_idx: expected distinct block indices in \[0, 3\)"):
        DualPromptTextEncoder(tiny_bert(), num_classes=2)  # the default E layers 2-4 on 3 layers
    with pytest.raises(ValueError, match="head_type: expected one of"):
        build(head_type="prompt")
    with pytest.raises(ValueError, match="g_prompt_length: expected a positive int, got 0"):
        build(g_prompt_length=0)
    hooked = tiny_bert()
    hooked.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="backbone: expected a plain transformers BertModel.*hooks"):
        DualPromptTextEncoder(hooked, num_classes=2, **LAYERS)
    model = build(dtype=torch.float32)
    with pytest.raises(ValueError, match="input_ids: expected an integer tensor"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        model(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


@pytest.mark.parametrize("e_prefix,last_layer", [(True, "e"), (False, "e"), (True, "plain")])
def test_final_tokens_head_matches_all(e_prefix: bool, last_layer: str) -> None:
    """With the 'token' head, final_tokens='head' computes the last layer on the CLS row only: logits, pre_logits,
    reduce_sim and every gradient as 'all' (fp64, 1e-10); x is that row."""
    layers = LAYERS if last_layer == "e" else {"g_prompt_layer_idx": (0,), "e_prompt_layer_idx": (1,)}
    options = dict(use_prefix_tune_for_e_prompt=e_prefix, **layers)
    full, head = build(**options), build(**options, final_tokens="head")
    head.load_state_dict(full.state_dict())
    ids, mask = batch(1)
    cls = torch.randn(3, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    outs = [m(ids, mask, task_id=1, cls_features=cls, train=True) for m in (full, head)]
    for key in ("logits", "pre_logits", "reduce_sim"):
        torch.testing.assert_close(outs[1][key], outs[0][key], **TOL, msg=key)
    assert outs[1]["x"].shape == (3, 1, 24)
    torch.testing.assert_close(outs[1]["x"][:, 0], outs[0]["x"][:, full.total_prompt_len], **TOL)
    grads = [torch.autograd.grad(loss_of(o), m.trainable_parameters()) for o, m in zip(outs, (full, head), strict=True)]
    for g, e in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g, e, **TOL)
    gap = build(head_type="gap", final_tokens="head")  # 'gap' reads every row: nothing to cut
    assert gap(ids, mask)["x"].shape == (3, 7, 24)
    with pytest.raises(ValueError, match="final_tokens: expected one of"):
        build(final_tokens="cls")
