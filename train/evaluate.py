"""Evaluate a model: perplexity, multiple-choice accuracy, an LLM judge, a pairwise arena.

    tinygrad-llm evaluate perplexity --checkpoint DIR --data FILE_OR_DIR [--stride N]
    tinygrad-llm evaluate mc --checkpoint DIR --data mmlu/validation --out DIR \\
                             [--dev mmlu/dev --shots 5] [--method letter|continuation]
    tinygrad-llm evaluate judge --responses sft/test-responses.jsonl \\
                             --base-url http://localhost:8000/v1 --model NAME --out DIR
    tinygrad-llm evaluate pairwise --responses a.jsonl b.jsonl c.jsonl --names a b c \\
                             --base-url URL --model NAME --out DIR

perplexity prints mean token loss, perplexity and bits per byte (and writes OUT/metrics.json
with --out). mc writes OUT/predictions.jsonl and OUT/metrics.json. judge writes
OUT/scores.jsonl and OUT/metrics.json; pairwise writes OUT/pairwise.jsonl, OUT/leaderboard.json
and, with matplotlib, OUT/leaderboard.png. The judge commands need the openai client
(pip install 'tinygrad_llm[eval]'); the key is read from the --api-key-env variable.
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tinygrad_llm.checkpoint import write_json, write_jsonl
from tinygrad_llm.train.options import (
    HelpFormatter,
    UserError,
    add_device_arguments,
    check_out_folder,
    nonnegative_int,
    positive_float,
    positive_int,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION",
                                  help="perplexity, mc, judge or pairwise")
    sub = {}
    for name, text in (("perplexity", "sliding-window loss, perplexity and bits per byte"),
                       ("mc", "multiple-choice accuracy (MMLU layout)"),
                       ("judge", "score responses 0-100 with an LLM judge"),
                       ("pairwise", "compare models' responses with an LLM judge: win rates, "
                                    "Elo, Bradley-Terry")):
        sub[name] = kinds.add_parser(name, help=text, description=text,
                                     formatter_class=HelpFormatter)
        sub[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show the full traceback of an error (for bug reports)")
        sub[name].add_argument("--quiet", action="store_true", help="no progress bar")
    for name in ("perplexity", "mc"):
        p = sub[name]
        p.add_argument("--checkpoint", required=True,
                       help="a checkpoint or run folder of this project, or a Hugging Face "
                            "GPT-2 folder")
        p.add_argument("--batch-size", type=positive_int, default=4 if name == "perplexity"
                       else 8, help="windows (perplexity) or sequences (mc) per forward pass")
        add_device_arguments(p)
    p = sub["perplexity"]
    p.add_argument("--data", required=True,
                   help="a UTF-8 text file, or a folder whose .txt files are scored one by one")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="tokens between window starts (default: half the context length)")
    p.add_argument("--out", default=None, help="also write OUT/metrics.json")
    p.add_argument("--overwrite", action="store_true", help="replace OUT/metrics.json")
    p = sub["mc"]
    p.add_argument("--data", required=True,
                   help="questions: a .csv (question,A,B,C,D,answer) or .jsonl file, or a folder "
                        "of <subject>_<split>.csv files")
    p.add_argument("--out", required=True, help="folder for predictions.jsonl and metrics.json")
    p.add_argument("--overwrite", action="store_true", help="replace a result --out holds")
    p.add_argument("--dev", default=None,
                   help="solved examples for few-shot prompts (MMLU's dev split)")
    p.add_argument("--shots", type=nonnegative_int, default=0,
                   help="solved examples of the same subject before each question (needs --dev)")
    p.add_argument("--method", choices=("letter", "continuation"), default="letter",
                   help="letter: next-token log-prob of ' A'..' D'; continuation: log-prob of "
                        "each choice's text (acc summed, acc_norm per token)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate only the first N questions (files in name order)")
    for name in ("judge", "pairwise"):
        p = sub[name]
        p.add_argument("--base-url", required=True,
                       help="an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
        p.add_argument("--model", required=True, help="the judge model's name at the endpoint")
        p.add_argument("--out", required=True, help="folder for the results")
        p.add_argument("--overwrite", action="store_true", help="replace results --out holds")
        p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the API key (unset: no key sent)")
        p.add_argument("--concurrency", type=positive_int, default=4,
                       help="judge calls in flight at once")
        p.add_argument("--timeout", type=positive_float, default=60.0,
                       help="seconds to wait for one reply")
        p.add_argument("--retries", type=nonnegative_int, default=3,
                       help="extra attempts after a failed call (waiting 1, 2, 4 ... s)")
        p.add_argument("--seed", type=nonnegative_int, default=0,
                       help="sent to the judge (temperature is 0); also seeds Elo orders and "
                            "the bootstrap")
    sub["judge"].add_argument("--responses", required=True,
                              help="JSONL with instruction, input, output, model_response (e.g. "
                                   "finetune-instruct's test-responses.jsonl)")
    sub["judge"].add_argument("--rubric", choices=("score100", "likert5"), default="score100",
                              help="0-100 against the reference, or 1-5")
    sub["pairwise"].add_argument("--responses", required=True, nargs="+",
                                 help="two or more JSONL files of the same instructions, one "
                                      "per model")
    sub["pairwise"].add_argument("--names", nargs="+", default=None,
                                 help="a name per --responses file (default: the folder names)")


def report(line: str) -> None:
    print(line, file=sys.stderr)


def run(args) -> int:
    return {"perplexity": run_perplexity, "mc": run_mc, "judge": run_judge,
            "pairwise": run_pairwise}[args.evaluation](args)


# ---------------------------------------------------------------------------- perplexity
def read_texts(path) -> list[str]:
    """A text file's contents, or those of each .txt file in a folder (sorted by name)."""
    path = Path(path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not path.exists():
        raise UserError(f"--data {path} does not exist")
    if not files:
        raise UserError(f"--data {path} is a folder without .txt files")
    try:
        return [f.read_text(encoding="utf-8") for f in files]
    except UnicodeDecodeError:
        raise UserError(f"--data {path}: not UTF-8 text") from None


def run_perplexity(args) -> int:
    from tinygrad_llm.evaluate.perplexity import perplexity
    from tinygrad_llm.loading import load_model

    started = time.perf_counter()
    out = None
    if args.out:
        out = check_out_folder(args.out, inputs=[args.checkpoint, args.data],
                               overwrite=args.overwrite, markers=("metrics.json",))
    texts = read_texts(args.data)
    model, tokenizer, _ = load_model(args.checkpoint, args.device)
    if args.stride and args.stride > model.config.context_length:
        raise UserError(f"--stride {args.stride} is longer than the model's context "
                        f"{model.config.context_length}")
    result = perplexity(model, tokenizer, texts, args.stride, args.batch_size,
                        progress=not args.quiet)
    result.update(wall_seconds=time.perf_counter() - started, checkpoint=str(args.checkpoint),
                  data=str(args.data))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", result)
    print(f"loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
          f"{result['bits_per_byte']:.4f} bits/byte over {result['tokens']:,} tokens "
          f"({result['bytes']:,} bytes, {result['windows']} windows of "
          f"{result['context_length']}, stride {result['stride']}); "
          f"{result['wall_seconds']:.1f} s")
    return 0


# ------------------------------------------------------------------------ multiple choice
def run_mc(args) -> int:
    from tinygrad_llm.evaluate.multiple_choice import (
        evaluate_questions,
        load_questions,
        shots_by_subject,
    )
    from tinygrad_llm.loading import load_model

    started = time.perf_counter()
    if args.shots and not args.dev:
        raise UserError("--shots needs --dev: the file or folder the solved examples come from")
    out = check_out_folder(args.out, inputs=[args.checkpoint, args.data, args.dev],
                           overwrite=args.overwrite, markers=("metrics.json", "predictions.jsonl"))
    questions = load_questions(args.data)[:args.limit]
    shots = None
    if args.shots:
        shots = shots_by_subject(load_questions(args.dev), args.shots)
        short = sorted({q.subject for q in questions if len(shots.get(q.subject, [])) < args.shots})
        if short:
            report(f"warning: --dev has fewer than {args.shots} examples for {len(short)} "
                   f"subjects ({', '.join(short[:5])}{' ...' if len(short) > 5 else ''}); "
                   "those questions get fewer shots")
    model, tokenizer, _ = load_model(args.checkpoint, args.device)
    report(f"{len(questions)} questions, {args.shots}-shot, method {args.method}")
    try:
        records, metrics = evaluate_questions(model, tokenizer, questions, shots, args.method,
                                              args.batch_size, progress=not args.quiet)
    except ValueError as error:
        raise UserError(str(error)) from None
    metrics.update(shots=args.shots, wall_seconds=time.perf_counter() - started,
                   checkpoint=str(args.checkpoint), data=str(args.data), limit=args.limit)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "predictions.jsonl", records)
    write_json(out / "metrics.json", metrics)
    norm = f", acc_norm {metrics['acc_norm']:.4f}" if "acc_norm" in metrics else ""
    print(f"accuracy {metrics['accuracy']:.4f} +- {metrics['standard_error']:.4f} over "
          f"{metrics['n']} questions{norm} (random: {metrics['random_baseline']:.4f}); "
          f"{metrics['cut_from_left']} prompts cut to the context; "
          f"{metrics['wall_seconds']:.1f} s. Results in {out}")
    return 0


# ---------------------------------------------------------------------------- the judges
def _chat(args):
    from tinygrad_llm.evaluate.judge import openai_chat

    return openai_chat(args.base_url, args.model, os.environ.get(args.api_key_env),
                       args.timeout, args.seed, max_tokens=16)


def run_judge(args) -> int:
    from tinygrad_llm.evaluate.judge import load_responses, score_responses

    started = time.perf_counter()
    out = check_out_folder(args.out, inputs=[args.responses], overwrite=args.overwrite,
                           markers=("metrics.json", "scores.jsonl"))
    records = load_responses(args.responses)
    chat = _chat(args)
    report(f"judging {len(records)} responses with {args.model} at {args.base_url} "
           f"({args.rubric}, {args.concurrency} at a time)")
    scores, metrics = score_responses(chat, records, args.rubric, args.concurrency, args.retries,
                                      progress=not args.quiet)
    metrics.update(judge_model=args.model, base_url=args.base_url, seed=args.seed,
                   responses=str(args.responses), wall_seconds=time.perf_counter() - started)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "scores.jsonl", scores)
    write_json(out / "metrics.json", metrics)
    mean = "none" if metrics["mean_score"] is None else f"{metrics['mean_score']:.2f}"
    print(f"mean score {mean} over {metrics['n_scored']} responses; {metrics['n_failed']} "
          f"failed; {metrics['wall_seconds']:.1f} s. Results in {out}")
    return 0


def run_pairwise(args) -> int:
    from tinygrad_llm.evaluate.arena import judge_all_pairs, leaderboard, plot_leaderboard
    from tinygrad_llm.evaluate.judge import align_responses, load_responses

    started = time.perf_counter()
    if len(args.responses) < 2:
        raise UserError("--responses needs two or more files to compare")
    names = args.names or [Path(p).resolve().parent.name for p in args.responses]
    if len(names) != len(args.responses):
        raise UserError(f"--names gives {len(names)} names for {len(args.responses)} "
                        "--responses files")
    if len(set(names)) != len(names):
        raise UserError(f"the model names {names} repeat; give distinct ones with --names")
    out = check_out_folder(args.out, inputs=args.responses, overwrite=args.overwrite,
                           markers=("leaderboard.json", "pairwise.jsonl"))
    aligned = align_responses([load_responses(p) for p in args.responses])
    if not aligned:
        raise UserError("the --responses files share no instruction (matched on instruction "
                        "and input)")
    chat = _chat(args)
    pairs = len(names) * (len(names) - 1) // 2
    report(f"{len(aligned)} instructions answered by all {len(names)} models: "
           f"{2 * pairs * len(aligned)} judge calls ({pairs} pairs, both orders)")
    records = judge_all_pairs(chat, names, aligned, args.concurrency, args.retries,
                              progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "pairwise.jsonl", records)
    board = leaderboard(records, names, seed=args.seed)
    board.update(judge_model=args.model, base_url=args.base_url, instructions=len(aligned),
                 failed=sum(r["score_a"] is None for r in records),
                 wall_seconds=time.perf_counter() - started)
    write_json(out / "leaderboard.json", board)
    plotted = plot_leaderboard(board, out / "leaderboard.png")
    for pair in board["pairs"]:
        if pair["n"]:
            print(f"{pair['model_a']} vs {pair['model_b']}: win {pair['win_rate_a']:.1%}, tie "
                  f"{pair['tie_rate']:.1%}, loss {pair['loss_rate_a']:.1%} over {pair['n']} "
                  f"({pair['failed']} failed)")
    for row in board["models"]:
        low, high = row["bradley_terry_ci"]
        print(f"{row['rank']}. {row['model']}: Bradley-Terry {row['bradley_terry']:.0f} "
              f"[{low:.0f}, {high:.0f}], Elo {row['elo']:.0f}")
    print(f"results in {out}" + ("" if plotted else " (no plot: pip install "
                                                    "'tinygrad_llm[plot]')"))
    return 0


if __name__ == "__main__":
    from tinygrad_llm.train.cli import run_standalone

    raise SystemExit(run_standalone(sys.modules[__name__]))
