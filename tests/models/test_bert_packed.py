"""Padding-free BERT forward (``l2p_fast.models.bert_packed``) vs Hugging Face's forward, and its fallback."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from l2p_fast.models.bert_packed import bert_last_hidden, packed_bert_forward, packed_unsupported  # noqa: E402
from l2p_fast.testing import tiny_bert  # noqa: E402

LENGTHS = [[3, 17, 1, 9], [1], [6, 6, 6], [2, 30]]  # very different lengths, one row, no padding, long pad


@pytest.fixture(params=["tiny-gelu", "tiny-relu-eager", "minilm"])
def model(request):
    if request.param == "minilm":
        return request.getfixturevalue("minilm")[0].requires_grad_(False)
    if request.param == "tiny-relu-eager":
        bert = tiny_bert(hidden_act="relu")
        bert.config._attn_implementation = "eager"
        return bert
    return tiny_bert()


def make_batch(model, lengths: list[int], seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    mask = (torch.arange(seq) < torch.tensor(lengths).unsqueeze(1)).long()
    ids = torch.randint(1, 60, (len(lengths), seq), generator=gen) * mask
    width = model.config.hidden_size
    embeds = torch.randn(len(lengths), seq, width, generator=gen).requires_grad_(True)
    positions = torch.randint(0, 20, (len(lengths), seq), generator=gen)
    types = torch.randint(0, 2, (len(lengths), seq), generator=gen)
    return {"ids": ids, "mask": mask, "embeds": embeds, "positions": positions, "types": types}


def test_supported_models(model) -> None:
    assert packed_unsupported(model) is None


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_input_ids_equal_hf_at_valid_positions(model, lengths: list[int]) -> None:
    b = make_batch(model, lengths)
    with torch.no_grad():
        expected = model(input_ids=b["ids"], attention_mask=b["mask"]).last_hidden_state
        out = packed_bert_forward(model, b["mask"], input_ids=b["ids"])
    valid = b["mask"].bool()
    assert out.shape == expected.shape
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert (out[~valid] == 0).all()


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_inputs_embeds_and_grads_equal_hf(model, lengths: list[int]) -> None:
    b = make_batch(model, lengths, seed=1)
    kwargs = {"position_ids": b["positions"], "token_type_ids": b["types"]}
    expected = model(inputs_embeds=b["embeds"], attention_mask=b["mask"], **kwargs).last_hidden_state
    out = packed_bert_forward(model, b["mask"], inputs_embeds=b["embeds"], **kwargs)
    valid = b["mask"].bool()
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-5, atol=1e-5)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)) * valid.unsqueeze(-1)
    (grad_hf,) = torch.autograd.grad((expected * weight).sum(), b["embeds"])
    (grad_packed,) = torch.autograd.grad((out * weight).sum(), b["embeds"])
    torch.testing.assert_close(grad_packed, grad_hf, rtol=1e-5, atol=1e-5)
    assert (grad_packed[~valid] == 0).all()  # pad inputs never reach a valid output


@pytest.mark.parametrize("rows", [(0, 1), (1, 3), (0, 3), (1, 2)])
def test_final_rows_equal_full_last_layer(model, rows: tuple[int, int]) -> None:
    b = make_batch(model, [3, 17, 1, 9], seed=3)
    full = packed_bert_forward(model, b["mask"], inputs_embeds=b["embeds"])
    part = packed_bert_forward(model, b["mask"], inputs_embeds=b["embeds"], final_rows=rows)
    assert part.shape == (4, rows[1] - rows[0], full.shape[-1])
    torch.testing.assert_close(part, full[:, rows[0] : rows[1]], rtol=1e-5, atol=1e-5)
    (grad_full,) = torch.autograd.grad(full[:, rows[0] : rows[1]].sum(), b["embeds"])
    (grad_part,) = torch.autograd.grad(part.sum(), b["embeds"])
    torch.testing.assert_close(grad_part, grad_full, rtol=1e-5, atol=1e-5)


def test_row_without_valid_tokens_gives_zeros_and_no_nan() -> None:
    bert = tiny_bert()
    b = make_batch(bert, [4, 2])
    mask = b["mask"].clone()
    mask[1] = 0
    out = packed_bert_forward(bert, mask, inputs_embeds=b["embeds"])
    assert (out[1] == 0).all()
    (grad,) = torch.autograd.grad(out.sum(), b["embeds"])
    assert torch.isfinite(grad).all() and (grad[1] == 0).all()


def test_autocast_bf16_close_to_hf() -> None:
    bert = tiny_bert()
    b = make_batch(bert, [5, 2, 7])
    valid = b["mask"].bool()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = bert(inputs_embeds=b["embeds"], attention_mask=b["mask"]).last_hidden_state
        out = packed_bert_forward(bert, b["mask"], inputs_embeds=b["embeds"])
    torch.testing.assert_close(out[valid].float(), expected[valid].float(), rtol=0.05, atol=0.05)


def unsupported_models() -> dict:
    decoder = tiny_bert(is_decoder=True)
    chunked = tiny_bert(chunk_size_feed_forward=1)
    dropout = tiny_bert()
    dropout.train()
    hooked = tiny_bert()
    hooked.encoder.layer[1].register_forward_hook(lambda module, args, output: None)
    roberta_config = transformers.RobertaConfig(
        vocab_size=60, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        max_position_embeddings=40,
    )  # fmt: skip
    roberta = transformers.RobertaModel(roberta_config).eval()
    return {"decoder": decoder, "chunk": chunked, "dropout": dropout, "hooks": hooked, "BertModel": roberta}


def test_unsupported_configurations_fall_back_to_hf() -> None:
    for reason, bert in unsupported_models().items():
        assert reason in packed_unsupported(bert)
        b = make_batch(bert, [3, 5])
        torch.manual_seed(5)  # the train-mode model draws dropout: same seed for both calls
        out = bert_last_hidden(bert, b["mask"], inputs_embeds=b["embeds"], position_ids=b["positions"])
        torch.manual_seed(5)
        expected = bert(inputs_embeds=b["embeds"], attention_mask=b["mask"], position_ids=b["positions"])
        torch.testing.assert_close(out, expected.last_hidden_state, rtol=0, atol=0)  # pads included
        torch.manual_seed(5)
        part = bert_last_hidden(bert, b["mask"], inputs_embeds=b["embeds"], position_ids=b["positions"],
                                final_rows=(1, 3))
        torch.testing.assert_close(part, expected.last_hidden_state[:, 1:3], rtol=0, atol=0)
    assert packed_unsupported(torch.nn.Linear(2, 2)).startswith("not a transformers BertModel")


def test_packed_false_runs_hf_forward() -> None:
    bert = tiny_bert()
    b = make_batch(bert, [3, 5])
    with torch.no_grad():
        out = bert_last_hidden(bert, b["mask"], input_ids=b["ids"], packed=False)
        expected = bert(input_ids=b["ids"], attention_mask=b["mask"]).last_hidden_state
    assert torch.equal(out, expected)


def test_bad_arguments() -> None:
    bert = tiny_bert()
    b = make_batch(bert, [3, 5])
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        packed_bert_forward(bert, b["mask"])
    with pytest.raises(ValueError, match="exactly one"):
        packed_bert_forward(bert, b["mask"], input_ids=b["ids"], inputs_embeds=b["embeds"])
    with pytest.raises(ValueError, match="final_rows"):
        packed_bert_forward(bert, b["mask"], input_ids=b["ids"], final_rows=(2, 9))
