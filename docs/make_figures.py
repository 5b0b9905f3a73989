"""The book's figures, and the numbers its pages quote, made from real runs.

    pip install -e ".[plot]"
    python docs/make_figures.py      # about an hour on a 2-core CPU; finished runs are reused
    python docs/make_figures.py --quick --work /tmp/f --img /tmp/f/img --pages none  # 2 min

1. Runs the README's commands, each once, into --work (default runs/figures): pretrain the
   character model; pretrain a GPT-2-token base; finetune it into a spam classifier, an
   instruction follower and its LoRA twin; DPO on the instruction follower. A run that finished
   (its folder holds ``.figures-done`` with the same command) is reused.
2. Draws docs/img/*.png from their metrics and checkpoints, and computes the tables the pages
   show (the BPE walk-through, sampling distributions, samples, the arena).
3. Writes docs/img/figures.json ({key: text}) and puts each value into the pages that quote it,
   between ``<!--fig:KEY-->`` and ``<!--/fig-->`` (tests/test_docs.py checks they agree).

``--quick`` runs every command on a few dozen examples and a few steps (what the tests do to
check that this script still works); its numbers mean nothing, so give it other --img/--pages.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from tinygrad_llm import tokenizer as tokenizers  # noqa: E402
from tinygrad_llm.finetune.classification import SPAM_DATA as SMS_SPAM  # noqa: E402
from tinygrad_llm.finetune.dpo import PREFERENCE_DATA  # noqa: E402
from tinygrad_llm.finetune.instruction import INSTRUCTION_DATA  # noqa: E402

# ------------------------------------------------------------------------------ the runs
# name -> the command after `tinygrad-llm` ({work} is the runs folder), as the README gives it
RUNS = {
    "char": "pretrain --out {work}/char",
    "base": "pretrain --tokenizer gpt2 --context-length 128 --batch-size 6 --out {work}/base",
    "spam": "finetune-classifier --checkpoint {work}/base --out {work}/spam",
    "sft": "finetune-instruct --checkpoint {work}/base --out {work}/sft",
    "lora": "finetune-instruct --checkpoint {work}/base --out {work}/lora --lora-rank 16 "
            "--lora-targets c_attn,c_proj,c_fc,lm_head --lr 2e-3",
    "dpo": "finetune-dpo --checkpoint {work}/sft --out {work}/dpo",
}
# what --quick (and tests/test_docs.py) appends to each command: argparse keeps the last value
SHORTER = {
    "pretrain": "--steps 6 --eval-interval 3 --eval-batches 1 --sample-tokens 16 --batch-size 4",
    "finetune-classifier": "--epochs 1 --data {small}/spam.tsv",
    "finetune-instruct": "--epochs 1 --data {small}/instructions.json --max-new-tokens 8",
    "finetune-dpo": "--data {small}/preferences.json --max-new-tokens 8",
    "generate": "--max-new-tokens 16",
    "chat": "--max-new-tokens 16",
    "evaluate mc": "--limit 8",
}


def small_inputs(directory) -> Path:
    """A few dozen examples of each bundled data set, for runs that only check commands work:
    spam.tsv (20 spam, 20 ham), instructions.json and preferences.json (40 each)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = SMS_SPAM.read_text(encoding="utf-8").splitlines()
    spam = [line for line in lines if line.startswith("spam\t")][:20]
    ham = [line for line in lines if line.startswith("ham\t")][:20]
    (directory / "spam.tsv").write_text("\n".join(["label\ttext"] + spam + ham) + "\n",
                                        encoding="utf-8")
    for source, name in ((INSTRUCTION_DATA, "instructions.json"),
                         (PREFERENCE_DATA, "preferences.json")):
        records = json.loads(Path(source).read_text(encoding="utf-8"))[:40]
        (directory / name).write_text(json.dumps(records, indent=1), encoding="utf-8")
    return directory


def shorten(argv: list[str], small) -> list[str]:
    """``argv`` (a tinygrad-llm command line, without the program) with SHORTER's flags for its
    command appended."""
    command = " ".join(argv[:2]) if argv[0] == "evaluate" else argv[0]
    extra = shlex.split(SHORTER.get(command, "").format(small=small))
    if "--data" in argv and "--data" in extra:  # the command's own data is kept
        at = extra.index("--data")
        del extra[at:at + 2]
    return argv + extra


def run_all(work: Path, quick: bool) -> None:
    work.mkdir(parents=True, exist_ok=True)
    small = small_inputs(work / "small") if quick else None
    for name, command in RUNS.items():
        argv = shlex.split(command.format(work=work))
        if quick:
            argv = shorten(argv, small)
        done = work / name / ".figures-done"
        if done.exists() and done.read_text() == shlex.join(argv):
            print(f"{name}: reusing {work / name}", file=sys.stderr)
            continue
        print(f"{name}: tinygrad-llm {shlex.join(argv)}", file=sys.stderr)
        with open(work / f"{name}.log", "w") as log:
            result = subprocess.run([sys.executable, "-m", "tinygrad_llm.train.cli", *argv,
                                     "--overwrite"], stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            sys.exit(f"{name} failed (exit {result.returncode}); see {work / name}.log")
        done.write_text(shlex.join(argv))


# ----------------------------------------------------------------------------- helpers
def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def summary(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3,
                         "font.size": 10})
    return plt


def curves(ax, records, keys, labels=None, ylabel=""):
    steps = [r["step"] for r in records]
    for key, label in zip(keys, labels or keys, strict=True):
        ax.plot(steps, [r[key] for r in records], marker="o" if len(steps) < 30 else None,
                markersize=3, label=label)
    ax.set(xlabel="step", ylabel=ylabel)
    ax.legend()


def save(plt, figure, path, dpi=None) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)


def cli(*argv: str) -> str:
    """What ``tinygrad-llm ARGV...`` prints, run as a user would (an error stops the script)."""
    return subprocess.run([sys.executable, "-m", "tinygrad_llm.train.cli", *argv],
                          capture_output=True, text=True, check=True).stdout


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ figures
def pretraining(work, img, plt, fig) -> None:
    char, base = metrics(work / "char"), metrics(work / "base")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    curves(axes[0], char, ["train_loss", "val_loss"], ["train", "validation"],
           "cross-entropy (nats per character)")
    axes[0].set_title("character model (tinygrad-llm pretrain)")
    curves(axes[1], base, ["train_loss", "val_loss"], ["train", "validation"],
           "cross-entropy (nats per GPT-2 token)")
    axes[1].set_title("GPT-2-token base (--tokenizer gpt2 --context-length 128)")
    save(plt, figure, img / "pretraining-loss.png")
    fig["char.table"] = table(["step", "train loss", "validation loss"],
                              [[r["step"], f"{r['train_loss']:.3f}", f"{r['val_loss']:.3f}"]
                               for r in char if r["step"] % 500 == 0 or r is char[-1]])
    fig["char.steps"] = f"{char[-1]['step']:,}"
    fig["char.val_loss"] = f"{char[-1]['val_loss']:.3f}"
    fig["char.perplexity"] = f"{math.exp(char[-1]['val_loss']):.1f}"
    fig["base.val_loss"] = f"{base[-1]['val_loss']:.2f}"
    fig["base.steps"] = f"{base[-1]['step']:,}"
    # the schedule those runs used, and what the loop logged at each evaluation
    from tinygrad_llm.optim import cosine_schedule
    from tinygrad_llm.trainer import TrainConfig

    c = TrainConfig()  # pretraining's defaults
    steps = np.arange(c.max_steps)
    figure, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [cosine_schedule(int(s), c.learning_rate, c.min_lr, c.warmup_steps,
                                    c.max_steps) for s in steps], label="cosine_schedule")
    if char[-1]["step"] == c.max_steps:
        ax.plot([r["step"] for r in char], [r["lr"] for r in char], "o", markersize=4,
                label="logged by tinygrad-llm pretrain")
    ax.axvline(c.warmup_steps, color="gray", linestyle=":", label=f"end of warmup "
                                                                   f"({c.warmup_steps})")
    ax.set(xlabel="step", ylabel="learning rate")
    ax.legend()
    save(plt, figure, img / "lr-schedule.png")


def classification(work, img, plt, fig) -> None:
    records, result = metrics(work / "spam"), summary(work / "spam")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    curves(axes[0], records, ["train_loss", "val_loss"], ["train", "validation"],
           "cross-entropy")
    curves(axes[1], records, ["train_accuracy", "val_accuracy"], ["train", "validation"],
           "accuracy")
    figure.suptitle("finetune-classifier on the SMS Spam Collection (balanced)")
    save(plt, figure, img / "classification.png")
    fig["spam.test_accuracy"] = f"{result['test_accuracy']:.4f}"
    fig["spam.val_accuracy"] = f"{result['val_accuracy']:.4f}"
    fig["spam.best_epoch"] = str(result["best_epoch"])
    for name in ("precision", "recall", "f1"):
        fig[f"spam.{name}"] = f"{result[f'test_{name}']:.3f}"
    fig["spam.confusion"] = str(result["test_confusion_matrix"])
    line = cli("classify", "--checkpoint", str(work / "spam"),
               "WINNER!! Claim your free prize, call 09061701461").strip()
    fig["spam.classify"] = f"`{line}`"
    fig["spam.epochs"] = str(records[-1]["epoch"])


def instruction(work, img, plt, fig) -> None:
    sft, lora = metrics(work / "sft"), metrics(work / "lora")
    s, lo = summary(work / "sft"), summary(work / "lora")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    curves(axes[0], sft, ["train_loss", "val_loss"], ["train", "validation"], "cross-entropy")
    axes[0].set_title(f"full finetuning ({s['trainable_params'] / 1e6:.1f}M trained)")
    curves(axes[1], lora, ["train_loss", "val_loss"], ["train", "validation"])
    axes[1].set_title(f"LoRA rank 16 ({lo['trainable_params'] / 1e6:.2f}M trained)")
    save(plt, figure, img / "instruction.png")
    fig["sft.initial_test_loss"] = f"{s['initial_test_loss']:.2f}"
    fig["sft.test_loss"] = f"{s['test_loss']:.2f}"
    fig["sft.well_formed"] = f"{round(s['well_formed_rate'] * s['splits']['test'])}"
    fig["sft.n_test"] = str(s["splits"]["test"])
    fig["lora.test_loss"] = f"{lo['test_loss']:.2f}"
    fig["lora.percent"] = f"{100 * lo['trainable_params'] / lo['total_params']:.0f}%"
    records = metrics(work / "dpo")
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    curves(axes[0], records, ["train_loss", "val_loss"], ["train", "validation"], "DPO loss")
    curves(axes[1], records, ["train_reward_margin", "val_reward_margin"],
           ["train", "validation"], "reward margin (chosen - rejected)")
    curves(axes[2], records, ["train_reward_accuracy", "val_reward_accuracy"],
           ["train", "validation"], "reward accuracy")
    figure.suptitle("finetune-dpo on the instruction follower")
    save(plt, figure, img / "dpo.png")
    fig["dpo.val_reward_accuracy"] = f"{records[-1]['val_reward_accuracy']:.2f}"
    fig["dpo.val_reward_margin"] = f"{records[-1]['val_reward_margin']:.2f}"


def attention_weights(model, ids) -> np.ndarray:
    """Every head's attention weights on ``ids``: (n_layer, n_head, T, T), recomputed from the
    model's own layers (the forward pass does not keep them)."""
    from tinygrad_llm.tensor import no_grad

    config = model.config
    T, H = len(ids), config.n_head
    D = config.n_embd // H
    maps = []
    with no_grad():
        x = model.wte(np.array([ids])) + model.wpe(np.arange(T))  # (1, T, C)
        for block in model.h:
            qkv = block.attn.c_attn(block.ln_1(x)).data.reshape(T, 3, H, D)  # (T, 3, H, D)
            q, k = qkv[:, 0].transpose(1, 0, 2), qkv[:, 1].transpose(1, 0, 2)  # (H, T, D)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(D)  # (H, T, T)
            scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)  # causal mask
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            maps.append(weights / weights.sum(-1, keepdims=True))
            x = block(x)
    return np.stack(maps)


def attention(work, img, plt, fig) -> None:
    from tinygrad_llm.loading import load_model

    model, tokenizer, _ = load_model(work / "char" / "checkpoint")
    model.eval()
    line = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    ids = tokenizer.encode(line)[:model.config.context_length]
    maps = attention_weights(model, ids)
    labels = ["\\n" if ch == "\n" else ("␣" if ch == " " else ch) for ch in line[:len(ids)]]
    layers = [0, len(maps) - 1]
    heads = maps.shape[1]
    figure, axes = plt.subplots(len(layers), heads, figsize=(4.2 * heads, 4.4 * len(layers)))
    for row, layer in enumerate(layers):
        for head in range(heads):
            ax = axes[row, head]
            ax.imshow(maps[layer, head], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
            ax.set_xticks(range(len(labels)), labels, fontsize=5)
            ax.set_yticks(range(len(labels)), labels, fontsize=5)
            ax.grid(False)
    figure.supxlabel("key (the position attended to)")
    figure.supylabel("query (the position attending)")
    save(plt, figure, img / "attention.png", dpi=110)
    # what each head does, in three numbers averaged over the query positions
    T = len(ids)
    back = np.maximum(0, np.arange(T)[:, None] - np.arange(T)[None, :])  # (T, T) distances
    rows = []
    for layer in layers:
        for head in range(heads):
            w = maps[layer, head]
            rows.append([layer, head, f"{np.diag(w).mean():.2f}",
                         f"{np.diag(w, -1).mean():.2f}", f"{(w * back).sum(1).mean():.1f}"])
    fig["attention.heads"] = table(["layer", "head", "weight on itself",
                                    "weight on the previous character",
                                    "mean distance looked back (characters)"], rows)
    fig["attention.line_length"] = str(len(ids))


def block_diagram(work, img, plt, fig) -> None:
    from tinygrad_llm.loading import load_model

    model, tokenizer, _ = load_model(work / "char" / "checkpoint")
    c = model.config
    B, T, C, H, V = 12, c.context_length, c.n_embd, c.n_head, c.vocab_size
    D = C // H
    steps = [
        ("ids", f"({B}, {T}) integers"),
        ("wte[ids] + wpe[0..T-1]", f"({B}, {T}, {C})"),
        ("LayerNorm ln_1", f"({B}, {T}, {C})"),
        ("c_attn: x @ W + b -> q, k, v", f"({B}, {T}, {3 * C}) -> 3 x ({B}, {H}, {T}, {D})"),
        ("softmax(q k^T / sqrt(D) + mask) v", f"scores ({B}, {H}, {T}, {T}) -> ({B}, {H}, {T}, "
                                             f"{D})"),
        ("heads side by side, c_proj; x + ...", f"({B}, {T}, {C})"),
        ("LayerNorm ln_2", f"({B}, {T}, {C})"),
        ("c_fc, GELU", f"({B}, {T}, {4 * C})"),
        ("c_proj; x + ...", f"({B}, {T}, {C})"),
        ("LayerNorm ln_f", f"({B}, {T}, {C})"),
        ("LM head", f"({B}, {T}, {V}) logits"),
    ]
    figure, ax = plt.subplots(figsize=(8, 9))
    ax.set_axis_off()
    n = len(steps)
    for i, (what, shape) in enumerate(steps):
        y = n - i
        inside = 2 <= i <= 8
        ax.add_patch(plt.Rectangle((0.05, y - 0.35), 0.55, 0.7, facecolor="#dbe9f6" if inside
                                   else "#eeeeee", edgecolor="black"))
        ax.text(0.325, y, what, ha="center", va="center", fontsize=9)
        ax.text(0.68, y, shape, ha="left", va="center", fontsize=8.5, family="monospace")
        if i:
            ax.annotate("", (0.325, y + 0.35), (0.325, y + 0.65),
                        arrowprops={"arrowstyle": "->"})
    ax.add_patch(plt.Rectangle((0.02, n - 8.5), 0.61, 7.0, fill=False, linestyle="--"))
    ax.text(0.0, n - 5, f"block x {c.n_layer}", rotation=90, ha="right", va="center")
    ax.set_xlim(-0.08, 1.15)
    ax.set_ylim(0.3, n + 0.7)
    ax.set_title(f"the default model: {c.n_layer} layers, {H} heads, C={C}, T={T}, vocab {V}; "
                 f"batch {B}", fontsize=10)
    save(plt, figure, img / "gpt-block.png")
    fig["char.params"] = f"{model.num_params():,}"


def sampling(work, img, plt, fig) -> None:
    from tinygrad_llm.generate import next_token_distribution

    words = ["the", "a", "his", "my", "thy"]
    logits = np.array([[2.0, 1.5, 1.0, 0.0, -1.0]])
    rows = []
    for label, kwargs in (("temperature 0.5", {"temperature": 0.5}),
                          ("temperature 1", {}), ("temperature 2", {"temperature": 2.0}),
                          ("top-k 2", {"top_k": 2}), ("top-p 0.8", {"top_p": 0.8}),
                          ("temperature 0 (greedy)", {"temperature": 0})):
        probs = next_token_distribution(logits, **kwargs)[0]
        rows.append([label] + [f"{p:.3f}" for p in probs])
    fig["sampling.table"] = table(["", *[f"`{w}` (logit {x:g})" for w, x in
                                         zip(words, logits[0], strict=True)]], rows)
    samples = []
    for temperature in ("0.5", "1.0", "1.5"):  # the command itself, as the page shows it
        text = cli("generate", "--checkpoint", str(work / "char" / "checkpoint"), "--prompt",
                   "ROMEO:", "--temperature", temperature, "--seed", "1",
                   "--max-new-tokens", "120")
        samples.append(f"--- temperature {temperature} ---\n{text.rstrip()}")
    fig["sampling.samples"] = "```text\n" + "\n".join(samples) + "\n```"


def bpe_example(work, img, plt, fig) -> None:
    from tinygrad_llm.tokenizer import bpe_steps

    steps = bpe_steps("unbelievable")
    rows = [[i, " ".join(f"`{p}`" for p in parts), f"`{pair[0]}` + `{pair[1]}`" if pair else "",
             rank if rank is not None else "(no pair has a rank: done)"]
            for i, (parts, pair, rank) in enumerate(steps)]
    fig["bpe.table"] = table(["step", "pieces", "merge with the lowest rank", "its rank"], rows)
    tok = tokenizers.GPT2Tokenizer()
    fig["bpe.ids"] = str(tok.encode("unbelievable"))


def arena(work, img, plt, fig) -> None:
    """The four models answer the same 110 held-out instructions (greedy); each pair is judged
    on every instruction in both orders by a judge that prefers the answer whose words overlap
    the reference answer more (token F1) -- no LLM endpoint is reachable here."""
    from tinygrad_llm.evaluate import arena as arena_module
    from tinygrad_llm.evaluate.judge import PAIRWISE_PROMPT, align_responses, format_input
    from tinygrad_llm.finetune.instruction import (
        get_template,
        load_instruction_data,
        respond,
        split_examples,
    )
    from tinygrad_llm.loading import load_model

    test = split_examples(load_instruction_data(INSTRUCTION_DATA), seed=123)["test"]
    if (work / "small").exists():  # --quick: the runs saw the small data set
        test = split_examples(load_instruction_data(work / "small" / "instructions.json"),
                              seed=123)["test"]
    names, runs = ["base", "sft", "lora", "dpo"], []
    for name in names:
        cached = work / f"arena-{name}.jsonl"
        if not cached.exists():
            model, tokenizer, _ = load_model(work / name / "checkpoint")
            model.eval()
            answers = respond(model, tokenizer, get_template("alpaca"), test, 64)
            cached.write_text("".join(json.dumps(a) + "\n" for a in answers))
        runs.append([json.loads(line) for line in cached.read_text().splitlines()])
    aligned = align_responses(runs)

    def f1(answer: str, reference: str) -> float:
        a, r = re.findall(r"\w+", answer.lower()), re.findall(r"\w+", reference.lower())
        common = sum(min(a.count(w), r.count(w)) for w in set(a))
        return 0.0 if not common else 2 * common / (len(a) + len(r))

    verdicts = {}
    for record, answers in aligned:
        for first in answers:
            for second in answers:
                prompt = PAIRWISE_PROMPT.format(prompt=format_input(record),
                                                output=record["output"], a=first, b=second)
                gap = f1(first, record["output"]) - f1(second, record["output"])
                verdicts[prompt] = "A" if gap > 0.05 else "B" if gap < -0.05 else "tie"

    records = arena_module.judge_all_pairs(lambda messages: verdicts[messages[0]["content"]],
                                           names, aligned, concurrency=1)
    board = arena_module.leaderboard(records, names, seed=0)
    arena_module.plot_leaderboard(board, img / "arena.png")
    fig["arena.table"] = table(
        ["rank", "model", "Bradley-Terry (95% interval)", "Elo", "wins / ties / losses"],
        [[r["rank"], r["model"], f"{r['bradley_terry']:.0f} ({r['bradley_terry_ci'][0]:.0f} to "
          f"{r['bradley_terry_ci'][1]:.0f})", f"{r['elo']:.0f}",
          f"{r['wins']} / {r['ties']} / {r['losses']}"] for r in board["models"]])
    fig["arena.instructions"] = str(len(aligned))


def backward_graph(work, img, plt, fig) -> None:
    """The worked example of docs/autograd.md: L = (x w + b) x, values and gradients from the
    engine itself."""
    from tinygrad_llm.tensor import Tensor

    x, w, b = (Tensor(np.array(v), requires_grad=True) for v in (1.5, -2.0, 0.5))
    u = x * w
    z = u + b
    loss = z * x
    loss.backward()
    grads = {"x": x.grad, "w": w.grad, "b": b.grad, "L": 1.0}

    def grad_of(rest, value):  # an inner node's gradient: the rest of the graph from a leaf
        leaf = Tensor(np.array(value), requires_grad=True)
        rest(leaf).backward()
        return leaf.grad

    grads["z"] = grad_of(lambda t: t * Tensor(x.data), z.data)
    grads["u"] = grad_of(lambda t: (t + Tensor(b.data)) * Tensor(x.data), u.data)
    nodes = {"x": (0, 2, x), "w": (0, 1, w), "b": (1, 0, b), "u": (1, 1.5, u),
             "z": (2, 1, z), "L": (3, 1.5, loss)}
    labels = {"u": "u = x·w", "z": "z = u + b", "L": "L = z·x"}
    edges = [("x", "u"), ("w", "u"), ("u", "z"), ("b", "z"), ("z", "L"), ("x", "L")]
    figure, ax = plt.subplots(figsize=(9, 4))
    ax.set_axis_off()
    for a, c in edges:
        (xa, ya, _), (xc, yc, _) = nodes[a], nodes[c]
        ax.annotate("", (xc - 0.28, yc), (xa + 0.28, ya), arrowprops={"arrowstyle": "->",
                                                                        "color": "gray"})
    for name, (px, py, tensor) in nodes.items():
        ax.add_patch(plt.Rectangle((px - 0.28, py - 0.25), 0.56, 0.5, facecolor="#dbe9f6",
                                   edgecolor="black"))
        ax.text(px, py + 0.08, labels.get(name, name) + f" = {float(tensor.data):g}",
                ha="center", va="center", fontsize=9)
        ax.text(px, py - 0.12, f"dL/d{name} = {float(grads[name]):g}", ha="center",
                va="center", fontsize=9, color="#b03030")
    ax.set_xlim(-0.5, 3.5)
    ax.set_ylim(-0.5, 2.5)
    ax.set_title("forward values (black), gradients from backward (red); x feeds two nodes, "
                 "so its gradient is a sum", fontsize=9)
    save(plt, figure, img / "backward-graph.png")


def pretrained_table(work, img, plt, fig) -> None:
    """The tensors of GPT-2 124M as this project names and shapes them (its own preset, random
    weights: the same names and shapes as OpenAI's checkpoint)."""
    from tinygrad_llm.models.gpt import GPT, preset

    model = GPT(preset("gpt2"))
    rows, seen = [], set()
    for name, p in model.named_parameters():
        generic = re.sub(r"^h\.\d+\.", "h.N.", name)
        if generic in seen:
            continue
        seen.add(generic)
        count = sum(q.data.size for n, q in model.named_parameters()
                    if re.sub(r"^h\.\d+\.", "h.N.", n) == generic)
        rows.append([f"`{generic}`", " x ".join(map(str, p.shape)), f"{count:,}"])
    rows.append(["total", "", f"{model.num_params():,}"])
    fig["gpt2.parameters"] = table(["tensor (N = 0..11)", "shape", "parameters, all layers"],
                                   rows)


FIGURES = [pretraining, classification, instruction, attention, block_diagram, sampling,
           bpe_example, arena, backward_graph, pretrained_table]

# ------------------------------------------------------------------------------ the pages
MARK = re.compile(r"<!--fig:([\w.]+)-->(.*?)<!--/fig-->", re.S)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def update_pages(paths, values: dict) -> list[str]:
    """Put each value between its markers; returns the keys the pages quote but ``values``
    lacks."""
    missing = []
    for path in paths:
        text = path.read_text(encoding="utf-8")

        def value(match, name=path.name):
            key = match.group(1)
            if key not in values:
                missing.append(f"{name}: {key}")
                return match.group(0)
            body = values[key]
            if "\n" in body:  # a table or a block: on lines of its own
                body = f"\n{body}\n"
            return f"<!--fig:{key}-->{body}<!--/fig-->"

        new = MARK.sub(value, text)
        if new != text:
            path.write_text(new, encoding="utf-8")
    return missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "figures")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--pages", choices=["update", "none"], default="update",
                        help="put the new numbers into README.md and docs/*.md (default)")
    parser.add_argument("--quick", action="store_true",
                        help="a few steps on a few examples: checks the pipeline, not the model")
    parser.add_argument("--runs-only", action="store_true", help="run, draw nothing")
    args = parser.parse_args(argv)
    run_all(args.work, args.quick)
    if args.runs_only:
        return 0
    plt = pyplot()
    args.img.mkdir(parents=True, exist_ok=True)
    fig: dict[str, str] = {}
    for figure in FIGURES:
        print(f"drawing: {figure.__name__}", file=sys.stderr)
        figure(args.work, args.img, plt, fig)
    (args.img / "figures.json").write_text(json.dumps(fig, indent=1, sort_keys=True) + "\n",
                                            encoding="utf-8")
    if args.pages == "update":
        missing = update_pages(pages(), fig)
        if missing:
            print("quoted but not computed: " + ", ".join(missing), file=sys.stderr)
            return 1
    print(f"wrote {len(fig)} values and the figures to {args.img}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
