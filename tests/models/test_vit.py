"""L2PViT on a small random-weight timm ViT: timm parity, docs/behaviour.md §5 composition, gradients, checkpoints."""

import copy
import re

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from l2p_fast import reference as ref  # noqa: E402
from l2p_fast.models import L2PViT  # noqa: E402
from l2p_fast.testing import tiny_vit  # noqa: E402

LP, M, K = 3, 6, 2


def make(seed: int = 0, vit: VisionTransformer | None = None, **kwargs) -> L2PViT:
    vit = tiny_vit(seed) if vit is None else vit
    kwargs = {"length": LP, "pool_size": M, "top_k": K, **kwargs}
    return L2PViT.from_timm(vit, **kwargs).eval()


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def plain_composition(vit: VisionTransformer, model: L2PViT, x: torch.Tensor, head_type: str):
    """docs/behaviour.md §5 written with plain PyTorch: a separate frozen copy for the query, concat, concat, add."""
    query_vit = copy.deepcopy(vit)
    with torch.no_grad():
        cls_features = query_vit.forward_features(x)[:, 0]
    patches = vit.patch_embed(x)
    pool = ref.pool_forward(
        patches,
        model.prompt.prompt,
        model.prompt.prompt_key,
        embedding_key="cls",
        top_k=K,
        batchwise=model.prompt.batchwise_prompt,
        cls_features=cls_features,
    )
    seq = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), pool["prompted_embedding"]], dim=1)
    seq = vit.norm(vit.blocks(seq + model.pos_embed))
    pooled = {
        "token": seq[:, 0],
        "prompt": seq[:, 1 : 1 + K * LP].mean(1),
        "token+prompt": seq[:, : 1 + K * LP].mean(1),
        "gap": seq.mean(1),
    }[head_type]
    return vit.head(vit.fc_norm(pooled)), pool["reduce_sim"], pool["prompt_idx"]


def test_prompt_free_pass_equals_timm_exactly() -> None:
    vit = tiny_vit()
    twin = copy.deepcopy(vit)
    model = make(vit=twin, head_type="token")
    x = images()
    with torch.no_grad():
        features = vit.forward_features(x)
        assert torch.equal(model.forward_backbone(x), features)
        assert torch.equal(model.head(model.fc_norm(model.forward_backbone(x)[:, 0])), vit(x))
    q = model.query(x)
    # the query's last block computes only the CLS row (smaller matmuls, other summation order): equal up to rounding
    torch.testing.assert_close(q, features[:, 0], rtol=1e-5, atol=1e-6)
    assert not q.requires_grad


def test_positional_table_layout() -> None:
    vit = tiny_vit()
    model = make(vit=copy.deepcopy(vit))
    assert model.pos_embed.shape == (1, 1 + K * LP + 64, 64)
    assert torch.equal(model.pos_embed[:, 1 : 1 + K * LP], vit.pos_embed[:, :1].expand(-1, K * LP, -1))
    assert torch.equal(model.pos_embed[:, :1], vit.pos_embed[:, :1])
    assert torch.equal(model.pos_embed[:, 1 + K * LP :], vit.pos_embed[:, 1:])


def _check_against_plain_composition(head_type: str, backend: str, device: str = "cpu") -> None:
    vit = tiny_vit(seed=2)
    model = make(vit=copy.deepcopy(vit), head_type=head_type, backend=backend, seed=2)
    with torch.no_grad():
        model.pos_embed[:, 1 : 1 + K * LP].add_(0.1 * torch.randn(K * LP, 64))  # prompt slots differ from CLS's
    # the same trainable prompts/keys/head in the plain composition
    vit.head.load_state_dict(model.head.state_dict())
    vit, model = vit.to(device), model.to(device)
    x = images(4).to(device)
    labels = torch.tensor([1, 3, 5, 7], device=device)
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out["logits"], labels) - 0.1 * out["reduce_sim"]
    loss.backward()
    logits, reduce_sim, idx = plain_composition(vit, model, x, head_type)
    torch.testing.assert_close(out["prompt_idx"], idx)
    torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["reduce_sim"], reduce_sim, rtol=1e-6, atol=1e-6)
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert set(got) == {"prompt.prompt", "prompt.prompt_key", "head.weight", "head.bias"}
    model.zero_grad()
    ref_loss = torch.nn.functional.cross_entropy(logits, labels) - 0.1 * reduce_sim
    ref_loss.backward()
    expected = {
        "prompt.prompt": model.prompt.prompt.grad,
        "prompt.prompt_key": model.prompt.prompt_key.grad,
        "head.weight": vit.head.weight.grad,
        "head.bias": vit.head.bias.grad,
    }
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("head_type", ["prompt", "token", "token+prompt", "gap"])
def test_prompted_forward_and_grads_match_plain_composition(backend_device: tuple[str, str], head_type: str) -> None:
    """Every backend and device (pool and assembly ops) against docs/behaviour.md §5 written in plain PyTorch."""
    backend, device = backend_device
    _check_against_plain_composition(head_type, backend, device)


def test_auto_backend_matches_plain_composition() -> None:
    _check_against_plain_composition("prompt", "auto")


def test_every_gradient_when_unfrozen() -> None:
    """With everything trainable, CLS, positions, patch embedding and blocks get the composition's grads."""
    vit = tiny_vit(seed=4)
    model = make(vit=copy.deepcopy(vit), seed=4, head_type="token+prompt", batchwise_prompt=False)
    vit.head.load_state_dict(model.head.state_dict())
    model.requires_grad_(True)
    vit.requires_grad_(True)
    x = images(3, seed=5)
    out = model(x)
    (out["logits"].square().sum() - out["reduce_sim"]).backward()
    pos_before = model.pos_embed.detach().clone()
    logits, reduce_sim, _ = plain_composition(vit, model, x, "token+prompt")
    model.prompt.zero_grad()
    model.pos_embed.grad, pos_grad = None, model.pos_embed.grad
    (logits.square().sum() - reduce_sim).backward()
    assert torch.equal(pos_before, model.pos_embed)
    torch.testing.assert_close(pos_grad, model.pos_embed.grad, rtol=1e-5, atol=1e-6)
    vit_grads = dict(vit.named_parameters())
    for name, param in model.named_parameters():
        if name.startswith(("prompt.", "pos_embed")):
            continue
        # model and vit are distinct copies; model's grads come from its own forward only
        torch.testing.assert_close(param.grad, vit_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_state_dict_keys_and_round_trip() -> None:
    vit = tiny_vit(seed=6)
    model = make(vit=copy.deepcopy(vit), seed=6)
    keys = set(model.state_dict())
    assert keys == set(vit.state_dict()) | {"prompt.prompt", "prompt.prompt_key"}
    assert model.state_dict()["pos_embed"].shape == (1, 1 + K * LP + 64, 64)
    other = make(vit=tiny_vit(seed=7), seed=7)
    other.load_state_dict(model.state_dict())  # strict: the port's key set, both ways
    x = images(2)
    torch.testing.assert_close(other(x)["logits"], model(x)["logits"], rtol=0, atol=0)


def test_loading_plain_timm_weights_resizes_positions() -> None:
    vit = tiny_vit(seed=8)
    model = make(vit=tiny_vit(seed=9), seed=9)
    result = model.load_state_dict(vit.state_dict(), strict=False)
    assert set(result.missing_keys) == {"prompt.prompt", "prompt.prompt_key"} and not result.unexpected_keys
    expected = torch.cat([vit.pos_embed[:, :1].expand(-1, 1 + K * LP, -1), vit.pos_embed[:, 1:]], dim=1)
    assert torch.equal(model.pos_embed, expected)
    with torch.no_grad():  # query: CLS-row-only last block, equal up to rounding
        torch.testing.assert_close(model.query(images(2)), vit.forward_features(images(2))[:, 0], rtol=1e-5, atol=1e-6)


def test_task_prompt_mask() -> None:
    model = make(use_prompt_mask=True, batchwise_prompt=False)
    x = images(2)
    assert model(x, task_id=2, train=True)["prompt_idx"].tolist() == [[4, 5]] * 2
    free = model(x, task_id=2)
    torch.testing.assert_close(model(x, task_id=3, train=True)["prompt_idx"], free["prompt_idx"])


def test_cls_features_argument_is_used() -> None:
    model = make()
    x = images(2)
    q = model.query(x)
    torch.testing.assert_close(model(x, cls_features=q)["logits"], model(x)["logits"], rtol=0, atol=0)
    shifted = model(x, cls_features=torch.randn_like(q))
    assert not torch.equal(shifted["similarity"], model(x)["similarity"])


def test_autocast_bf16_close_to_fp32() -> None:
    """bf16 autocast: similarities stay fp32 and the run agrees with the fp32 run within bf16's error through 2
    blocks: logits (scale ~0.2-0.3) within 1e-2, similarities within 3e-4 (measured over 4 seeds: at most 1.1e-3
    and 3e-5), the same prompts."""
    model = make()
    x = images(4)
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out["similarity"].dtype == torch.float32 and out["reduce_sim"].dtype == torch.float32
    torch.testing.assert_close(out["logits"].float(), expected["logits"], rtol=0, atol=1e-2)
    torch.testing.assert_close(out["similarity"], expected["similarity"], rtol=0, atol=3e-4)
    assert torch.equal(out["prompt_idx"], expected["prompt_idx"])


def test_from_timm_name_and_instance_options() -> None:
    model = L2PViT.from_timm(
        "vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8, depth=1, length=2, pool_size=4, top_k=2
    )
    assert model.head.out_features == 5 and model.pos_embed.shape == (1, 1 + 4 + 16, 192)
    out = model(images(2))
    assert out["logits"].shape == (2, 5) and out["x"].shape == (2, 21, 192)
    resized = L2PViT.from_timm(tiny_vit(), num_classes=3, length=1, pool_size=2, top_k=1)
    assert resized.head.out_features == 3
    assert {id(p) for p in resized.trainable_parameters()} == {
        id(resized.prompt.prompt),
        id(resized.prompt.prompt_key),
        id(resized.head.weight),
        id(resized.head.bias),
    }


@pytest.mark.parametrize(
    ("timm_kwargs", "message"),
    [
        ({"reg_tokens": 1}, "does not support ['reg_tokens']"),
        ({"no_embed_class": True}, "does not support ['no_embed_class']"),
        ({"dynamic_img_size": True}, "does not support ['dynamic_img_size']"),
        ({"global_pool": "map"}, "does not support [\"global_pool='map'/'prr'\"]"),
        ({"patch_drop_rate": 0.1}, "does not support ['patch_drop_rate > 0']"),
        ({"class_token": False, "global_pool": "avg"}, "expected a timm VisionTransformer with a class token, "
                                                       "missing ['cls_token']"),
    ],
    ids=["reg_tokens", "no_embed_class", "dynamic_img_size", "map-pool", "patch_drop", "no-class-token"],
)
def test_rejected_timm_variants(timm_kwargs: dict, message: str) -> None:
    """Every ViT variant the L2P layout (docs/behaviour.md §5) cannot hold is refused with its name, by the
    constructor and through from_timm."""
    with pytest.raises(ValueError, match=re.escape(f"model: {message}" if "missing" in message else message)):
        make(vit=tiny_vit(**timm_kwargs))
    with pytest.raises(ValueError, match=re.escape(message)):
        L2PViT(tiny_vit(**timm_kwargs))


def test_rejected_models_and_options() -> None:
    with pytest.raises(ValueError, match=re.escape("missing ['patch_embed', 'cls_token', 'pos_embed', 'blocks'")):
        L2PViT(torch.nn.Linear(2, 2))
    vit = tiny_vit()
    vit.pos_embed = torch.nn.Parameter(vit.pos_embed[:, :-1].detach().clone())
    with pytest.raises(ValueError, match=re.escape("pos_embed has 64 rows, expected 1 + 64")):
        L2PViT(vit)
    with pytest.raises(ValueError, match=re.escape("timm_kwargs=['depth']")):
        L2PViT.from_timm(tiny_vit(), depth=1)
    with pytest.raises(ValueError, match="final_tokens"):
        L2PViT.from_timm(tiny_vit(), final_tokens="cls")


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="head_type"):
        make(head_type="cls")
    with pytest.raises(ValueError, match="pretrained"):
        L2PViT.from_timm(tiny_vit(), pretrained=True)
    with pytest.raises(TypeError, match="model_or_name"):
        L2PViT.from_timm(3)
    model = make()
    with pytest.raises(ValueError, match="x: expected"):
        model(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="cls_features"):
        model(images(2), cls_features=torch.randn(3, 64))
