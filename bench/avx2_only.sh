#!/bin/sh
# Run a command as on an x86 CPU without AVX-512 (AMD's EPYC Rome and Milan, Intel's before
# Skylake-SP): every library in it that picks its kernels by the CPU is told to stop at AVX2.
#
#     sh bench/avx2_only.sh python bench/train_step.py
#
# It is a stand-in, not the other machine: the caches, the memory and the clock stay this CPU's,
# and MKL still sees an Intel CPU (on AMD's, MKL chooses kernels of its own, for PyTorch's
# products and ours alike). docs/performance.md, "An AVX2-only stand-in", has the figures.
#
#   MKL_ENABLE_INSTRUCTIONS  oneMKL: ours (the mkl extra) and PyTorch's copy inside its build
#   ATEN_CPU_CAPABILITY      PyTorch's own elementwise and reduction kernels
#   ONEDNN_MAX_CPU_ISA       oneDNN, which PyTorch calls for some ops
#   NUMBA_CPU_NAME, NUMBA_CPU_FEATURES  the machine code numba compiles our kernels to: the name
#                            alone still lets LLVM use every feature of this CPU, AVX-512 too
#                            (numba caches the kernels per name and features)
#   OPENBLAS_CORETYPE        the OpenBLAS kernel NumPy's products use
#   NPY_DISABLE_CPU_FEATURES NumPy's own loops: NumPy 2.4 names its AVX-512 group X86_V4 (older
#                            versions name each part: AVX512F AVX512CD AVX512_SKX ...)
[ $# -gt 0 ] || { echo "usage: sh $0 COMMAND [ARGUMENTS ...]" >&2; exit 2; }
exec env MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
    NUMBA_CPU_NAME=haswell \
    NUMBA_CPU_FEATURES="+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+pclmul,+popcnt,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave" \
    OPENBLAS_CORETYPE=Haswell NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" "$@"
