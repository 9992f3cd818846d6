"""``l2p_fast.models.precision``: the choice of precision, its autocast and loss scaler, and the models under it."""

from __future__ import annotations

import pytest
import torch

from l2p_fast.models import precision as P


def test_check_precision_names_the_argument():
    assert P.check_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match=r"precision: expected one of \['fp32', 'bf16', 'fp16', 'auto'\], got 'fp64'"):
        P.check_precision("fp64")


@pytest.mark.parametrize("fast,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_hardware(fast, expected, monkeypatch):
    monkeypatch.setattr(P, "has_fast_bf16", lambda device: fast)
    assert P.resolve_precision("auto", torch.device("cpu")) == expected
    for concrete in ("fp32", "bf16", "fp16"):
        assert P.resolve_precision(concrete, torch.device("cpu")) == concrete


@pytest.mark.parametrize("machine,flags,capability,expected", [
    ("x86_64", {"avx512f", "avx512_bf16"}, "AVX512", True),
    ("x86_64", {"amx_bf16", "amx_tile"}, "AVX512", True),
    ("x86_64", {"avx2", "avx512f"}, "AVX512", False),
    ("x86_64", set(), "AVX512_BF16", True),
    ("aarch64", {"avx512_bf16"}, "DEFAULT", False),
])
def test_cpu_bf16_detection(machine, flags, capability, expected, monkeypatch):
    monkeypatch.setattr(P.platform, "machine", lambda: machine)
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(P.torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert P.cpu_has_fast_bf16() is expected
    assert P.has_fast_bf16(torch.device("cpu")) is expected


def test_autocast_dtypes():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    cpu = torch.device("cpu")
    with P.autocast("fp32", cpu):
        assert (a @ b).dtype == torch.float32
    with P.autocast("bf16", cpu):
        assert (a @ b).dtype == torch.bfloat16
    with P.autocast("fp16", cpu):
        assert (a @ b).dtype == torch.float16
    with pytest.raises(ValueError, match="resolve 'auto'"), P.autocast("auto", cpu):
        pass


def test_grad_scaler_only_for_fp16():
    cpu = torch.device("cpu")
    assert P.grad_scaler("fp16", cpu).is_enabled()
    assert not P.grad_scaler("bf16", cpu).is_enabled() and not P.grad_scaler("fp32", cpu).is_enabled()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_vit_under_autocast_keeps_fp32_where_the_spec_wants_it(backend, precision):
    timm = pytest.importorskip("timm", reason="needs timm (the ViT backbone)")
    from l2p_fast.models import L2PViT

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=16, patch_size=8,
                            depth=2, embed_dim=24, num_heads=2)
    model = L2PViT.from_timm(vit, pool_size=6, top_k=2, length=2, backend=backend, final_tokens="head")
    x = torch.randn(3, 3, 16, 16)
    reference = model(x, train=True)
    with P.autocast(precision, torch.device("cpu")):
        out = model(x, train=True)
        query = model.query(x)
    assert out["logits"].dtype == P.DTYPES[precision]
    assert out["similarity"].dtype == torch.float32 and out["reduce_sim"].dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(query.float(), model.query(x), dim=-1).min() > 0.99
    torch.testing.assert_close(out["logits"].float(), reference["logits"], rtol=0.1, atol=0.1)
    (out["logits"].float().sum() - out["reduce_sim"]).backward()
    for p in model.trainable_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
