"""Data parallel over MPI: mpiexec -n 2 trains exactly as one process does with the same batch.

Runs real MPI processes on this machine (loopback); skipped where mpi4py or mpiexec is missing
(`pip install 'tinygrad_llm[distributed]'` brings both).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinygrad_llm.distributed import DataParallel, launched_ranks

MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                        f"{os.environ.get('PATH', '')}")
try:
    import mpi4py  # noqa: F401

    HAVE_MPI = MPIEXEC is not None
except ImportError:
    HAVE_MPI = False
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec: "
                                                    "pip install 'tinygrad_llm[distributed]'")

TEXT = "to be or not to be, that is the question: whether 'tis nobler in the mind. " * 300
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--context-length", "32",
        "--eval-interval", "5", "--eval-batches", "2", "--sample-tokens", "0", "--dropout", "0",
        "--lr", "1e-2", "--warmup", "2", "--quiet"]


def pretrain(tmp_path, out, *flags, ranks=1, check=True):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    command = [sys.executable, "-m", "tinygrad_llm.train.cli", "pretrain", "--data", str(corpus),
               "--out", str(tmp_path / out), *TINY, *flags]
    if ranks > 1:
        command = [MPIEXEC, "-n", str(ranks), *command]
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def losses(path):
    return [(r["step"], r["train_loss"], r["val_loss"])
            for r in map(json.loads, Path(path, "metrics.jsonl").read_text().splitlines())]


def same_losses(a, b):
    assert [step for step, *_ in a] == [step for step, *_ in b]
    for (_, *one), (_, *two) in zip(a, b, strict=True):
        assert one == pytest.approx(two, rel=1e-5)  # equal up to float32 summation order


@needs_mpi
@pytest.mark.parametrize("batch", [6, 5], ids=["even", "uneven-3+2"])
def test_two_processes_log_the_losses_of_one_with_the_same_global_batch(tmp_path, batch):
    pretrain(tmp_path, "one", "--batch-size", str(batch), "--steps", "15")
    two = pretrain(tmp_path, "two", "--batch-size", str(batch), "--steps", "15", ranks=2)
    assert "data parallel over 2 processes" in two.stderr
    same_losses(losses(tmp_path / "one"), losses(tmp_path / "two"))
    assert losses(tmp_path / "one")[-1][2] < losses(tmp_path / "one")[0][2]  # it learned


@needs_mpi
def test_a_run_resumed_under_mpi_continues_as_one_process_would(tmp_path):
    for out, ranks in (("one", 1), ("two", 2)):
        pretrain(tmp_path, out, "--batch-size", "6", "--steps", "10", ranks=ranks)
        pretrain(tmp_path, out, "--batch-size", "6", "--steps", "20", "--resume", ranks=ranks)
    same_losses(losses(tmp_path / "one"), losses(tmp_path / "two"))
    assert len(losses(tmp_path / "two")) == 4  # steps 5, 10, then 15, 20 after the resume


@needs_mpi
@pytest.mark.parametrize("debug", [[], ["--debug"]], ids=["one-line error", "traceback"])
def test_an_error_on_one_rank_ends_the_whole_job_at_once(tmp_path, debug):
    pretrain(tmp_path, "run", "--batch-size", "6", "--steps", "5")
    # rank 0 refuses the existing run folder; rank 1 is waiting for it: both must end, now
    start = time.monotonic()
    done = pretrain(tmp_path, "run", "--batch-size", "6", "--steps", "5", *debug, ranks=2,
                    check=False)
    assert done.returncode != 0 and time.monotonic() - start < 60  # not a wait for a timeout
    assert "already holds a run" in done.stderr


def test_rows_of_a_global_batch_are_split_contiguously_and_evenly():
    ranks = [DataParallel.__new__(DataParallel) for _ in range(3)]
    for rank, dp in enumerate(ranks):
        dp.rank, dp.size = rank, 3
    assert [dp.rows(8) for dp in ranks] == [slice(0, 2), slice(2, 5), slice(5, 8)]
    with pytest.raises(ValueError, match="--batch-size >= 3"):
        ranks[0].rows(2)


def test_the_launcher_is_recognised_from_its_environment(monkeypatch):
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(name, raising=False)
    assert launched_ranks() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launched_ranks() == 4


def real_gpus() -> int:
    """GPUs a real CuPy sees (0 without CuPy, without a GPU, or under the CPU stand-in)."""
    try:
        import cupy
    except ImportError:
        return 0
    if getattr(cupy, "IS_FAKE", False):
        return 0
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - CuPy's own error when no driver is present
        return 0


@needs_mpi
@pytest.mark.skipif(real_gpus() < 2, reason="needs two GPUs (NCCL between them)")
def test_two_gpus_summing_through_nccl_log_the_losses_of_one(tmp_path):
    pretrain(tmp_path, "one", "--batch-size", "6", "--steps", "15", "--device", "cuda")
    pretrain(tmp_path, "two", "--batch-size", "6", "--steps", "15", "--device", "cuda", ranks=2)
    same_losses(losses(tmp_path / "one"), losses(tmp_path / "two"))
