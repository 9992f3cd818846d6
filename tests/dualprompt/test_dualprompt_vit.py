"""``DualPromptViT`` on a tiny timm ViT against the 8 golden DualPrompt-port cases, block by block, both
E-prompt layouts (the port's checkpoint keys loaded by ``load_port_state_dict``); logits, E-prompt outputs,
loss and the gradients of g_prompt / e_prompt.prompt / e_prompt.prompt_key within rtol 1e-10, atol 1e-12."""

from pathlib import Path

import pytest
import torch

from l2p_fast.models import dualprompt_vit
from l2p_fast.models.dualprompt_vit import DualPromptViT
from l2p_fast.models.vit_rows import block_rows

timm = pytest.importorskip("timm", reason="timm is not installed")

VECTORS = Path(__file__).parents[1] / "vectors" / "dualprompt_vit.pt"
CASES = torch.load(VECTORS, weights_only=True)["cases"]
TOL = {"rtol": 1e-10, "atol": 1e-12}
OPTIONS = (
    "length", "pool_size", "top_k", "embedding_key", "batchwise_prompt", "prompt_init", "prompt_key_init", "head_type",
    "use_prompt_mask", "g_prompt_length", "g_prompt_layer_idx", "use_prefix_tune_for_g_prompt", "e_prompt_layer_idx",
    "use_prefix_tune_for_e_prompt",
)  # fmt: skip


def build(config: dict, layout: str, backend: str = "auto", **extra: object) -> DualPromptViT:
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=config["img_size"], patch_size=config["patch_size"], in_chans=config["in_chans"],
        num_classes=config["num_classes"], global_pool=config["global_pool"], embed_dim=config["embed_dim"],
        depth=config["depth"], num_heads=config["num_heads"], mlp_ratio=config["mlp_ratio"],
        qkv_bias=config["qkv_bias"],
    )  # fmt: skip
    options = {key: config["prompt_length" if key == "length" else key] for key in OPTIONS}
    return DualPromptViT(vit, **options, layout=layout, backend=backend, **extra).double()


@pytest.mark.parametrize("layout", ["permute", "port"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_vit(case: dict, layout: str) -> None:
    check_case(case, layout, "auto")


@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=pytest.mark.requires_backend("triton"))]
)
@pytest.mark.parametrize("index", [0, 2, 5])
def test_golden_vit_backends(index: int, backend: str) -> None:
    check_case(CASES[index], "port", backend)


def check_case(case: dict, layout: str, backend: str) -> None:
    tag = "permute" if layout == "permute" else "upstream"
    model = build(case["config"], layout, backend)
    model.load_port_state_dict({"model": {f"module.{k}": v for k, v in case["state_dict"].items()}})
    model.eval()
    out = model(case["img"], task_id=case["task_id"], cls_features=case["cls_features"], train=case["train"],
                block_outputs=True)  # fmt: skip
    expected = case[f"out_{tag}"]
    assert torch.equal(out["prompt_idx"], expected["prompt_idx"])
    assert torch.equal(out["batched_prompt"], expected["batched_prompt"])
    assert model.total_prompt_len == case["total_prompt_len"]
    for i, (got, want) in enumerate(zip(out["block_outputs"], expected["block_outputs"], strict=True)):
        torch.testing.assert_close(got, want, **TOL, msg=f"block {i}")
    for key in ("x", "pre_logits", "logits", "similarity", "reduce_sim", "selected_key"):
        torch.testing.assert_close(out[key], expected[key], **TOL, msg=key)
    loss = (out["logits"] * case["loss_weight_logits"]).sum() + out["reduce_sim"]
    torch.testing.assert_close(loss, case[f"loss_{tag}"], **TOL)
    loss.backward()
    params = dict(model.named_parameters())
    for key, want in case[f"grad_{tag}"].items():
        got = params[key].grad
        if got is None:
            assert not want.any(), f"grad {key}: None where the port's is non-zero"
        else:
            torch.testing.assert_close(got, want, **TOL, msg=f"grad {key}")


def test_state_dict_keys_are_the_ports() -> None:
    case = CASES[0]
    model = build(case["config"], "permute")
    assert set(model.state_dict()) == set(case["state_dict"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"g_prompt", "e_prompt.prompt", "e_prompt.prompt_key", "head.weight", "head.bias"}


def test_query_is_the_prompt_free_cls() -> None:
    model = build(CASES[0]["config"], "permute")
    model.load_port_state_dict(CASES[0]["state_dict"])
    img = CASES[0]["img"]
    with torch.no_grad():
        want = model.norm(model.blocks(model.embed(img)))[:, 0]
    torch.testing.assert_close(model.query(img), want, rtol=0, atol=0)


def test_bad_configurations_named() -> None:
    config = CASES[0]["config"]
    vit = build(config, "permute")
    with pytest.raises(ValueError, match="e_prompt_layer_idx"):
        build({**config, "e_prompt_layer_idx": [1, 2]}, "permute")
    with pytest.raises(ValueError, match="g_prompt_layer_idx"):
        build({**config, "g_prompt_layer_idx": [0, 9]}, "permute")
    with pytest.raises(ValueError, match="head_type"):
        build({**config, "head_type": "prompt"}, "permute")
    with pytest.raises(ValueError, match="x"):
        vit(torch.randn(2, 3, 8))
    with pytest.raises(TypeError, match="checkpoint"):
        vit.load_port_state_dict({"model": 3})


def test_from_timm_name_and_instance() -> None:
    model = DualPromptViT.from_timm(
        "vit_tiny_patch16_224", num_classes=7, timm_kwargs={"img_size": 32, "depth": 5}, length=2, pool_size=4,
    )  # fmt: skip
    assert model.head.out_features == 7 and model.e_prompt.prompt.shape == (3, 2, 4, 2, 3, 64)
    assert model.g_prompt.shape == (2, 2, 5, 3, 64)
    out = model(torch.rand(2, 3, 32, 32), cls_features=torch.randn(2, 192))
    assert out["logits"].shape == (2, 7)
    with pytest.raises(ValueError, match="pretrained"):
        DualPromptViT.from_timm(model, pretrained=True)


def test_without_g_prompt_and_attention_dropout() -> None:
    config = {**CASES[0]["config"], "g_prompt_layer_idx": []}
    model = build(config, "permute")
    assert model.g_prompt is None
    model.load_port_state_dict({k: v for k, v in CASES[0]["state_dict"].items() if k != "g_prompt"})
    img, cls_features = CASES[0]["img"], CASES[0]["cls_features"]
    model.eval()
    want = model(img, cls_features=cls_features)["logits"]
    for block in model.blocks:
        block.attn.attn_drop.p = 0.5
    torch.testing.assert_close(model(img, cls_features=cls_features)["logits"], want, rtol=0, atol=0)  # eval: no drop
    model.train()
    assert not torch.allclose(model(img, cls_features=cls_features)["logits"], want)  # the port's concat + dropout


@pytest.mark.parametrize("head_type", ["token", "gap"])
@pytest.mark.parametrize("prefix", [True, False], ids=["e-prefix", "e-prompt-tuning"])
def test_final_tokens_head_matches_all(head_type: str, prefix: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``final_tokens='head'`` (the last, plain block on the head's rows only) gives the same logits, pull term and
    gradients as 'all', and ``x`` holds the head's rows of 'all''s ``x``."""
    case = CASES[0]
    config = {**case["config"], "g_prompt_layer_idx": [0], "e_prompt_layer_idx": [1, 2], "head_type": head_type,
              "use_prefix_tune_for_e_prompt": prefix}  # fmt: skip
    assert config["depth"] == 4  # block 3 is plain: the row path runs
    calls = []
    monkeypatch.setattr(dualprompt_vit, "block_rows", lambda *a: calls.append(a[2:]) or block_rows(*a))
    models, outs, grads = {}, {}, {}
    for final in ("all", "head"):
        torch.manual_seed(0)
        models[final] = model = build(config, "permute", final_tokens=final)
        out = model(case["img"], cls_features=case["cls_features"])
        (out["logits"].square().sum() - out["reduce_sim"]).backward()
        outs[final] = out
        grads[final] = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    all_, head = outs["all"], outs["head"]
    assert len(calls) == 1  # only the 'head' model's last block
    torch.testing.assert_close(head["logits"], all_["logits"], **TOL)
    torch.testing.assert_close(head["pre_logits"], all_["pre_logits"], **TOL)
    rows = models["head"]._head_rows(all_["x"].shape[1])
    assert head["x"].shape[1] == (1 if head_type == "token" else all_["x"].shape[1])
    torch.testing.assert_close(head["x"], all_["x"][:, slice(*rows)], **TOL)
    for name, grad in grads["all"].items():
        torch.testing.assert_close(grads["head"][name], grad, **TOL, msg=name)


def test_final_tokens_named() -> None:
    with pytest.raises(ValueError, match="final_tokens"):
        build(CASES[0]["config"], "permute", final_tokens="some")


def test_bf16_autocast_selects_in_fp32() -> None:
    """Under bf16 autocast the E-prompt selection stays fp32 (the same ids and an fp32 pull term), the prefix
    follows q's dtype, and the prompts' gradients are fp32."""
    from l2p_fast.testing import tiny_vit

    model = DualPromptViT.from_timm(tiny_vit(), num_classes=4, g_prompt_layer_idx=(0,), e_prompt_layer_idx=(1,),
                                    pool_size=4, final_tokens="head")
    x = torch.randn(3, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    query = model.query(x)
    want = model(x, cls_features=query)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, cls_features=query)
    assert torch.equal(out["prompt_idx"], want["prompt_idx"]) and out["reduce_sim"].dtype == torch.float32
    assert out["logits"].dtype == torch.bfloat16
    torch.testing.assert_close(out["logits"].float(), want["logits"], rtol=0.1, atol=0.1)
    (out["logits"].float().sum() - out["reduce_sim"]).backward()
    assert model.g_prompt.grad.dtype == model.e_prompt.prompt.grad.dtype == torch.float32
