"""The book cannot drift from the code.

* Every ```sh and ```python block of README.md and docs/*.md runs here, in order, page by page,
  each page in a scratch folder of its own (README's runs are the models other pages use), or
  says on the line before it why not: ``<!-- not run: REASON -->``. A block marked
  ``<!-- runs in the background ... -->`` (a server) is started, and stopped at the page's end.
  Long commands run with the cap docs/make_figures.py's SHORTER appends (``--steps 6``, a few
  dozen examples ...), so every flag a page shows is parsed and every pipeline runs, in seconds
  instead of an hour (a ``--data`` the page gives is kept). ``pip install`` lines are left
  out: .ci/run installs.
  ```python blocks that start with ``>>>`` are doctests: their printed results are checked.
* Every number a page quotes between ``<!--fig:KEY-->`` and ``<!--/fig-->`` is the value
  docs/make_figures.py wrote to docs/img/figures.json; every image a page shows exists.
* ``-m slow``: docs/make_figures.py --quick runs end to end (every run, every figure).
"""

import doctest
import gzip
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
spec = importlib.util.spec_from_file_location("make_figures", DOCS / "make_figures.py")
make_figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_figures)

# the book's order (README.md's table of contents); README first: it makes the models
BOOK = ["README.md"] + re.findall(r"\]\(docs/(\w+\.md)\)", (ROOT / "README.md").read_text())
BOOK = list(dict.fromkeys(BOOK))
PAGES = [ROOT / name if name == "README.md" else DOCS / name for name in BOOK]
LIFE = ["autograd", "tokenization", "attention", "gpt", "pretraining", "generation", "pretrained",
        "classification", "instruction", "lora", "dpo", "evaluation", "serving", "scaling", "gpu",
        "performance"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->\n$")
BACKGROUND = re.compile(r"<!-- runs in the background while the page's other blocks run -->\n$")
USES = re.compile(r"<!-- uses from README: ([\w ]+) -->")
SKIP_UNDER_FAKE_CUDA = os.environ.get("TINYGRAD_LLM_FAKE_CUDA") == "1"
runs_commands = pytest.mark.skipif(SKIP_UNDER_FAKE_CUDA,
                                   reason="runs the CPU commands; once is enough")


def blocks(page: Path) -> list[dict]:
    """Every fenced block: language, code, line number, and why it is not run (or None)."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        before = text[:match.start()]
        reason = NOT_RUN.search(before[-300:])
        found.append({"lang": match.group(1), "code": match.group(2),
                      "line": before.count("\n") + 1,
                      "not_run": reason.group(1) if reason else None,
                      "background": bool(BACKGROUND.search(before[-300:]))})
    return found


def commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, and lines joined while a quote
    is open (a JSON body over two lines); ``pip install`` lines are left out: they are the
    install .ci/run itself performs."""
    found, pending = [], ""
    for line in code.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote still open
            continue
        if pending.strip() and not pending.lstrip().startswith(("#", "pip install")):
            found.append(pending)
        pending = ""
    return found


# --------------------------------------------------------------------------- the world
SHAKESPEARE = ROOT / "tinygrad_llm" / "assets" / "shakespeare"


def world(directory: Path) -> Path:
    """The files the pages' commands name (my_text.txt, mmlu/, tickets.csv ...), small."""
    directory.mkdir(parents=True, exist_ok=True)
    hamlet = (SHAKESPEARE / "hamlet.txt").read_text(encoding="utf-8")
    (directory / "my_text.txt").write_text(hamlet[:4000])
    (directory / "hamlet_heldout.txt").write_text(hamlet[-4000:])
    for folder, sources in (("my_texts", ["macbeth.txt", "othello.txt"]),
                            ("my_notes", ["sonnets.txt"]), ("new", ["tempest.txt"]),
                            ("corpus", ["macbeth.txt"])):
        (directory / folder).mkdir(exist_ok=True)
        for name in sources:
            text = (SHAKESPEARE / name).read_text(encoding="utf-8")
            (directory / folder / name).write_text(text[:30000])
    with gzip.open(directory / "more.jsonl.gz", "wt") as out:
        for i in range(20):
            out.write(json.dumps({"text": hamlet[i * 500:(i + 1) * 500]}) + "\n")
    rows = ["body,department"] + [f'"my invoice {i} is wrong",billing' for i in range(12)] \
        + [f'"the app crashes on start {i}",support' for i in range(12)]
    (directory / "tickets.csv").write_text("\n".join(rows) + "\n")
    for split in ("validation", "dev"):
        (directory / "mmlu" / split).mkdir(parents=True, exist_ok=True)
        questions = [f"What is {a} + {b}?,{a + b},{a + b + 1},{a + b - 1},{a * b},A"
                     for a in range(2, 6) for b in range(3, 5)]
        (directory / "mmlu" / split / f"arithmetic_{split[:3]}.csv").write_text(
            "\n".join(questions) + "\n")
    return directory


def program() -> list[str]:
    here = Path(sys.executable).parent / "tinygrad-llm"
    return [str(here)] if here.exists() else [sys.executable, "-m", "tinygrad_llm.train.cli"]


def start_server(line: str, cwd: Path) -> subprocess.Popen:
    """A ``tinygrad-llm serve`` line of a background block, started; returns once it answers."""
    argv = shlex.split(line, comments=True)
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 8000
    log = cwd / f"server-{port}.log"
    with open(log, "w") as out:  # a file: a pipe nobody reads could fill and stall the server
        server = subprocess.Popen(program() + argv[1:], cwd=cwd, env=command_env(),
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"`{line}` ended (exit {server.returncode}):\n{log.read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return server
        except OSError:
            time.sleep(0.3)
    server.kill()
    pytest.fail(f"`{line}` did not answer on port {port} within 120 s")


def command_env() -> dict:
    # one BLAS thread: these runs check that commands work, and threads that spin on a busy
    # 2-core machine (pytest-xdist, a training run beside) would slow them tenfold
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **os.environ,
           "PYTHONPATH": str(ROOT)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_command(line: str, cwd: Path, small: Path) -> None:
    argv = shlex.split(line, comments=True)
    if "tinygrad-llm" not in argv:
        argv = ["bash", "-c", line]
    else:
        at = argv.index("tinygrad-llm")
        argv = argv[:at] + program() + make_figures.shorten(argv[at + 1:], small)
        if argv[0] in ("mpirun", "mpiexec"):
            found = shutil.which(argv[0], path=f"{Path(sys.executable).parent}{os.pathsep}"
                                                f"{os.environ.get('PATH', '')}")
            if found is None:
                pytest.skip(f"{argv[0]} is not installed (the distributed extra)")
            argv[0] = found
    started = time.monotonic()
    done = subprocess.run(argv, cwd=cwd, env=command_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)
    if os.environ.get("TINYGRAD_LLM_DOCS_TIMES"):
        print(f"{time.monotonic() - started:6.1f} s  {line}", file=sys.__stderr__)
    assert done.returncode == 0, (f"`{line}` failed (exit {done.returncode}):\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def run_python(code: str, name: str, line: int, globs: dict) -> None:
    if code.lstrip().startswith(">>>"):
        test = doctest.DocTestParser().get_doctest(code, globs, name, name, line)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS |
                                       doctest.NORMALIZE_WHITESPACE)
        output = []
        runner.run(test, out=output.append, clear_globs=False)
        globs.update(test.globs)  # a DocTest runs in a copy; later blocks build on this one
        assert runner.failures == 0, "".join(output)
    else:
        exec(compile(code, f"{name}:{line}", "exec"), globs)  # noqa: S102


def run_page(page: Path, directory: Path, small: Path, readme: Path | None) -> None:
    world(directory)
    if readme is not None:
        found = USES.search(page.read_text(encoding="utf-8"))
        for name in (found.group(1).split() if found else []):
            (directory / name).symlink_to(readme / name, target_is_directory=True)
    globs: dict = {"__name__": "__docs__"}
    cwd, printing = os.getcwd(), np.get_printoptions()
    os.chdir(directory)
    servers = []
    try:
        for block in blocks(page):
            if block["lang"] not in ("sh", "python") or block["not_run"]:
                continue
            if block["background"]:
                servers += [start_server(line, directory) for line in commands(block["code"])]
            elif block["lang"] == "sh":
                for line in commands(block["code"]):
                    run_command(line, directory, small)
            else:
                run_python(block["code"], page.name, block["line"], globs)
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
        os.chdir(cwd)
        np.set_printoptions(**printing)  # a page may change NumPy's; the next starts afresh


@pytest.fixture(scope="session")
def readme_world(tmp_path_factory):
    """README.md's commands, run once: the models (base, sft, spam ...) other pages use."""
    directory = tmp_path_factory.mktemp("README")
    small = make_figures.small_inputs(tmp_path_factory.mktemp("small"))
    run_page(ROOT / "README.md", directory, small, None)
    return directory, small


# ------------------------------------------------------------------------------- tests
@runs_commands
def test_every_command_of_the_readme_runs(readme_world):
    directory, _ = readme_world
    assert (directory / "runs" / "pretrain" / "checkpoint").exists()  # what the page said


@runs_commands
@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: p.stem)
def test_every_command_and_snippet_of_a_page_runs(page, readme_world, tmp_path):
    readme, small = readme_world
    run_page(page, tmp_path, small, readme)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_every_code_block_runs_or_says_why_not(page):
    for block in blocks(page):
        if block["lang"] == "":
            pytest.fail(f"{page.name}:{block['line']}: a fence without a language (sh, python "
                        "for what runs; text, json ... for what does not)")
        if block["lang"] == "sh" and not block["not_run"]:
            for line in commands(block["code"]):
                holders = [arg for arg in shlex.split(line, comments=True)
                           if re.fullmatch(r"[A-Z][A-Z_]+|\.\.\.|\[.*", arg)]
                assert not holders, (f"{page.name}:{block['line']}: `{line}` has placeholders "
                                     f"{holders}: make it a ```text synopsis, or runnable")


def test_the_book_has_every_page_of_the_life_of_a_model():
    for name in LIFE:
        page = DOCS / f"{name}.md"
        assert page.exists(), f"docs/{name}.md is missing"
        text = page.read_text(encoding="utf-8")
        assert f"](docs/{name}.md)" in (ROOT / "README.md").read_text(), \
            f"README.md's contents do not list docs/{name}.md"
        assert re.search(r"!\[[^\]]*\]\(img/[\w.-]+\.png\)", text) or "\n|---" in text, \
            f"docs/{name}.md shows no figure and no table"
        assert "](../tinygrad_llm/" in text or "](../train/" in text or "](../bench/" in text, \
            f"docs/{name}.md does not point at the code"
        assert "tinygrad-llm" in text or "python " in text, \
            f"docs/{name}.md does not give a command"


def test_every_image_a_page_shows_exists_and_every_figure_is_shown():
    shown = set()
    for page in PAGES:
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", page.read_text()):
            path = (page.parent / image).resolve()
            assert path.exists(), f"{page.name} shows {image}, which does not exist"
            shown.add(path.name)
    drawn = {p.name for p in (DOCS / "img").glob("*.png")}
    assert drawn <= shown, f"figures no page shows: {sorted(drawn - shown)}"


def test_every_quoted_figure_is_the_one_the_figure_script_wrote():
    values = json.loads((DOCS / "img" / "figures.json").read_text())
    quoted = set()
    for page in PAGES:
        for key, body in make_figures.MARK.findall(page.read_text(encoding="utf-8")):
            assert key in values, f"{page.name} quotes {key}, which figures.json lacks"
            assert body.strip() == values[key].strip(), (
                f"{page.name} quotes {key} as {body.strip()!r}, but docs/make_figures.py wrote "
                f"{values[key].strip()!r}: run python docs/make_figures.py")
            quoted.add(key)
    assert quoted == set(values), f"computed but quoted nowhere: {sorted(set(values) - quoted)}"


def test_links_between_pages_and_to_the_code_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


@pytest.mark.slow
@runs_commands
def test_the_figure_script_runs_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    done = subprocess.run([sys.executable, str(DOCS / "make_figures.py"), "--quick", "--work",
                           str(tmp_path / "runs"), "--img", str(tmp_path / "img"),
                           "--pages", "none"], capture_output=True, text=True, timeout=1200,
                          env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    values = json.loads((tmp_path / "img" / "figures.json").read_text())
    committed = json.loads((DOCS / "img" / "figures.json").read_text())
    assert set(values) == set(committed)  # the same keys the pages quote
    assert {p.name for p in (tmp_path / "img").glob("*.png")} == \
        {p.name for p in (DOCS / "img").glob("*.png")} - {"chat-page.png"}


def test_the_table_of_pretraining_defaults_is_the_commands():
    import argparse

    from tinygrad_llm.train import pretrain

    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    defaults = {a.option_strings[0]: a.default for a in parser._actions if a.option_strings}
    text = (DOCS / "pretraining.md").read_text(encoding="utf-8")
    section = text[text.index("## Defaults"):]
    compared = 0
    for flag, cell in re.findall(r"^\| `(--[\w-]+)` \| ([^|]+) \|", section, re.M):
        cell, default = cell.strip(), defaults[flag]
        number = cell.replace(",", "")
        if re.fullmatch(r"[\d.e+-]+", number):
            assert float(number) == pytest.approx(float(default)), f"{flag}: {cell} vs {default}"
        elif cell.startswith("`"):
            assert cell.strip("`") == str(default), f"{flag}: {cell} vs {default}"
        elif cell == "off":
            assert not default, f"{flag}: off vs {default}"
        else:
            continue  # described in words ("the preset's")
        compared += 1
    assert compared >= 12
