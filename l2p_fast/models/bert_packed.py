"""Padding-free forward of a frozen Hugging Face ``BertModel``: every linear layer on the valid rows only.

The R valid tokens of a (B, S) batch are packed into one (R, D) matrix; embeddings, Q/K/V, attention
output, FFN and layer norms run on it through the model's own modules (no weight copies). Only the
attention itself runs per sequence in padded form: Q/K/V are scattered into (B, H, S, hd) with a
key-padding mask for ``F.scaled_dot_product_attention`` and the valid rows are gathered back. With
``final_rows=(start, stop)`` the last layer computes its query, attention output and FFN only for the
rows start … stop−1 (keys and values from all valid rows). Equal to HF's forward at every valid
position up to float rounding, gradients included; pad positions of the result are zeros (HF's
values there are meaningless). Configurations not verified here fall back to HF's forward.
Shapes: B batch, S sequence, R valid rows, D width, H heads, hd head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa")


def packed_unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot take the padding-free path, or None when it can (checked on every call).

    Supported: a ``transformers`` ``BertModel`` (forward not overridden) with its own embedding, layer,
    attention and FFN classes, absolute positions, an encoder (no decoder, no cross-attention), no
    feed-forward chunking, eager/sdpa attention, no hooks on the bypassed modules, and no active
    dropout (eval mode, or every dropout p = 0).
    """
    try:
        from transformers.models.bert import modeling_bert as hf
    except ImportError:
        return "transformers is not installed"
    if not isinstance(model, hf.BertModel) or type(model).forward is not hf.BertModel.forward:
        return f"not a transformers BertModel: {type(model).__name__}"
    config = model.config
    if config.is_decoder or config.add_cross_attention:
        return "decoder / cross-attention configuration"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type={config.position_embedding_type!r}"
    if config.chunk_size_feed_forward:
        return f"chunk_size_feed_forward={config.chunk_size_feed_forward}"
    if getattr(config, "_attn_implementation", None) not in ATTN_IMPLEMENTATIONS:
        return f"attention implementation {config._attn_implementation!r}"
    if type(model.embeddings) is not hf.BertEmbeddings or type(model.encoder) is not hf.BertEncoder:
        return "custom embeddings or encoder module"
    expected = (
        ("attention", hf.BertAttention),
        ("attention.self", hf.BertSelfAttention),
        ("attention.output", hf.BertSelfOutput),
        ("intermediate", hf.BertIntermediate),
        ("output", hf.BertOutput),
    )
    for layer in model.encoder.layer:
        if type(layer) is not hf.BertLayer or hasattr(layer, "crossattention"):
            return f"custom or cross-attention layer: {type(layer).__name__}"
        if any(type(layer.get_submodule(name)) is not cls for name, cls in expected):
            return "custom attention / feed-forward module"
        if layer.attention.is_cross_attention or layer.attention.self.all_head_size != config.hidden_size:
            return "attention width differs from the hidden size"
    modules = list(model.modules())
    if any(m.training for m in modules) and any(isinstance(m, nn.Dropout) and m.p > 0 for m in modules):
        return "dropout is active (train mode)"
    bypassed = [model, model.encoder, *model.encoder.layer, *(layer.attention for layer in model.encoder.layer)]
    bypassed += [layer.attention.self for layer in model.encoder.layer]
    if any(m._forward_hooks or m._forward_pre_hooks for m in bypassed):
        return "forward hooks on the model, encoder, layers or attention"
    return None


def _layer(layer: nn.Module, h: Tensor, kv_gather: Tensor, q_rows: Tensor | None, q_gather: Tensor,
           q_index: Tensor, shape: tuple[int, int, int], key_mask: Tensor) -> Tensor:  # fmt: skip
    """One ``BertLayer`` on packed rows h (R, D) → (R', D), R' the query rows ``q_rows`` (None: all R).

    ``kv_gather`` (B·S,) / ``q_gather`` (B·Sq,): the packed row each padded slot reads (pad slots read
    any row: masked keys and unread queries get exactly zero weight and gradient); ``q_index`` (R',):
    where the query rows sit in the (B·Sq) layout; ``shape`` = (B, S, Sq); ``key_mask`` (B, 1, 1, S).
    """
    batch, seq, q_seq = shape
    sa = layer.attention.self
    heads, hd = sa.num_attention_heads, sa.attention_head_size
    hq = h if q_rows is None else h.index_select(0, q_rows)
    q = sa.query(hq).index_select(0, q_gather).view(batch, q_seq, heads, hd).transpose(1, 2)
    k = sa.key(h).index_select(0, kv_gather).view(batch, seq, heads, hd).transpose(1, 2)
    v = sa.value(h).index_select(0, kv_gather).view(batch, seq, heads, hd).transpose(1, 2)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=sa.scaling)  # (B, H, Sq, hd)
    ctx = ctx.transpose(1, 2).reshape(batch * q_seq, heads * hd).index_select(0, q_index)
    attention = layer.attention.output(ctx, hq)
    return layer.output(layer.intermediate(attention), attention)


def _gather_index(valid: Tensor) -> Tensor:
    """(N,) bool → (N,) long: each slot's packed row (a pad slot: the last valid row before it, or 0)."""
    return (valid.cumsum(0) - 1).clamp_min(0)


def packed_bert_forward(
    model: nn.Module,
    attention_mask: Tensor | None,
    *,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    position_ids: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    final_rows: tuple[int, int] | None = None,
) -> Tensor:
    """``last_hidden_state`` of a supported ``BertModel`` (see ``packed_unsupported``), padding-free.

    input_ids (B, S) or inputs_embeds (B, S, D); attention_mask (B, S) (None: all valid);
    position_ids / token_type_ids (B, S) or (1, S), defaults as HF's (0 … S−1, the model's buffer).
    Returns (B, S, D) with zeros at pad positions, or with ``final_rows=(start, stop)`` only the rows
    start … stop−1 of the last layer, (B, stop−start, D), zeros where padded.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("packed_bert_forward: pass exactly one of input_ids and inputs_embeds")
    source = input_ids if input_ids is not None else inputs_embeds
    batch, seq = source.shape[:2]
    device = source.device
    start, stop = (0, seq) if final_rows is None else final_rows
    if not 0 <= start < stop <= seq:
        raise ValueError(f"final_rows: expected (start, stop) with 0 <= start < stop <= {seq}, got {final_rows!r}")
    valid = torch.ones(batch, seq, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    flat_valid = valid.reshape(-1)
    flat = flat_valid.nonzero().squeeze(1)  # (R,) positions in the (B·S) layout
    width = model.config.hidden_size
    final_valid = valid[:, start:stop].reshape(-1)
    q_index = flat if final_rows is None else final_valid.nonzero().squeeze(1)  # (R',) in the (B·Sq) layout
    dtype = inputs_embeds.dtype if inputs_embeds is not None else model.embeddings.word_embeddings.weight.dtype
    if q_index.numel() == 0:  # nothing valid to compute
        return torch.zeros(batch, stop - start, width, dtype=dtype, device=device)
    if position_ids is None:
        position_ids = torch.arange(seq, device=device).unsqueeze(0)
    position_ids = position_ids.expand(batch, seq).reshape(-1)[flat]
    embeddings = model.embeddings
    if token_type_ids is not None:
        token_type_ids = token_type_ids.expand(batch, seq).reshape(-1)[flat]
    elif hasattr(embeddings, "token_type_ids"):  # HF's default: its buffer read at the position ids
        token_type_ids = embeddings.token_type_ids[0, position_ids]
    else:
        token_type_ids = torch.zeros_like(position_ids)
    if input_ids is not None:
        packed = {"input_ids": input_ids.reshape(-1)[flat].unsqueeze(0)}
    else:
        packed = {"inputs_embeds": inputs_embeds.reshape(batch * seq, -1).index_select(0, flat).unsqueeze(0)}
    h = embeddings(position_ids=position_ids.unsqueeze(0), token_type_ids=token_type_ids.unsqueeze(0), **packed)[0]
    # a sequence without valid rows attends everywhere (never read back), so no NaN enters the graph
    key_mask = (valid | ~valid.any(dim=1, keepdim=True))[:, None, None, :]
    kv_gather = _gather_index(flat_valid)
    layers = list(model.encoder.layer)
    for i, layer in enumerate(layers):
        if i < len(layers) - 1 or final_rows is None:
            h = _layer(layer, h, kv_gather, None, kv_gather, flat, (batch, seq, seq), key_mask)
            continue
        q_rows = kv_gather.view(batch, seq)[:, start:stop].reshape(-1).index_select(0, q_index)  # (R',) packed
        shape = (batch, seq, stop - start)
        h = _layer(layer, h, kv_gather, q_rows, _gather_index(final_valid), q_index, shape, key_mask)
    out = h.new_zeros(batch * (stop - start), h.shape[1]).index_copy_(0, q_index, h)
    return out.view(batch, stop - start, -1)


def bert_last_hidden(
    model: nn.Module,
    attention_mask: Tensor | None,
    *,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    position_ids: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    final_rows: tuple[int, int] | None = None,
    packed: bool = True,
) -> Tensor:
    """``packed_bert_forward`` when ``packed`` and the model is supported, else HF's forward (sliced to
    ``final_rows`` when given): (B, S, D) or (B, stop−start, D). Only HF's pad positions differ (zeros)."""
    if packed and packed_unsupported(model) is None:
        return packed_bert_forward(
            model,
            attention_mask,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            final_rows=final_rows,
        )
    kwargs = {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "position_ids": position_ids,
              "token_type_ids": token_type_ids}  # fmt: skip
    hidden = model(attention_mask=attention_mask, **{k: v for k, v in kwargs.items() if v is not None})
    hidden = hidden.last_hidden_state
    return hidden if final_rows is None else hidden[:, final_rows[0] : final_rows[1]]
