"""``CodaViT`` on a tiny timm ViT against a plain composition written here from the original's ViT (the reference
mix, key/value prefixes concatenated in front of each head's keys and values, softmax attention): logits,
orthogonality loss and gradients in fp64 on every CPU backend; task slicing, even-length rule, head-rows path."""

import pytest
import torch

from l2p_fast.coda import reference as ref
from l2p_fast.models.coda_vit import CodaViT

timm = pytest.importorskip("timm", reason="timm is not installed")

FUSED = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.requires_backend("cpu")),
    pytest.param("triton", marks=pytest.mark.requires_backend("triton")),
]
TOL = {"rtol": 1e-9, "atol": 1e-11}


def tiny_vit(depth: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=depth, num_heads=2, mlp_ratio=2,
        qkv_bias=True,
    )


def build(backend: str = "reference", **options) -> CodaViT:
    options = {"n_tasks": 3, "pool_size": 6, "length": 4, "prompt_layer_idx": (0, 1, 2), **options}
    model = CodaViT(tiny_vit(), backend=backend, generator=torch.Generator().manual_seed(1), **options).double()
    with torch.no_grad():  # every row non-zero and not orthonormal, as after training (rows >= f must stay unused)
        for param in model.prompt.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(2), dtype=param.dtype))
    return model


def plain_forward(model: CodaViT, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, orthogonality loss) the original's way: concatenated prefixes, explicit softmax."""
    prompt = model.prompt
    q = model.query(x)
    tokens = model.embed(x)
    start, stop = prompt.used_rows(train)
    loss = tokens.new_zeros(())
    for i, block in enumerate(model.blocks):
        if i not in prompt.e_layers:
            tokens = block(tokens)
            continue
        keys, attn_vec, comp = prompt.layer_params(i)
        ek, ev = ref.split_prefix(ref.coda_prompt(q, keys, attn_vec, comp, start, stop))
        if train and prompt.ortho_mu:
            loss = loss + ref.ortho_loss(*(ref.slice_rows(t, start, stop, True) for t in (keys, attn_vec, comp)),
                                         prompt.ortho_mu)
        attn = block.attn
        batch, n, width = tokens.shape
        heads, dh = attn.num_heads, width // attn.num_heads
        qkv = attn.qkv(block.norm1(tokens)).reshape(batch, n, 3, heads, dh).permute(2, 0, 3, 1, 4)
        qh, kh, vh = qkv.unbind(0)
        kh = torch.cat([ek.reshape(batch, -1, heads, dh).transpose(1, 2), kh], dim=2)
        vh = torch.cat([ev.reshape(batch, -1, heads, dh).transpose(1, 2), vh], dim=2)
        out = ((qh @ kh.transpose(-2, -1)) * dh**-0.5).softmax(-1) @ vh
        tokens = tokens + attn.proj(out.transpose(1, 2).reshape(batch, n, width))
        tokens = tokens + block.mlp(block.norm2(tokens))
    return model.head(model.norm(tokens)[:, 0]), loss


def _grads(model: CodaViT, value: torch.Tensor) -> list[torch.Tensor]:
    params = model.trainable_parameters()
    return [g if g is not None else torch.zeros_like(p) for g, p in
            zip(torch.autograd.grad(value, params, allow_unused=True), params, strict=True)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("train, task, mu", [(True, 0, 0.0), (True, 1, 0.1), (False, 2, 0.5), (True, 2, 0.0)])
def test_matches_plain_composition(backend: str, train: bool, task: int, mu: float) -> None:
    model = build(backend, ortho_mu=mu)
    model.set_task(task)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = model(x, train=train)
    logits, loss = plain_forward(model, x, train)
    torch.testing.assert_close(out["logits"], logits, **TOL)
    torch.testing.assert_close(out["ortho_loss"], loss, **TOL)
    assert isinstance(out["ortho_loss"], torch.Tensor) and (mu > 0 and train) == bool(out["ortho_loss"] != 0)
    stop = (task + 1) * 2
    assert out["component_weights"].shape == (3, 3, stop)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = _grads(model, (out["logits"] * weight).sum() + out["ortho_loss"])
    want = _grads(model, (logits * weight).sum() + loss)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)
    start = task * 2 if train else 0
    for name, param in model.prompt.named_parameters():  # frozen rows and rows of later tasks: no gradient
        grad = got[[p is param for p in model.trainable_parameters()].index(True)]
        assert not grad[:start].any() and not grad[stop:].any(), name


def test_head_rows_path_same_logits() -> None:
    model = build(final_tokens="head")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    full = build(final_tokens="all")
    torch.testing.assert_close(model(x, train=True)["logits"], full(x, train=True)["logits"], **TOL)


def test_set_task_initialises_new_rows_only() -> None:
    model = build()
    before = {n: p.detach().clone() for n, p in model.prompt.named_parameters()}
    model.set_task(2)
    for name, param in model.prompt.named_parameters():
        torch.testing.assert_close(param[:2], before[name][:2])  # task 0 rows kept
        rows = param.detach().reshape(param.shape[0], -1)
        torch.testing.assert_close(rows[2:6].norm(dim=1), torch.ones(4, dtype=rows.dtype))  # new rows unit-norm
    with pytest.raises(ValueError, match="task: expected 2 <= task < n_tasks = 3, got 1"):
        model.set_task(1)


def test_trainable_and_frozen() -> None:
    model = build()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"prompt.e_{k}_{i}" for k in "pka" for i in (0, 1, 2)} | {"head.weight", "head.bias"}


@pytest.mark.parametrize(
    "options, match",
    [
        ({"length": 5}, "length: expected an even prompt length >= 2"),
        ({"prompt_layer_idx": (0, 7)}, r"prompt_layer_idx: expected distinct block indices in \[0, 4\)"),
        ({"final_tokens": "some"}, "final_tokens"),
        ({"pool_size": 2}, "pool_size.*at least n_tasks = 3"),
    ],
)
def test_named_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(**options)
