"""Data-parallel training over MPI: N processes, one model each, one global batch split N ways.

    mpirun -n 2 tinygrad-llm pretrain --batch-size 12 ...

Every process (a *rank*) holds the whole model and draws the same global batch of 12 windows
(the batch sampler is seeded alike everywhere); rank r keeps its share of the rows, 6 here.
Each rank's loss is the mean over its rows, so it is weighted by its share of the rows before
backward:

    loss = sum_r (n_r / n) * loss_r        n_r rows on rank r, n = sum_r n_r

and the gradients of those weighted losses are *summed* across the ranks (an all-reduce): every
rank ends up with the gradient of the global batch's mean loss -- what one process computes with
``--batch-size 12`` -- and applies the same AdamW update to the same weights, so the weights stay
identical without ever being sent. The logged losses equal one process's up to the order of
float32 sums.

The gradients go through one flat buffer (every parameter's gradient copied in, reduced in place
in buckets of ``BUCKET_ELEMENTS``, copied back): a few large messages instead of one per
parameter. On GPUs (``use_device("cuda")``) the buffer stays on the GPU and NCCL sums it.
Rank 0 alone writes metrics, samples and checkpoints. An MPI collective that does not complete
within ``timeout`` seconds (another rank died or hangs) ends the job with a message instead of
waiting forever.

MPI comes from ``mpi4py`` (``pip install 'tinygrad_llm[distributed]'``, which brings an MPI
library too: the ``mpich`` wheel, so no system MPI is needed).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from . import backend

BUCKET_ELEMENTS = 1 << 22  # 16 MB of float32 per all-reduce message
DEFAULT_TIMEOUT = 600.0  # seconds a collective may take before the job is ended
INSTALL_HINT = "pip install 'tinygrad_llm[distributed]' (mpi4py and an MPI library)"
# what launchers set in each process they start: MPICH/Hydra, Open MPI, Slurm's PMI
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def launched_ranks() -> int:
    """How many processes an MPI launcher started this one among (1 when not under one)."""
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


class DataParallel:
    """The ranks of one data-parallel job (``MPI.COMM_WORLD`` unless given a communicator)."""

    def __init__(self, comm=None, timeout: float | None = None):
        try:
            from mpi4py import MPI
        except ImportError as error:
            raise RuntimeError(f"this process was started by an MPI launcher, and training over "
                               f"several processes needs mpi4py: {INSTALL_HINT}") from error
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = timeout if timeout is not None else float(
            os.environ.get("TINYGRAD_LLM_MPI_TIMEOUT", DEFAULT_TIMEOUT))
        self._flat = None  # the gradients' flat buffer, allocated on first use
        self.nccl = None  # on GPUs: the NCCL communicator that sums the gradients

    def use_device(self, device: str) -> None:
        """On ``cuda``: rank r takes GPU r (modulo the GPUs this machine has) and gradients are
        summed by NCCL, GPU to GPU, through ``cupy.cuda.nccl``; MPI only hands NCCL's id from
        rank 0 to the others. Call it before the model moves to the device."""
        if backend.normalize_device(device) != "cuda":
            return
        cupy = backend.array_module("cuda")
        cupy.cuda.Device(self.rank % cupy.cuda.runtime.getDeviceCount()).use()
        try:
            from cupy.cuda import nccl
        except ImportError as error:
            raise RuntimeError("data parallel on GPUs needs NCCL in CuPy (the cupy-cuda12x "
                               "wheels include it: python -m cupyx.tools.install_library "
                               "--library nccl)") from error
        uid = self.comm.bcast(nccl.get_unique_id() if self.is_main else None, root=0)
        self.nccl = nccl.NcclCommunicator(self.size, uid, self.rank)

    @classmethod
    def from_environment(cls) -> DataParallel | None:
        """A DataParallel when launched by mpirun/mpiexec with more than one process, else None
        (one process: nothing to split, and mpi4py is not needed)."""
        return cls() if launched_ranks() > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, count: int) -> slice:
        """This rank's rows of a global batch of ``count``: contiguous, rank r from
        r * count // size, so the sizes differ by at most one (5 rows over 2 ranks: 2 and 3)."""
        if count < self.size:
            raise ValueError(f"a global batch of {count} cannot be split over {self.size} "
                             f"processes: use --batch-size >= {self.size}")
        return slice(self.rank * count // self.size, (self.rank + 1) * count // self.size)

    # -------------------------------------------------------------------- collectives
    def _wait(self, request, what: str, timeout: float | None = -1) -> None:
        """Wait for a non-blocking collective, but no longer than ``timeout`` seconds (default:
        the job's; None: as long as it takes)."""
        timeout = self.timeout if timeout == -1 else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while not request.Test():
            if deadline is not None and time.monotonic() > deadline:
                print(f"rank {self.rank}: {what} did not complete within {timeout:.0f} s: "
                      "another process died or hangs; ending the job (the last checkpoint is "
                      "intact; continue with --resume)", file=sys.stderr, flush=True)
                time.sleep(0.5)  # let mpiexec forward that line before Abort kills the job
                self.comm.Abort(1)
            time.sleep(0.0005)

    def allreduce_(self, array: np.ndarray, what: str = "an all-reduce") -> np.ndarray:
        """Sum ``array`` (a contiguous NumPy array) over the ranks, in place."""
        for start in range(0, array.size, BUCKET_ELEMENTS):
            bucket = array.reshape(-1)[start:start + BUCKET_ELEMENTS]
            self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, bucket, op=self.MPI.SUM), what)
        return array

    def sum_gradients(self, params) -> None:
        """Every parameter's gradient <- its sum over the ranks (through one flat buffer)."""
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            raise RuntimeError("a parameter has no gradient on this rank; every rank must "
                               "compute the same graph")
        sizes, dtype = [g.size for g in grads], grads[0].dtype
        xp = backend.get_array_module(grads[0]) if self.nccl is not None else np
        if self._flat is None or self._flat.size != sum(sizes) or self._flat.dtype != dtype:
            self._flat = xp.empty(sum(sizes), dtype)  # on the GPU for NCCL, else the host
        flat, start = self._flat, 0
        for g, size in zip(grads, sizes, strict=True):
            flat[start:start + size] = g.reshape(-1) if self.nccl else backend.to_numpy(g).ravel()
            start += size
        if self.nccl is not None:
            self._nccl_sum(flat)
        else:
            self.allreduce_(flat, "summing the gradients")
        start = 0
        for p, size in zip(params, sizes, strict=True):
            summed = flat[start:start + size].reshape(p.grad.shape)
            p.grad[...] = backend.to_device(summed, backend.device_of(p.grad))
            start += size

    def _nccl_sum(self, flat) -> None:
        """Sum a flat CuPy array over the ranks' GPUs, in place, on the current stream."""
        from cupy.cuda import get_current_stream, nccl

        kinds = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                 np.dtype(np.float16): nccl.NCCL_FLOAT16}
        self.nccl.allReduce(flat.data.ptr, flat.data.ptr, flat.size, kinds[flat.dtype],
                            nccl.NCCL_SUM, get_current_stream().ptr)

    def sum_values(self, values) -> np.ndarray:
        """A few float64 numbers (a loss, a count) summed over the ranks."""
        return self.allreduce_(np.array(values, np.float64), "summing the losses")

    def barrier(self, what: str = "waiting for the other processes", timeout=-1) -> None:
        """Wait until every rank gets here. ``timeout=None`` while rank 0 works alone for as long
        as its work takes (tokenizing a corpus, writing a checkpoint): only a dead rank 0 ends
        that wait, and its death ends the job."""
        self._wait(self.comm.Ibarrier(), what, timeout)
