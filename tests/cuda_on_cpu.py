"""Run the flash-attention CUDA kernels of ``tinygrad_llm.cuda_kernels`` on the CPU.

CI machines have no GPU, but the kernels' source is C++ with a few CUDA words. Here it is
compiled as C++20 with those words defined -- ``__shared__`` memory as statics (one block runs
at a time), ``threadIdx`` as a thread-local, and every CUDA thread as a real ``std::thread``,
so ``__syncthreads()`` is a ``std::barrier`` with the same meaning -- and run block by block.
Indexing, tiling, the causal bounds, the online softmax and the barriers are all exercised;
what only a GPU shows (speed, warp behaviour, fast-math ``expf``) is left to bench/gpu.py.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from tinygrad_llm import cuda_kernels

PRELUDE = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
struct float4 { float x, y, z, w; };
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static inline float __int_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
struct dim3 { unsigned x, y; };
thread_local dim3 threadIdx;
dim3 blockIdx, blockDim;
std::barrier<>* block_barrier;
static void __syncthreads() { block_barrier->arrive_and_wait(); }
using std::max;
using std::min;
static inline int min(int a, unsigned b) { return (int)std::min<long>(a, (long)b); }
"""

MAIN = r"""
template <typename Kernel>
void launch(int blocks_x, int blocks_y, int threads, Kernel kernel) {
    blockDim = {(unsigned)threads, 1};
    for (int y = 0; y < blocks_y; y++)
        for (int x = 0; x < blocks_x; x++) {
            blockIdx = {(unsigned)x, (unsigned)y};
            std::barrier<> barrier(threads);
            block_barrier = &barrier;
            std::vector<std::thread> team;
            for (int t = 0; t < threads; t++)
                team.emplace_back([&, t] { threadIdx = {(unsigned)t, 0}; kernel(); });
            for (auto& member : team) member.join();
        }
}

std::vector<float> read(const char* path, size_t n) {
    std::vector<float> values(n);
    FILE* f = fopen(path, "rb");
    if (!f || fread(values.data(), 4, n, f) != n) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(1);
    }
    fclose(f);
    return values;
}

void write(const char* path, const std::vector<float>& values) {
    FILE* f = fopen(path, "wb");
    fwrite(values.data(), 4, values.size(), f);
    fclose(f);
}

int main(int argc, char** argv) {  // heads Tq Tk scale: q k v g .bin -> out lse dq dk dv .bin
    int heads = atoi(argv[1]), Tq = atoi(argv[2]), Tk = atoi(argv[3]);
    float scale = atof(argv[4]);
    auto q = read("q.bin", (size_t)heads * Tq * D), k = read("k.bin", (size_t)heads * Tk * D),
         v = read("v.bin", (size_t)heads * Tk * D), g = read("g.bin", (size_t)heads * Tq * D);
    std::vector<float> out(q.size()), dq(q.size()), dk(k.size()), dv(v.size());
    std::vector<float> lse((size_t)heads * Tq), delta((size_t)heads * Tq);
    int query_blocks = (Tq + ROWS - 1) / ROWS, key_blocks = (Tk + ROWS - 1) / ROWS;
    launch(query_blocks, heads, ROWS, [&] {
        flash_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), Tq, Tk, scale); });
    for (size_t i = 0; i < delta.size(); i++)
        for (int d = 0; d < D; d++) delta[i] += g[i * D + d] * out[i * D + d];
    launch(query_blocks, heads, ROWS, [&] {
        flash_backward_dq(q.data(), k.data(), v.data(), g.data(), lse.data(), delta.data(),
                          dq.data(), Tq, Tk, scale); });
    launch(key_blocks, heads, ROWS, [&] {
        flash_backward_dkv(q.data(), k.data(), v.data(), g.data(), lse.data(), delta.data(),
                           dk.data(), Tq, Tk, scale, 0); });
    launch(key_blocks, heads, ROWS, [&] {
        flash_backward_dkv(q.data(), k.data(), v.data(), g.data(), lse.data(), delta.data(),
                           dv.data(), Tq, Tk, scale, 1); });
    write("out.bin", out); write("lse.bin", lse);
    write("dq.bin", dq); write("dk.bin", dk); write("dv.bin", dv);
}
"""


BARRIER_PROBE = r"""
#include <barrier>
int main() { std::barrier<> b(1); b.arrive_and_wait(); }
"""


@functools.cache
def compiler() -> str | None:
    """A C++ compiler that knows std::barrier (C++20), or None: each candidate found on the PATH
    compiles BARRIER_PROBE (an older g++ or libstdc++ has no <barrier>)."""
    for name in ("g++", "clang++"):
        path = shutil.which(name)
        if path is None:
            continue
        with tempfile.TemporaryDirectory() as folder:
            source = Path(folder) / "probe.cpp"
            source.write_text(BARRIER_PROBE)
            built = subprocess.run([path, "-std=c++20", "-pthread", str(source), "-o",
                                    str(Path(folder) / "probe")], capture_output=True)
        if built.returncode == 0:
            return path
    return None


def build_flash(head_dim: int, folder: Path) -> Path:
    """Compile the flash kernels for this head size as a CPU program in ``folder``."""
    source = cuda_kernels.flash_source(head_dim)
    for cuda, cpp in (('extern "C" __global__', ""),
                      ("__device__ __forceinline__", "static inline"),
                      ("#pragma unroll 4", ""), ("#pragma unroll", ""), ("__shared__", "static")):
        source = source.replace(cuda, cpp)
    path = folder / f"flash{head_dim}.cpp"
    path.write_text(PRELUDE + source + MAIN)
    program = folder / f"flash{head_dim}"
    subprocess.run([compiler(), "-std=c++20", "-O1", "-pthread", str(path), "-o", str(program)],
                   check=True, capture_output=True, text=True)
    return program


def run_flash(program: Path, q, k, v, g, scale: float) -> dict:
    """out, lse, dq, dk, dv of the kernels for q (heads, Tq, D), k, v (heads, Tk, D), g like q."""
    folder = program.parent
    for name, array in zip("qkvg", (q, k, v, g), strict=True):
        np.ascontiguousarray(array, dtype=np.float32).tofile(folder / f"{name}.bin")
    heads, Tq, _ = q.shape
    subprocess.run([str(program), str(heads), str(Tq), str(k.shape[1]), str(float(scale))],
                   cwd=folder, check=True, capture_output=True, text=True)
    shapes = {"out": q.shape, "lse": q.shape[:2], "dq": q.shape, "dk": k.shape, "dv": v.shape}
    return {name: np.fromfile(folder / f"{name}.bin", np.float32).reshape(shape)
            for name, shape in shapes.items()}
