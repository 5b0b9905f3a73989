"""Bad input through the real command line: every mistake ends with exit code 2 (or argparse's
usage error), one line on stderr that says what was wrong, no traceback, and no existing file
changed.

Each case runs `tinygrad_llm.train.cli.main` in this process (the same parser and error handling
as the installed command); the last tests start the real `tinygrad-llm` entry point.
"""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from tinygrad_llm import backend
from tinygrad_llm.loading import save_model
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.tokenizer import CharTokenizer
from tinygrad_llm.train.cli import main

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--context-length", "16",
        "--batch-size", "2", "--eval-interval", "2", "--eval-batches", "1", "--sample-tokens", "3",
        "--warmup", "1", "--quiet"]
CHARS = CharTokenizer("abcdefghijklmnopqrstuvwxyz .")


def snapshot(folder) -> dict:
    """Path -> content hash of every file below ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, a finished pretraining run and a base checkpoint, made once."""
    root = tmp_path_factory.mktemp("world")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 30)
    assert main(["pretrain", "--data", str(corpus), "--out", str(root / "run"), "--steps", "4",
                 *TINY]) == 0
    backend.manual_seed(0)
    save_model(root / "base", GPT(GPTConfig(vocab_size=CHARS.vocab_size, context_length=16,
                                            n_layer=1, n_head=2, n_embd=16)), CHARS)
    return root


def fails_cleanly(argv, capsys, root, expected: str, code: int = 2) -> str:
    """Run the command; assert its exit code, a one-line message, and that nothing changed."""
    before = snapshot(root)
    try:
        result = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        result = exit_.code
    captured = capsys.readouterr()
    assert result == code, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err
    assert expected in lines[-1], captured.err
    assert len(lines[-1]) < 400  # one readable line, not a dump
    assert snapshot(root) == before
    return lines[-1]


# ---------------------------------------------------------------- data loss
def test_rerunning_into_a_run_folder_is_refused_without_resume_or_overwrite(world, capsys):
    fails_cleanly(["pretrain", "--data", str(world / "corpus"), "--out", str(world / "run"),
                   "--steps", "2", *TINY], capsys, world, "already holds a run")


def test_overwrite_replaces_the_run(world, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(world / "corpus"), "--out", str(out), *TINY]
    assert main([*args, "--steps", "4"]) == 0
    assert main([*args, "--steps", "2", "--overwrite"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]  # a fresh log, not 2, 4, 2


def test_a_finetune_cannot_write_over_its_own_base(world, capsys):
    fails_cleanly(["finetune-classifier", "--checkpoint", str(world / "base"), "--out",
                   str(world / "base")], capsys, world, "is or contains the input")
    fails_cleanly(["pretrain", "--init-from", str(world / "run" / "checkpoint"), "--out",
                   str(world / "run"), "--overwrite", *TINY], capsys, world,
                  "is or contains the input")


def test_resume_restores_the_run_and_refuses_contradicting_flags(world, capsys):
    for flag, value in (("--lr", "0.5"), ("--batch-size", "3"), ("--n-layer", "2"),
                        ("--data", "/elsewhere"), ("--eval-interval", "3")):
        fails_cleanly(["pretrain", "--out", str(world / "run"), "--resume", flag, value,
                       "--quiet"], capsys, world, f"{flag} {value}" if flag != "--n-layer"
                      else "--n-layer")
    fails_cleanly(["pretrain", "--out", str(world / "run"), "--resume", "--steps", "3",
                   "--quiet"], capsys, world, "already at step 4")


def test_resume_without_flags_continues_the_same_run(world, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(world / "run", out)
    assert main(["pretrain", "--out", str(out), "--resume", "--steps", "6", "--quiet"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["run"]["data"] == str(world / "corpus")  # found again without --data
    assert config["train"]["batch_size"] == 2 and config["train"]["max_steps"] == 6


# ------------------------------------------------------- wrong results with exit 0
@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0"], "--top-p"), (["--top-p", "-1"], "--top-p"),
    (["--temperature", "nan"], "--temperature"), (["--top-k", "0"], "--top-k"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--prompt", ""], "--prompt"),
])
def test_generate_refuses_settings_that_would_print_garbage(world, capsys, flags, message):
    fails_cleanly(["generate", "--checkpoint", str(world / "run"), *flags], capsys, world,
                  message)


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr"), (["--eval-batches", "0"], "--eval-batches"),
    (["--steps", "0"], "--steps"), (["--batch-size", "-4"], "--batch-size"),
    (["--dropout", "1"], "--dropout"), (["--val-fraction", "0"], "--val-fraction"),
])
def test_pretrain_refuses_out_of_range_numbers_at_parse_time(world, tmp_path, capsys, flags,
                                                             message):
    fails_cleanly(["pretrain", "--out", str(tmp_path / "new"), *flags], capsys, world, message)
    assert not (tmp_path / "new").exists()


def test_a_checkpoint_with_nan_weights_is_refused_by_every_command(world, tmp_path, capsys):
    import shutil

    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(world / "run" / "checkpoint", bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["wte.weight"][0, 0] = np.nan
    save_file(weights, str(bad / "model.safetensors"))
    fails_cleanly(["generate", "--checkpoint", str(bad)], capsys, tmp_path, "NaN")
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    shutil.rmtree(run / "checkpoint")
    shutil.copytree(bad, run / "checkpoint")
    fails_cleanly(["pretrain", "--out", str(run), "--resume", "--steps", "6", "--quiet"], capsys,
                  tmp_path, "NaN")


def test_a_classifier_needs_two_classes(world, tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"text": "abc " * i, "label": "x"}) + "\n"
                            for i in range(1, 40)))
    fails_cleanly(["finetune-classifier", "--checkpoint", str(world / "base"), "--out",
                   str(tmp_path / "clf"), "--data", str(data)], capsys, world, "single label")


# ------------------------------------------------------------- one-line errors
def test_one_line_errors(world, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    fails_cleanly(["pretrain", "--data", str(short), "--out", str(tmp_path / "s"), *TINY],
                  capsys, world, "training split")
    fails_cleanly(["generate", "--checkpoint", str(world / "run"), "--device", "cuda"]
                  if not backend.cuda_available() else ["generate", "--checkpoint", "nowhere"],
                  capsys, world, "CuPy" if not backend.cuda_available() else "does not exist")
    fails_cleanly(["pretrain", "--out", str(world / "base"), "--resume", "--quiet"], capsys,
                  world, "no checkpoint")
    (tmp_path / "file").write_text("x")
    fails_cleanly(["download", "gpt2", "--out", str(tmp_path / "file")], capsys, tmp_path,
                  "is a file")
    chars = tmp_path / "chars.jsonl"
    chars.write_text("".join(json.dumps({"text": "ABC#" * i, "label": str(i % 2)}) + "\n"
                             for i in range(1, 40)))
    fails_cleanly(["finetune-classifier", "--checkpoint", str(world / "base"), "--out",
                   str(tmp_path / "clf"), "--data", str(chars)], capsys, world,
                  "not in this character tokenizer's vocabulary")


def test_a_damaged_config_is_one_line(world, tmp_path, capsys):
    import shutil

    for damage, message in ((lambda c: c["model"].pop("n_embd"), "'n_embd' is missing"),
                            (lambda c: c.update(model=[1, 2]), "should be a JSON object"),
                            (lambda c: c["model"].update(n_layer="two"), "positive int")):
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(world / "base", bad)
        config = json.loads((bad / "config.json").read_text())
        damage(config)
        (bad / "config.json").write_text(json.dumps(config))
        fails_cleanly(["generate", "--checkpoint", str(bad)], capsys, tmp_path, message)


def test_a_shape_mismatch_names_the_tensor_and_both_shapes_in_one_line(world, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(world / "base", bad)
    config = json.loads((bad / "config.json").read_text())
    config["model"]["n_embd"] = 32
    (bad / "config.json").write_text(json.dumps(config))
    line = fails_cleanly(["generate", "--checkpoint", str(bad)], capsys, tmp_path,
                         "shape mismatch")
    assert "wte.weight" in line and "(28, 16)" in line and "(28, 32)" in line


def test_help_shows_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no line breaks inside the defaults
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for default in ("(default: 0.001)", "(default: 2000)", "(default: 0.0001)",
                    "(default: 100)", "(default: 250)"):
        assert default in text
    assert "restores" in text  # --resume says what it restores


# ------------------------------------------------------------- the real command
def test_the_installed_command_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    command = [sys.executable, "-m", "tinygrad_llm.train.cli", "generate", "--checkpoint",
               str(tmp_path / "nowhere")]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().startswith("error:") and "does not exist" in plain.stderr
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_second_ctrl_c_ends_at_once_with_one_line(capsys):
    from tinygrad_llm.train.cli import execute

    def interrupted(args):
        raise KeyboardInterrupt  # what the trainer's handler raises on the second Ctrl-C

    class Args:
        debug = False

    assert execute(interrupted, Args()) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "last checkpoint, which is intact" in err


def test_every_flag_of_every_command_is_explained():
    import argparse

    from tinygrad_llm.train.cli import COMMANDS, add_common_arguments

    for name, (module, _) in COMMANDS.items():
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        add_common_arguments(parser)
        parsers = [parser]
        for action in parser._actions:
            if isinstance(action.choices, dict):  # sub-commands (evaluate mc ...): their flags
                parsers += list(action.choices.values())
        for each in parsers:
            silent = [a.dest for a in each._actions if not a.help]
            assert not silent, f"{name} ({each.prog}): no help for {silent}"


def test_a_tokenizer_that_does_not_fit_the_model_and_resuming_a_classifier(world, tmp_path,
                                                                            capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(world / "base", bad)
    config = json.loads((bad / "config.json").read_text())
    config["tokenizer"]["chars"] += "0123456789"  # 38 characters for a 28-token model
    (bad / "config.json").write_text(json.dumps(config))
    fails_cleanly(["generate", "--checkpoint", str(bad)], capsys, tmp_path, "38 tokens")
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"text": "abc " * i, "label": str(i % 2)}) + "\n"
                            for i in range(1, 60)))
    assert main(["finetune-classifier", "--checkpoint", str(world / "base"), "--out",
                 str(tmp_path / "clf"), "--data", str(data), "--epochs", "1"]) == 0
    capsys.readouterr()
    fails_cleanly(["pretrain", "--out", str(tmp_path / "clf"), "--resume", "--quiet"], capsys,
                  tmp_path, "holds a classifier")


def test_an_output_inside_an_input_folder_is_refused(world, capsys):
    fails_cleanly(["finetune-classifier", "--checkpoint", str(world / "base"), "--out",
                   str(world / "base" / "clf")], capsys, world, "inside the input folder")
