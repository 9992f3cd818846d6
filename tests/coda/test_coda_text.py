"""``CodaTextEncoder`` on the offline MiniLM: the layer-by-layer prefix forward equals HF's forward without
prefixes, a prefixed layer equals an explicit masked softmax over [prefix; tokens], the model's gradients reach only
the current slice, and the cached query gives the live one's logits."""

import copy

import pytest
import torch

from l2p_fast.models.coda_text import CodaTextEncoder, bert_prefix_forward, bert_prefix_layer

TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def encoder(minilm) -> CodaTextEncoder:
    model, tokenizer = minilm
    return CodaTextEncoder(copy.deepcopy(model), tokenizer=tokenizer, num_classes=4, n_tasks=2, pool_size=6,
                           length=4, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def batch(encoder) -> dict:
    return encoder.tokenize(["a small dog barks", "the cat", "an old oak tree stands on the hill"])


def test_no_prefix_equals_hf(encoder, batch) -> None:
    want = encoder.backbone(**batch).last_hidden_state
    got = bert_prefix_forward(encoder.backbone, batch["input_ids"], batch["attention_mask"], {})
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], **TOL)


def test_prefixed_layer_is_masked_softmax_over_prefix_and_tokens(encoder, batch) -> None:
    layer = encoder.backbone.encoder.layer[0]
    h = encoder.backbone.embeddings(input_ids=batch["input_ids"])
    valid = batch["attention_mask"].bool()
    prefix = torch.randn(h.shape[0], 4, h.shape[2], generator=torch.Generator().manual_seed(1))
    got = bert_prefix_layer(layer, h, valid, prefix)
    attn = layer.attention.self
    heads, dh = attn.num_attention_heads, attn.attention_head_size

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, dh).transpose(1, 2)

    q = split(attn.query(h))
    k = torch.cat([split(prefix[:, :2]), split(attn.key(h))], 2)
    v = torch.cat([split(prefix[:, 2:]), split(attn.value(h))], 2)
    scores = q @ k.transpose(-2, -1) * dh**-0.5
    keep = torch.cat([torch.ones(h.shape[0], 2, dtype=torch.bool), valid], 1)[:, None, None, :]
    ctx = (scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
    mid = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + h)
    want = layer.output.LayerNorm(layer.output.dense(layer.intermediate.intermediate_act_fn(
        layer.intermediate.dense(mid))) + mid)
    torch.testing.assert_close(got, want, **TOL)


def test_forward_gradients_and_cache(encoder, batch) -> None:
    encoder.set_task(1)
    out = encoder(**batch, train=True)
    assert out["logits"].shape == (3, 4) and out["component_weights"].shape == (5, 3, 6)
    assert out["ortho_loss"].shape == () and not out["ortho_loss"]
    out["logits"].sum().backward()
    for layer in encoder.prompt.e_layers:
        for kind in "pka":
            grad = getattr(encoder.prompt, f"e_{kind}_{layer}").grad
            assert not grad[:3].any() and grad[3:].any(), (kind, layer)  # task 0's rows frozen
    cached = encoder(**batch, cls_features=encoder.query(**batch), train=False)["logits"]
    torch.testing.assert_close(cached, encoder(**batch, train=False)["logits"])
    assert not any(p.requires_grad for p in encoder.backbone.parameters())


def test_odd_length_refused(minilm) -> None:
    with pytest.raises(ValueError, match="length: expected an even prompt length >= 2"):
        CodaTextEncoder(copy.deepcopy(minilm[0]), num_classes=2, n_tasks=2, pool_size=4, length=3)
