"""A strict CuPy stand-in on NumPy, so the CUDA code path can be tested on a CPU-only machine.

Install it before anything imports CuPy (``tests/conftest.py`` does this when
``TINYGRAD_LLM_FAKE_CUDA=1``)::

    import fakecupy
    fakecupy.install()   # sys.modules["cupy"], ["cupyx"], ["cupy.random"], ["cupy.cuda"] ...
    import cupy                 # the fake; cupy.IS_FAKE is True

What it checks -- it is STRICTER than CuPy wherever CuPy would hide a bug or a slow path:

* ``cupy.ndarray`` wraps a NumPy array and refuses implicit conversion to NumPy exactly as CuPy
  does (``__array__`` raises TypeError with CuPy's message), so ``np.asarray(x)``, ``np.exp(x)``
  and ``np.sum(x)`` fail. (Real CuPy dispatches ``np.exp``/``np.sum`` on a cupy array to CuPy via
  ``__array_ufunc__``/``__array_function__``; the fake refuses them: library code must call
  ``xp.exp`` etc.)
* A NumPy ndarray (0-d too) mixed into an operator, a function or an index raises TypeError
  ("Unsupported type <class 'numpy.ndarray'>"). Python and NumPy *scalars* are fine. (Real CuPy
  accepts a NumPy array as an index or as the value of an advanced ``__setitem__``, with a hidden
  host-to-device copy; the fake refuses those too -- see ``STRICT_HOST_ARRAYS``.)
* Out-of-range integer-array indices (``a[ids]``, ``take``, ``take_along_axis``, ``put``,
  ``cupyx.scatter_add``) RAISE IndexError. Real CuPy silently wraps them around.
* Every device-to-host copy is counted (``sync_count()``, ``count_syncs()``): ``float()``,
  ``int()``, ``bool()``, ``__index__``, ``item()``, ``tolist()``, ``get()``, ``cupy.asnumpy``,
  ``repr``/``str``/``format``, ``in``, pickling, boolean-mask indexing and the data-dependent-shape
  functions (``nonzero``, ``flatnonzero``, ``argwhere``, ``unique`` ...: CuPy reads a count back),
  ``Device().synchronize()``, ``Stream.synchronize()``, ``Event.synchronize()``. ``len()`` and
  ``.shape`` are not syncs.
* ``cupy.empty``/``empty_like``/``ndarray(shape)`` are filled with garbage (NaN for floats, the
  largest value for integers) so code that reads uninitialised memory fails loudly.
* Only names that exist in real CuPy 13 are offered (the lists live in ``tests/cupy_api.py``);
  anything else raises AttributeError, as does any ``cupy.ndarray`` method CuPy lacks.
* ``cupy.random.default_rng(seed)`` draws a stream DIFFERENT from ``numpy.random.default_rng(seed)``
  (as real CuPy does), and its Generator offers only CuPy's methods (no ``normal``, ``choice``,
  ``permutation`` ...).
* Dtypes CuPy cannot hold (object, str, bytes, datetime) raise ValueError.

Deliberately NOT provided: ``cupy.ElementwiseKernel``, ``cupy.RawKernel``,
``cupy.ReductionKernel``, ``cupy.RawModule`` and ``cupy.fuse``. CUDA-C kernels cannot run here, so
code that would use them must check ``hasattr(cupy, "ElementwiseKernel")`` (or
``getattr(cupy, "IS_FAKE", False)``) and fall back to its generic array-op path under the fake.

Not modelled: CuPy's own dtype-promotion quirks, streams/concurrency, memory-pool accounting
(``used_bytes()`` is 0), multi-GPU.
"""

from __future__ import annotations

import contextlib
import operator
import os
import pickle
import sys
import time
import types

import numpy as np

try:  # imported as ``fakecupy`` (tests/ on sys.path) or as ``tests.fakecupy``
    from . import cupy_api as api  # type: ignore[no-redef]
except ImportError:  # pragma: no cover - plain module import
    import cupy_api as api  # type: ignore[no-redef]

IS_FAKE = True
__version__ = "13.3.0+fake"

# Refuse NumPy arrays even where real CuPy would silently copy them to the device (an index
# array, the value of an advanced __setitem__, cupyx.scatter_add values). Set
# TINYGRAD_LLM_FAKE_CUDA_LENIENT=1 to accept them as CuPy does.
STRICT_HOST_ARRAYS = os.environ.get("TINYGRAD_LLM_FAKE_CUDA_LENIENT", "0") != "1"

IMPLICIT_CONVERSION_MESSAGE = (
    "Implicit conversion to a NumPy array is not allowed. "
    "Please use `.get()` to construct a NumPy array explicitly."
)

_SCALARS = (bool, int, float, complex, np.generic)
_BAD_KINDS = "OUSVMm"  # object, unicode, bytes, void, datetime, timedelta: not in CuPy


# ===================================================================== sync counter
class _SyncCounter:
    def __init__(self):
        self.total = 0


_COUNTER = _SyncCounter()


def _sync() -> None:
    _COUNTER.total += 1


def sync_count() -> int:
    """Device-to-host synchronisations since the last reset."""
    return _COUNTER.total


def reset_sync_count() -> None:
    _COUNTER.total = 0


class _SyncCount:
    def __init__(self, start):
        self._start = start
        self._end = None

    @property
    def count(self) -> int:
        end = _COUNTER.total if self._end is None else self._end
        return end - self._start


@contextlib.contextmanager
def count_syncs():
    """``with count_syncs() as syncs: ...`` then ``syncs.count`` is the syncs inside the block."""
    counter = _SyncCount(_COUNTER.total)
    try:
        yield counter
    finally:
        counter._end = _COUNTER.total


# ===================================================================== conversion helpers
def _unsupported(x, where=""):
    extra = f" (given to {where})" if where else ""
    if isinstance(x, np.ndarray):
        extra += (" [fakecupy: a NumPy array cannot take part in a device op; move it to the "
                  "device with cupy.asarray() first]")
    return TypeError(f"Unsupported type {type(x)}{extra}")


def _check_dtype(dtype) -> None:
    dtype = np.dtype(dtype)
    if dtype.kind in _BAD_KINDS:
        raise ValueError(f"Unsupported dtype {dtype}")


def _new(array: np.ndarray) -> ndarray:
    """Wrap a NumPy array (no copy)."""
    if array.dtype.kind in _BAD_KINDS:
        raise ValueError(f"Unsupported dtype {array.dtype}")
    out = object.__new__(ndarray)
    out._a = array
    return out


def _wrap(result, wrap_python_scalars=False):
    """NumPy results -> fake arrays; NumPy scalars (from reductions) -> 0-d fake arrays."""
    if isinstance(result, np.ndarray):
        return _new(result)
    if isinstance(result, np.generic):
        return _new(np.asarray(result))
    if isinstance(result, tuple):
        return tuple(_wrap(r, wrap_python_scalars) for r in result)
    if isinstance(result, list):
        return [_wrap(r, wrap_python_scalars) for r in result]
    if wrap_python_scalars and isinstance(result, (bool, int, float, complex)):
        return _new(np.asarray(result))
    return result


def _operand(x, where=""):
    """An operand of an elementwise op: a fake array or a scalar, never a NumPy array or list."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _SCALARS):
        return x
    raise _unsupported(x, where)


def _arg(x, where=""):
    """A general argument: fake arrays unwrapped (also in lists/tuples); NumPy arrays refused."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise _unsupported(x, where)
    if type(x) in (list, tuple):
        return type(x)(_arg(e, where) for e in x)
    return x


def _host_data(x):
    """Data for a host-to-device copy: NumPy arrays, lists, scalars; fake arrays unwrapped."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, (list, tuple)):
        if any(isinstance(e, (ndarray, list, tuple)) for e in x):
            return [_host_data(e) for e in x]
    return x


def _out_kwarg(kwargs, where):
    """Unwrap ``out=``; return the fake ``out`` to hand back (or None)."""
    out = kwargs.get("out")
    if out is None:
        return None
    if isinstance(out, ndarray):
        kwargs["out"] = out._a
        return out
    if isinstance(out, tuple) and all(isinstance(o, ndarray) for o in out):
        kwargs["out"] = tuple(o._a for o in out)
        return out
    raise _unsupported(out, where + " out=")


def _garbage(array: np.ndarray) -> np.ndarray:
    """Fill 'uninitialised' memory with values that make its use obvious."""
    kind = array.dtype.kind
    if kind in "fc":
        array.fill(np.nan)
    elif kind in "iu":
        array.fill(np.iinfo(array.dtype).max)
    elif kind == "b":
        array.fill(True)
    return array


# ===================================================================== indexing
def _slice_bound(b):
    if isinstance(b, ndarray):
        return operator.index(b)  # a sync, as in CuPy
    if isinstance(b, np.ndarray):
        raise _unsupported(b, "a slice bound")
    return b


def _index(key, where="an index"):
    """Convert an index for NumPy. Returns (index tuple, has_mask, has_int_array)."""
    items = key if isinstance(key, tuple) else (key,)
    out = []
    mask = int_array = False
    for s in items:
        if s is None or s is Ellipsis:
            out.append(s)
        elif isinstance(s, slice):
            out.append(slice(_slice_bound(s.start), _slice_bound(s.stop), _slice_bound(s.step)))
        elif isinstance(s, ndarray):
            kind = s.dtype.kind
            if kind == "b":
                mask = True
            elif kind in "iu":
                int_array = True
            else:
                raise IndexError("arrays used as indices must be of integer or boolean type. "
                                 f"(actual: {s.dtype.type})")
            out.append(s._a)
        elif isinstance(s, np.ndarray):
            if STRICT_HOST_ARRAYS:
                raise _unsupported(s, where)
            out.append(s)
            mask |= s.dtype.kind == "b"
            int_array |= s.dtype.kind in "iu"
        elif isinstance(s, list):  # CuPy copies a list index to the device (no sync)
            arr = np.asarray(_host_data(s))
            if arr.size == 0:
                arr = arr.astype(np.int32)
            if arr.dtype.kind not in "biu":
                raise IndexError("arrays used as indices must be of integer (or boolean) type")
            mask |= arr.dtype.kind == "b"
            int_array |= arr.dtype.kind in "iu"
            out.append(arr)
        elif isinstance(s, (bool, np.bool_)):
            out.append(s)
        elif isinstance(s, (int, np.integer)):
            out.append(s)
        else:
            raise IndexError("only integers, slices (`:`), ellipsis (`...`), numpy.newaxis "
                             "(`None`) and integer or boolean arrays are valid indices")
    if not any(s is Ellipsis for s in out):
        out.append(Ellipsis)  # so a full integer index gives a 0-d view, as in CuPy
    return tuple(out), mask, int_array


def _wrap_index_error(error, int_array):
    if int_array:
        return IndexError(f"{error} [fakecupy: real CuPy would silently wrap this out-of-range "
                          "integer-array index around]")
    return error


# ===================================================================== ndarray
class _Flags:
    def __init__(self, array):
        self.c_contiguous = bool(array.flags.c_contiguous)
        self.f_contiguous = bool(array.flags.f_contiguous)
        self.owndata = bool(array.flags.owndata)

    def __getitem__(self, name):
        key = {"C_CONTIGUOUS": "c_contiguous", "C": "c_contiguous", "F_CONTIGUOUS": "f_contiguous",
               "F": "f_contiguous", "OWNDATA": "owndata"}[name]
        return getattr(self, key)

    def __repr__(self):
        return (f"  C_CONTIGUOUS : {self.c_contiguous}\n  F_CONTIGUOUS : {self.f_contiguous}\n"
                f"  OWNDATA : {self.owndata}")


class _MemoryPointer:
    def __init__(self, array):
        self.ptr = array.ctypes.data
        self.device_id = 0
        self.mem = None


_GENERIC_METHODS = frozenset(api.NDARRAY_METHODS) - {
    "astype", "copy", "dump", "dumps", "fill", "get", "item", "nonzero", "compress", "put",
    "reduced_view", "reshape", "scatter_add", "scatter_max", "scatter_min", "set", "sort",
    "argsort", "take", "tobytes", "tofile", "tolist", "transpose", "view", "ptp", "repeat",
}


def _binary(npname, reflected=False):
    func = getattr(np, npname)

    def op(self, other):
        if isinstance(other, np.ndarray):
            raise _unsupported(other, f"cupy.ndarray operator ({npname})")
        if not isinstance(other, (ndarray,) + _SCALARS):
            return NotImplemented
        other = other._a if isinstance(other, ndarray) else other
        return _wrap(func(other, self._a) if reflected else func(self._a, other))

    op.__name__ = npname
    return op


def _inplace(npname):
    func = getattr(np, npname)

    def op(self, other):
        func(self._a, _operand(other, f"cupy.ndarray in-place operator ({npname})"), out=self._a)
        return self

    op.__name__ = f"i{npname}"
    return op


class ndarray:
    """Fake ``cupy.ndarray``: a NumPy array held 'on the device'."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100
    __array_ufunc__ = None  # NumPy ufuncs refuse it; NumPy scalars defer to our reflected ops
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("fakecupy: ndarray(memptr=..., strides=...) is not modelled")
        _check_dtype(dtype)
        self._a = _garbage(np.empty(shape, dtype=dtype, order=order))

    # ---------------------------------------------------------------- NumPy interop: refused
    def __array__(self, dtype=None, copy=None):
        raise TypeError(IMPLICIT_CONVERSION_MESSAGE)

    def __array_function__(self, func, types_, args, kwargs):
        raise TypeError(
            f"fakecupy: numpy.{func.__name__}() was given a cupy.ndarray. "
            f"{IMPLICIT_CONVERSION_MESSAGE} (Real CuPy would dispatch it to "
            f"cupy.{func.__name__}; call xp.{func.__name__} on the array module instead.)")

    # ---------------------------------------------------------------- attributes
    def __getattr__(self, name):
        if name == "_a":
            raise AttributeError(name)
        if name in _GENERIC_METHODS:
            method = getattr(self._a, name)

            def forwarded(*args, **kwargs):
                out = _out_kwarg(kwargs, f"cupy.ndarray.{name}")
                args = [_arg(a, f"cupy.ndarray.{name}") for a in args]
                kwargs = {k: (v if k == "out" else _arg(v, f"cupy.ndarray.{name}"))
                          for k, v in kwargs.items()}
                result = method(*args, **kwargs)
                return out if out is not None else _wrap(result)

            forwarded.__name__ = name
            return forwarded
        raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}")

    def __dir__(self):
        return sorted(set(api.NDARRAY_METHODS) | set(api.NDARRAY_ATTRIBUTES))

    @property
    def shape(self):
        return self._a.shape

    @shape.setter
    def shape(self, value):
        self._a.shape = value

    @property
    def ndim(self):
        return self._a.ndim

    @property
    def size(self):
        return self._a.size

    @property
    def dtype(self):
        return self._a.dtype

    @property
    def itemsize(self):
        return self._a.itemsize

    @property
    def nbytes(self):
        return self._a.nbytes

    @property
    def strides(self):
        return self._a.strides

    @property
    def flags(self):
        return _Flags(self._a)

    @property
    def T(self):
        return self if self._a.ndim < 2 else _new(self._a.T)

    @property
    def base(self):
        return None if self._a.base is None else _new(np.asarray(self._a.base))

    @property
    def real(self):
        return _new(self._a.real)

    @property
    def imag(self):
        return _new(self._a.imag)

    @property
    def data(self):
        return _MemoryPointer(self._a)

    @property
    def device(self):
        return cuda.Device(0)

    # ---------------------------------------------------------------- host transfers (syncs)
    def get(self, stream=None, order="C", out=None, blocking=True):
        _sync()
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
            np.copyto(out, self._a)
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray (not {type(arr)})")
        if arr.dtype != self._a.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self._a.dtype} array")
        if arr.shape != self._a.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self._a.shape}, new shape: {arr.shape}")
        self._a[...] = arr

    def item(self):
        _sync()
        if self._a.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        return self._a.item()

    def tolist(self):
        _sync()
        return self._a.tolist()

    def tobytes(self, order="C"):
        _sync()
        return self._a.tobytes(order)

    def tofile(self, fid, sep="", format="%s"):
        _sync()
        self._a.tofile(fid, sep, format)

    def dump(self, file):
        pickle.dump(self, file, -1)

    def dumps(self):
        return pickle.dumps(self, -1)

    def __reduce__(self):
        _sync()
        return (_rebuild, (np.array(self._a, copy=True),))

    def __float__(self):
        _sync()
        return float(self._a)

    def __int__(self):
        _sync()
        return int(self._a)

    def __complex__(self):
        _sync()
        return complex(self._a)

    def __index__(self):
        _sync()
        if self._a.dtype.kind not in "iu":
            raise TypeError("only integer scalar arrays can be converted to a scalar index")
        return operator.index(self._a)

    def __bool__(self):
        if self._a.size == 0:
            raise ValueError("The truth value of an empty array is ambiguous.")
        if self._a.size > 1:
            raise ValueError("The truth value of an array with more than one element is "
                             "ambiguous. Use a.any() or a.all()")
        _sync()
        return bool(self._a.reshape(()))

    def __repr__(self):
        _sync()
        return repr(self._a)

    def __str__(self):
        _sync()
        return str(self._a)

    def __format__(self, spec):
        _sync()
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def __contains__(self, value):
        _sync()
        return bool((self._a == _operand(value, "in")).any())

    # ---------------------------------------------------------------- container
    def __len__(self):
        if self._a.ndim == 0:
            raise TypeError("len() of unsized object")
        return self._a.shape[0]

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._a.shape[0]))

    def __getitem__(self, key):
        index, mask, int_array = _index(key)
        if mask:
            _sync()  # CuPy reads the number of True values back to size the result
        try:
            return _wrap(self._a[index])
        except IndexError as error:
            raise _wrap_index_error(error, int_array) from None

    def __setitem__(self, key, value):
        index, mask, int_array = _index(key)
        if isinstance(value, np.ndarray):
            if STRICT_HOST_ARRAYS or not (mask or int_array):
                raise _unsupported(value, "cupy.ndarray.__setitem__")
        elif isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, (list, tuple)):
            if STRICT_HOST_ARRAYS or not (mask or int_array):
                raise _unsupported(value, "cupy.ndarray.__setitem__")
            value = np.asarray(_host_data(value))
        elif not isinstance(value, _SCALARS):
            raise _unsupported(value, "cupy.ndarray.__setitem__")
        if mask:
            _sync()
        try:
            self._a[index] = value
        except IndexError as error:
            raise _wrap_index_error(error, int_array) from None

    # ---------------------------------------------------------------- methods (explicit)
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        _check_dtype(dtype)
        if not copy and np.dtype(dtype) == self._a.dtype:
            return self
        return _new(self._a.astype(dtype, order=order or "K"))

    def copy(self, order="C"):
        return _new(self._a.copy(order=order))

    def view(self, dtype=None):
        return _new(self._a.view() if dtype is None else self._a.view(dtype))

    def fill(self, value):
        if isinstance(value, np.ndarray):
            if value.shape != ():
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            value = value.item()
        self._a.fill(_operand(value, "cupy.ndarray.fill"))

    def reshape(self, *shape, order="C"):
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = _int_sequence(shape[0], "cupy.ndarray.reshape")
        return _new(self._a.reshape(shape, order=order))

    def transpose(self, *axes):
        if len(axes) == 1 and not isinstance(axes[0], (int, np.integer)):
            axes = None if axes[0] is None else _int_sequence(axes[0], "cupy.ndarray.transpose")
        return _new(self._a.transpose(axes) if axes else self._a.transpose())

    def reduced_view(self, dtype=None):
        return self

    def sort(self, axis=-1, kind=None):
        self._a.sort(axis=axis, kind="stable")  # CuPy's sort is always stable

    def argsort(self, axis=-1, kind=None):
        return _new(self._a.argsort(axis=axis, kind="stable"))

    def nonzero(self):
        _sync()
        return _wrap(self._a.nonzero())

    def compress(self, condition, axis=None, out=None):
        _sync()
        result = self._a.compress(_arg(condition, "cupy.ndarray.compress"), axis=axis)
        if out is not None:
            out._a[...] = result
            return out
        return _new(result)

    def take(self, indices, axis=None, out=None):
        indices = _take_indices(indices, "cupy.ndarray.take")
        try:
            result = self._a.take(indices, axis=axis)
        except IndexError as error:
            raise _wrap_index_error(error, True) from None
        if out is not None:
            out._a[...] = result
            return out
        return _new(result)

    def put(self, indices, values, mode="wrap"):
        indices = _take_indices(indices, "cupy.ndarray.put")
        values = values._a if isinstance(values, ndarray) else _arg(values, "cupy.ndarray.put")
        if mode == "wrap":  # CuPy's default wraps silently; the fake insists on valid indices
            mode = "raise"
        try:
            self._a.put(indices, values, mode=mode)
        except IndexError as error:
            raise _wrap_index_error(error, True) from None

    def repeat(self, repeats, axis=None):
        if isinstance(repeats, (ndarray, np.ndarray)):
            raise ValueError("`repeats` should be an integer or a list/tuple of integers")
        return _new(self._a.repeat(repeats, axis=axis))

    def ptp(self, axis=None, out=None, keepdims=False):
        result = np.ptp(self._a, axis=axis, keepdims=keepdims)
        if out is not None:
            out._a[...] = result
            return out
        return _wrap(result)

    def scatter_add(self, slices, value):
        _scatter(self, slices, value, "add")

    def scatter_max(self, slices, value):
        _scatter(self, slices, value, "max")

    def scatter_min(self, slices, value):
        _scatter(self, slices, value, "min")

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    # ---------------------------------------------------------------- operators
    __add__ = _binary("add")
    __radd__ = _binary("add", True)
    __sub__ = _binary("subtract")
    __rsub__ = _binary("subtract", True)
    __mul__ = _binary("multiply")
    __rmul__ = _binary("multiply", True)
    __truediv__ = _binary("true_divide")
    __rtruediv__ = _binary("true_divide", True)
    __floordiv__ = _binary("floor_divide")
    __rfloordiv__ = _binary("floor_divide", True)
    __mod__ = _binary("remainder")
    __rmod__ = _binary("remainder", True)
    __divmod__ = _binary("divmod")
    __rdivmod__ = _binary("divmod", True)
    __pow__ = _binary("power")
    __rpow__ = _binary("power", True)
    __matmul__ = _binary("matmul")
    __rmatmul__ = _binary("matmul", True)
    __lshift__ = _binary("left_shift")
    __rlshift__ = _binary("left_shift", True)
    __rshift__ = _binary("right_shift")
    __rrshift__ = _binary("right_shift", True)
    __and__ = _binary("bitwise_and")
    __rand__ = _binary("bitwise_and", True)
    __or__ = _binary("bitwise_or")
    __ror__ = _binary("bitwise_or", True)
    __xor__ = _binary("bitwise_xor")
    __rxor__ = _binary("bitwise_xor", True)
    __lt__ = _binary("less")
    __le__ = _binary("less_equal")
    __gt__ = _binary("greater")
    __ge__ = _binary("greater_equal")
    __eq__ = _binary("equal")
    __ne__ = _binary("not_equal")

    __iadd__ = _inplace("add")
    __isub__ = _inplace("subtract")
    __imul__ = _inplace("multiply")
    __itruediv__ = _inplace("true_divide")
    __ifloordiv__ = _inplace("floor_divide")
    __imod__ = _inplace("remainder")
    __ipow__ = _inplace("power")
    __ilshift__ = _inplace("left_shift")
    __irshift__ = _inplace("right_shift")
    __iand__ = _inplace("bitwise_and")
    __ior__ = _inplace("bitwise_or")
    __ixor__ = _inplace("bitwise_xor")

    def __imatmul__(self, other):
        self._a[...] = np.matmul(self._a, _operand(other, "@="))
        return self

    def __neg__(self):
        return _new(np.negative(self._a))

    def __pos__(self):
        return self

    def __abs__(self):
        return _new(np.absolute(self._a))

    def __invert__(self):
        return _new(np.invert(self._a))


ndarray.__module__ = "cupy"
ndarray.__qualname__ = "ndarray"


def _int_sequence(values, where):
    """A shape or axes argument: any sequence of ints, as CuPy does ``tuple(values)`` (a NumPy
    array of axes is host metadata, accepted; a cupy array would be read back: a sync each)."""
    if isinstance(values, ndarray):
        raise _unsupported(values, where)
    return tuple(operator.index(v) for v in values)


def _rebuild(host_array):
    return _new(np.array(host_array, copy=True))


def _take_indices(indices, where):
    if isinstance(indices, ndarray):
        if indices.dtype.kind not in "iu":
            raise IndexError("arrays used as indices must be of integer type")
        return indices._a
    if isinstance(indices, np.ndarray):
        if STRICT_HOST_ARRAYS:
            raise _unsupported(indices, where)
        return indices
    if isinstance(indices, (list, tuple)):
        return np.asarray(_host_data(indices), dtype=np.int64)
    if isinstance(indices, (int, np.integer)):
        return indices
    raise _unsupported(indices, where)


_SCATTER_DTYPES = {
    "add": (np.int32, np.float16, np.float32, np.float64, np.uint32, np.uint64),
    "max": (np.int32, np.float32, np.float64, np.uint32, np.uint64),
    "min": (np.int32, np.float32, np.float64, np.uint32, np.uint64),
}


def _scatter(target, slices, value, op):
    if not isinstance(target, ndarray):
        raise _unsupported(target, f"cupyx.scatter_{op}")
    index, mask, int_array = _index(slices, f"cupyx.scatter_{op}")
    if (mask or int_array) and target.dtype.type not in _SCATTER_DTYPES[op]:
        names = ", ".join(np.dtype(t).name for t in _SCATTER_DTYPES[op])
        np_op = {"add": "add", "max": "maximum", "min": "minimum"}[op]
        raise TypeError(f"cupy.{np_op}.at only supports {names} as data type "
                        f"(got {target.dtype})")
    if isinstance(value, np.ndarray) and STRICT_HOST_ARRAYS:
        raise _unsupported(value, f"cupyx.scatter_{op}")
    value = value._a if isinstance(value, ndarray) else value
    if isinstance(value, (list, tuple)):
        value = np.asarray(_host_data(value))
    if mask:
        _sync()
    ufunc = {"add": np.add, "max": np.maximum, "min": np.minimum}[op]
    try:
        ufunc.at(target._a, index, np.asarray(value).astype(target.dtype, copy=False))
    except IndexError as error:
        raise _wrap_index_error(error, True) from None


# ===================================================================== module functions
class ufunc:
    """Fake ``cupy.ufunc``: operands must be cupy arrays or scalars."""

    def __init__(self, name):
        self.__name__ = name
        self._np = getattr(np, name)

    def __repr__(self):
        return f"<ufunc 'cupy_{self.__name__}'>"

    def _args(self, args, kwargs):
        where = f"cupy.{self.__name__}"
        out = _out_kwarg(kwargs, where)
        args = [_operand(a, where) for a in args]
        for key, value in list(kwargs.items()):
            if key != "out":
                kwargs[key] = _arg(value, where)
        return args, out

    def __call__(self, *args, **kwargs):
        args, out = self._args(args, kwargs)
        result = self._np(*args, **kwargs)
        return out if out is not None else _wrap(result)

    def reduce(self, array, axis=0, dtype=None, out=None, keepdims=False):
        kwargs = {"out": out}
        out = _out_kwarg(kwargs, f"cupy.{self.__name__}.reduce")
        result = self._np.reduce(_operand(array), axis=axis, dtype=dtype, keepdims=keepdims,
                                 out=kwargs["out"])
        return out if out is not None else _wrap(result)

    def accumulate(self, array, axis=0, dtype=None, out=None):
        kwargs = {"out": out}
        out = _out_kwarg(kwargs, f"cupy.{self.__name__}.accumulate")
        result = self._np.accumulate(_operand(array), axis=axis, dtype=dtype, out=kwargs["out"])
        return out if out is not None else _wrap(result)

    def outer(self, a, b, **kwargs):
        args, out = self._args((a, b), kwargs)
        result = self._np.outer(*args, **kwargs)
        return out if out is not None else _wrap(result)

    def at(self, a, indices, b=None):
        if self.__name__ in ("add", "maximum", "minimum"):
            op = {"add": "add", "maximum": "max", "minimum": "min"}[self.__name__]
            _scatter(a, indices, 0 if b is None else b, op)
            return
        raise NotImplementedError(f"fakecupy: cupy.{self.__name__}.at is not modelled")


_UFUNC_LIKE = frozenset(api.UFUNCS) | {"where", "isclose", "allclose"}

_NON_ARRAY_FIRST = frozenset(api.HOST_INPUT_FUNCTIONS) | frozenset(api.SEQUENCE_FUNCTIONS) | {
    "empty", "zeros", "ones", "full", "eye", "identity", "arange", "linspace", "logspace",
    "tri", "indices", "diag_indices", "tril_indices", "triu_indices", "diag", "diagflat",
    "unravel_index", "einsum", "asnumpy", "get_array_module", "ndarray", "iscomplexobj",
    "isrealobj", "interp", "digitize", "in1d", "isin", "bincount", "histogram", "select",
    "convolve", "outer", "inner", "kron", "tensordot", "dot", "vdot", "matmul",
}

_EMPTY = {"empty", "empty_like"}
_KEEP_PYTHON_RESULT = {"iscomplexobj", "isrealobj"}


# CuPy names that newer NumPy dropped: implemented from what NumPy still has.
_NUMPY_FALLBACKS = {
    "in1d": lambda ar1, ar2, assume_unique=False, invert=False: np.isin(
        ar1, ar2, assume_unique=assume_unique, invert=invert).ravel(),
}


def _make_function(name):
    npfunc = getattr(np, name, None) or _NUMPY_FALLBACKS[name]
    where = f"cupy.{name}"
    sync = name in api.SYNC_FUNCTIONS
    array_first = name not in _NON_ARRAY_FIRST
    ufunc_like = name in _UFUNC_LIKE

    def function(*args, **kwargs):
        out = _out_kwarg(kwargs, where)
        if ufunc_like:
            args = [_operand(a, where) for a in args]
        else:
            if array_first and args and not isinstance(args[0], ndarray):
                raise _unsupported(args[0], where)
            args = [_arg(a, where) for a in args]
        kwargs = {k: (v if k == "out" else _arg(v, where)) for k, v in kwargs.items()}
        if name in ("sort", "argsort"):
            kwargs["kind"] = "stable"  # CuPy sorts stably, whatever kind says
        if "dtype" in kwargs and kwargs["dtype"] is not None and name not in ("einsum",):
            _check_dtype(kwargs["dtype"])
        if sync or (name == "where" and len(args) == 1):
            _sync()
        try:
            result = npfunc(*args, **kwargs)
        except IndexError as error:
            raise _wrap_index_error(error, name in ("take", "take_along_axis",
                                                     "put_along_axis", "put", "choose")) from None
        if name in _EMPTY:
            _garbage(result)
        if out is not None:
            return out
        return _wrap(result, wrap_python_scalars=name not in _KEEP_PYTHON_RESULT)

    function.__name__ = name
    function.__qualname__ = name
    function.__module__ = "cupy"
    function.__doc__ = f"fakecupy: cupy.{name}, forwarded to numpy.{name}."
    return function


def asarray(a, dtype=None, order=None, *, blocking=False):
    """A host-to-device copy for host data; a cupy array is returned as it is."""
    if dtype is not None:
        _check_dtype(dtype)
    if isinstance(a, ndarray):
        if dtype is None or np.dtype(dtype) == a.dtype:
            if order in (None, "K", "A") or (order == "C" and a._a.flags.c_contiguous) or (
                    order == "F" and a._a.flags.f_contiguous):
                return a
        return _new(np.asarray(a._a, dtype=dtype, order=order).copy(order=order or "K"))
    return _new(np.array(_host_data(a), dtype=dtype, order=order or "K", copy=True))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if dtype is not None:
        _check_dtype(dtype)
    if isinstance(obj, ndarray):
        if not copy and (dtype is None or np.dtype(dtype) == obj.dtype) and obj.ndim >= ndmin:
            return obj
        return _new(np.array(obj._a, dtype=dtype, order=order, copy=True, ndmin=ndmin))
    return _new(np.array(_host_data(obj), dtype=dtype, order=order, copy=True, ndmin=ndmin))


def asanyarray(a, dtype=None, order=None):
    return asarray(a, dtype=dtype, order=order)


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray) and a._a.flags.c_contiguous and (
            dtype is None or np.dtype(dtype) == a.dtype) and a.ndim >= 1:
        return a
    return _new(np.ascontiguousarray(_host_data(a), dtype=dtype).copy())


def asfortranarray(a, dtype=None):
    if isinstance(a, ndarray) and a._a.flags.f_contiguous and (
            dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return _new(np.asfortranarray(_host_data(a), dtype=dtype).copy(order="F"))


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    """Copy a cupy array to the host (a sync); other objects go through numpy.asarray."""
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    result = np.asarray(a, order=order)
    if out is not None:
        np.copyto(out, result)
        return out
    return result


def get_array_module(*args):
    for arg in args:
        if isinstance(arg, ndarray):
            return cupy
    return np


def _dtype_routine(name):
    npfunc = getattr(np, name)

    def function(*args, **kwargs):
        args = [a.dtype if isinstance(a, ndarray) else a for a in args]
        for a in args:
            if isinstance(a, np.ndarray):
                raise _unsupported(a, f"cupy.{name}")
        return npfunc(*args, **kwargs)

    function.__name__ = name
    return function


# ===================================================================== cupy.random
class BitGenerator:
    """Fake CuPy BitGenerator: a NumPy Philox seeded from a salted SeedSequence, so the stream
    differs from ``numpy.random.default_rng(seed)`` (PCG64 on the plain seed)."""

    _SALT = 0xC0DA_5EED

    def __init__(self, seed=None):
        if isinstance(seed, np.random.SeedSequence):
            sequence = np.random.SeedSequence(seed.entropy,
                                              spawn_key=seed.spawn_key + (self._SALT,))
        else:
            if isinstance(seed, ndarray):
                seed = seed.get()
            sequence = np.random.SeedSequence(seed, spawn_key=(self._SALT,))
        self._generator = np.random.Generator(np.random.Philox(sequence))

    def random_raw(self, size=None, output=True):
        return _new(np.asarray(self._generator.bit_generator.random_raw(size)))


class XORWOW(BitGenerator):
    pass


class MRG32k3a(BitGenerator):
    pass


class Philox4x3210(BitGenerator):
    pass


def _shape(size):
    if size is None:
        return ()
    return tuple(size) if isinstance(size, (tuple, list)) else (size,)


def _gparam(x, name, allowed=(float, int), error=TypeError):
    if isinstance(x, ndarray):
        return x._a
    if type(x) in allowed:
        return x
    raise error(f"{name} is required to be a cupy.ndarray or a scalar")


class Generator:
    """Fake ``cupy.random.Generator``: only CuPy's methods (see tests/cupy_api.py)."""

    def __init__(self, bit_generator):
        self.bit_generator = bit_generator
        self._rng = bit_generator._generator

    def random(self, size=None, dtype=np.float64, out=None):
        draw_dtype = np.float64 if np.dtype(dtype).char == "d" else np.float32
        result = _new(self._rng.random(_shape(size), dtype=draw_dtype).astype(dtype, copy=False))
        return _into(out, result)

    def uniform(self, low=0.0, high=1.0, size=None, dtype=np.float64):
        low, high = _arg(low, "uniform"), _arg(high, "uniform")
        if size is None:
            size = np.broadcast_shapes(np.shape(low), np.shape(high))
        draw_dtype = np.float64 if np.dtype(dtype).char == "d" else np.float32
        y = self._rng.random(_shape(size), dtype=draw_dtype)
        return _new(np.asarray(low + (high - low) * y).astype(dtype, copy=False))

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        lo, hi = (0, int(low)) if high is None else (int(low), int(high))
        if not endpoint:
            hi -= 1
        if lo > hi:
            raise ValueError("low >= high")
        info = np.iinfo(dtype)
        if lo < info.min:
            raise ValueError(f"low is out of bounds for {np.dtype(dtype).name}")
        if hi > info.max:
            raise ValueError(f"high is out of bounds for {np.dtype(dtype).name}")
        result = self._rng.integers(lo, hi, size=_shape(size), dtype=np.int64, endpoint=True)
        return _new(np.asarray(result).astype(dtype))

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        char = np.dtype(dtype).char
        if char not in "fd":
            raise TypeError(f"Unsupported dtype {np.dtype(dtype).name} for standard_normal")
        result = _new(np.asarray(self._rng.standard_normal(_shape(size), dtype=dtype)))
        return _into(out, result)

    def standard_exponential(self, size=None, dtype=np.float64, method="inv", out=None):
        if method == "zig":
            raise NotImplementedError("Ziggurat method is not supported")
        y = self._rng.standard_exponential(_shape(size))
        return _into(out, _new(np.asarray(y).astype(dtype, copy=False)))

    def exponential(self, scale=1.0, size=None):
        return self.standard_exponential(size) * scale

    def standard_gamma(self, shape, size=None, dtype=np.float64, out=None):
        if shape is None:
            raise TypeError("shape must be real number, not NoneType")
        shape = _gparam(shape, "shape", error=ValueError)
        if np.dtype(dtype).char not in "fd":
            raise TypeError(f"Unsupported dtype {np.dtype(dtype).name} for standard_gamma")
        size = np.shape(shape) if size is None else _shape(size)
        y = self._rng.standard_gamma(shape, size=size)
        return _into(out, _new(np.asarray(y).astype(dtype, copy=False)))

    def gamma(self, shape, scale=1.0, size=None):
        if size is None:
            size = np.broadcast_shapes(np.shape(_arg(shape)), np.shape(_arg(scale)))
        return self.standard_gamma(shape, size) * scale

    def beta(self, a, b, size=None, dtype=np.float64):
        a, b = _gparam(a, "a"), _gparam(b, "b")
        size = np.broadcast_shapes(np.shape(a), np.shape(b)) if size is None else _shape(size)
        return _new(np.asarray(self._rng.beta(a, b, size)).astype(dtype, copy=False))

    def binomial(self, n, p, size=None):
        n = _gparam(n, "n")
        p = _gparam(p, "p", allowed=(float,))
        size = np.broadcast_shapes(np.shape(n), np.shape(p)) if size is None else _shape(size)
        return _new(np.asarray(self._rng.binomial(np.asarray(n).astype(np.int64), p, size)))

    def chisquare(self, df, size=None):
        df = _gparam(df, "df")
        size = np.shape(df) if size is None else _shape(size)
        return _new(np.asarray(self._rng.chisquare(df, size), dtype=np.float64))

    def dirichlet(self, alpha, size=None):
        alpha = _gparam(alpha, "alpha")
        return _new(np.asarray(self._rng.dirichlet(np.atleast_1d(alpha), size)))

    def f(self, dfnum, dfden, size=None):
        dfnum, dfden = _gparam(dfnum, "dfnum"), _gparam(dfden, "dfden")
        if size is None:
            size = np.broadcast_shapes(np.shape(dfnum), np.shape(dfden))
        return _new(np.asarray(self._rng.f(dfnum, dfden, _shape(size)), dtype=np.float64))

    def geometric(self, p, size=None):
        p = _gparam(p, "p")
        size = np.shape(p) if size is None else _shape(size)
        return _new(np.asarray(self._rng.geometric(p, size)).astype(np.int64))

    def hypergeometric(self, ngood, nbad, nsample, size=None):
        ngood, nbad = _gparam(ngood, "ngood"), _gparam(nbad, "nbad")
        nsample = _gparam(nsample, "nsample")
        if size is None:
            size = np.broadcast_shapes(np.shape(ngood), np.shape(nbad), np.shape(nsample))
        y = self._rng.hypergeometric(ngood, nbad, nsample, _shape(size))
        return _new(np.asarray(y).astype(np.int64))

    def logseries(self, p, size=None):
        p = _gparam(p, "p")
        size = np.shape(p) if size is None else _shape(size)
        return _new(np.asarray(self._rng.logseries(p, size)).astype(np.int64))

    def poisson(self, lam=1.0, size=None):
        lam = _gparam(lam, "lam")
        size = np.shape(lam) if size is None else _shape(size)
        return _new(np.asarray(self._rng.poisson(lam, size)).astype(np.int64))

    def power(self, a, size=None):
        a = _gparam(a, "a")
        size = np.shape(a) if size is None else _shape(size)
        return _new(np.asarray(self._rng.power(a, size), dtype=np.float64))


def _into(out, result):
    if out is None:
        return result
    if not isinstance(out, ndarray):
        raise _unsupported(out, "out=")
    if out.dtype != result.dtype or out.shape != result.shape:
        raise TypeError("Supplied output array has the wrong type or shape")
    out._a[...] = result._a
    return out


def default_rng(seed=None):
    """Fake ``cupy.random.default_rng``: a stream that differs from NumPy's for the same seed."""
    if isinstance(seed, Generator):
        return seed
    if isinstance(seed, BitGenerator):
        return Generator(seed)
    return Generator(XORWOW(seed))


class RandomState:
    """Fake legacy ``cupy.random.RandomState`` (the easy subset)."""

    _SALT = 0x1E6A_C7

    def __init__(self, seed=None, method=None):
        self.seed(seed)

    def seed(self, seed=None):
        if isinstance(seed, ndarray):
            seed = seed.get()
        sequence = np.random.SeedSequence(seed, spawn_key=(self._SALT,))
        self._rng = np.random.Generator(np.random.Philox(sequence))

    def rand(self, *size, dtype=float):
        return self.random_sample(size, dtype=dtype)

    def randn(self, *size, dtype=float):
        return self.normal(size=size, dtype=dtype)

    def random_sample(self, size=None, dtype=float):
        return _new(np.asarray(self._rng.random(_shape(size))).astype(dtype))

    def randint(self, low, high=None, size=None, dtype="l"):
        lo, hi = (0, int(low)) if high is None else (int(low), int(high))
        return _new(np.asarray(self._rng.integers(lo, hi, _shape(size))).astype(dtype))

    def uniform(self, low=0.0, high=1.0, size=None, dtype=float):
        low, high = _arg(low, "uniform"), _arg(high, "uniform")
        return _new(np.asarray(self._rng.uniform(low, high, size)).astype(dtype))

    def normal(self, loc=0.0, scale=1.0, size=None, dtype=float):
        loc, scale = _arg(loc, "normal"), _arg(scale, "normal")
        return _new(np.asarray(self._rng.normal(loc, scale, size)).astype(dtype))

    def standard_normal(self, size=None, dtype=float):
        return self.normal(size=size, dtype=dtype)

    def choice(self, a, size=None, replace=True, p=None):
        a = _arg(a, "choice")
        p = None if p is None else _arg(p, "choice")
        return _new(np.asarray(self._rng.choice(a, _shape(size) if size is not None else None,
                                                replace=replace, p=p)))

    def permutation(self, num):
        if isinstance(num, ndarray):
            return _new(self._rng.permutation(num._a))
        if isinstance(num, (int, np.integer)):
            return _new(self._rng.permutation(num))
        raise _unsupported(num, "cupy.random.permutation")

    def shuffle(self, a):
        if not isinstance(a, ndarray):
            raise TypeError("The array must be cupy.ndarray")
        self._rng.shuffle(a._a)


_random_state = RandomState()


def _legacy(name):
    def function(*args, **kwargs):
        return getattr(_random_state, name)(*args, **kwargs)

    function.__name__ = name
    return function


def get_random_state():
    return _random_state


# ===================================================================== cupy.cuda
class CUDARuntimeError(RuntimeError):
    pass


class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    def synchronize(self):
        _sync()

    def use(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __int__(self):
        return self.id

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id}>"

    @property
    def compute_capability(self):
        return "90"

    @property
    def mem_info(self):
        return (80 << 30, 80 << 30)


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._time = None

    def record(self, stream=None):
        self._time = time.perf_counter()

    def synchronize(self):
        _sync()

    @property
    def done(self):
        return True


def get_elapsed_time(start_event, end_event):
    return (end_event._time - start_event._time) * 1000.0


class Stream:
    null = None  # set below

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0 if null else id(self)

    def synchronize(self):
        _sync()

    def use(self):
        global _current_stream
        _current_stream = self
        return self

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        pass

    @property
    def done(self):
        return True

    def __enter__(self):
        global _current_stream
        self._previous = _current_stream
        _current_stream = self
        return self

    def __exit__(self, *exc):
        global _current_stream
        _current_stream = self._previous
        return False


Stream.null = Stream(null=True)
_current_stream = Stream.null


def get_current_stream():
    return _current_stream


class MemoryPool:
    """Memory-pool accounting is not modelled: used/total bytes are 0."""

    def __init__(self, allocator=None):
        self._limit = 0

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_bytes(self):
        return 0

    def n_free_blocks(self):
        return 0

    def free_all_blocks(self, stream=None):
        pass

    def set_limit(self, size=None, fraction=None):
        self._limit = size or 0

    def get_limit(self):
        return self._limit


class PinnedMemoryPool:
    def free_all_blocks(self):
        pass

    def n_free_blocks(self):
        return 0


_memory_pool = MemoryPool()
_pinned_memory_pool = PinnedMemoryPool()


def get_default_memory_pool():
    return _memory_pool


def get_default_pinned_memory_pool():
    return _pinned_memory_pool


_DEVICE_PROPERTIES = {
    "name": b"FakeCuPy", "totalGlobalMem": 80 << 30, "major": 9, "minor": 0,
    "multiProcessorCount": 132, "warpSize": 32, "maxThreadsPerBlock": 1024,
    "sharedMemPerBlock": 49152, "clockRate": 1_980_000, "pciBusID": 0,
}


def _runtime_module():
    runtime = types.ModuleType("cupy.cuda.runtime")
    runtime.getDeviceCount = lambda: 1
    runtime.getDevice = lambda: 0

    def setDevice(device):  # noqa: N802 - CuPy's name
        Device(device)

    def getDeviceProperties(device):  # noqa: N802
        Device(device)
        return dict(_DEVICE_PROPERTIES)

    def deviceSynchronize():  # noqa: N802
        _sync()

    runtime.setDevice = setDevice
    runtime.getDeviceProperties = getDeviceProperties
    runtime.deviceSynchronize = deviceSynchronize
    runtime.runtimeGetVersion = lambda: 12040
    runtime.driverGetVersion = lambda: 12040
    runtime.memGetInfo = lambda: (80 << 30, 80 << 30)
    runtime.is_hip = False
    runtime.CUDARuntimeError = CUDARuntimeError
    return runtime


def _cuda_module():
    cuda_module = types.ModuleType("cupy.cuda")
    cuda_module.runtime = _runtime_module()
    cuda_module.Device = Device
    cuda_module.Stream = Stream
    cuda_module.Event = Event
    cuda_module.get_current_stream = get_current_stream
    cuda_module.get_elapsed_time = get_elapsed_time
    cuda_module.MemoryPool = MemoryPool
    cuda_module.PinnedMemoryPool = PinnedMemoryPool
    cuda_module.is_available = lambda: True
    cuda_module.CUDARuntimeError = CUDARuntimeError
    return cuda_module


# ===================================================================== assemble the modules
def _build_cupy():
    module = types.ModuleType("cupy", "Fake CuPy on NumPy (tests/fakecupy.py).")
    module.__version__ = __version__
    module.IS_FAKE = True
    module.__path__ = []  # a package, so ``import cupy.random`` resolves via sys.modules
    for name in api.UFUNCS:
        setattr(module, name, ufunc(name))
    special = {
        "asarray": asarray, "array": array, "asanyarray": asanyarray,
        "ascontiguousarray": ascontiguousarray, "asfortranarray": asfortranarray,
        "asnumpy": asnumpy, "get_array_module": get_array_module, "ndarray": ndarray,
    }
    for name in api.FUNCTIONS:
        setattr(module, name, special[name] if name in special else _make_function(name))
    for name in api.DTYPE_ROUTINES:
        setattr(module, name, np.dtype if name == "dtype" else _dtype_routine(name))
    for name in api.DTYPES:
        setattr(module, name, getattr(np, name))
    for name in api.CONSTANTS:
        setattr(module, name, getattr(np, name))
    module.ufunc = ufunc
    module.get_default_memory_pool = get_default_memory_pool
    module.get_default_pinned_memory_pool = get_default_pinned_memory_pool
    module.is_available = lambda: True

    random_module = types.ModuleType("cupy.random")
    for name in api.RANDOM_FUNCTIONS:
        if name in ("default_rng", "get_random_state", "RandomState", "Generator"):
            continue
        if name == "seed":
            random_module.seed = _legacy("seed")
            continue
        target = {"random": "random_sample", "ranf": "random_sample",
                  "sample": "random_sample"}.get(name, name)
        setattr(random_module, name, _legacy(target))
    random_module.default_rng = default_rng
    random_module.get_random_state = get_random_state
    random_module.RandomState = RandomState
    random_module.Generator = Generator
    random_module.BitGenerator = BitGenerator
    random_module.XORWOW = XORWOW
    random_module.MRG32k3a = MRG32k3a
    random_module.Philox4x3210 = Philox4x3210
    module.random = random_module
    module.cuda = _cuda_module()
    return module


def _build_cupyx():
    module = types.ModuleType("cupyx", "Fake cupyx (tests/fakecupy.py).")
    module.IS_FAKE = True

    def scatter_add(a, slices, value):
        """In place ``a[slices] += value``, adding up repeated indices; out-of-range raises."""
        _scatter(a, slices, value, "add")

    def scatter_max(a, slices, value):
        _scatter(a, slices, value, "max")

    def scatter_min(a, slices, value):
        _scatter(a, slices, value, "min")

    def empty_pinned(shape, dtype=float, order="C"):
        return np.empty(shape, dtype=dtype, order=order)

    def zeros_pinned(shape, dtype=float, order="C"):
        return np.zeros(shape, dtype=dtype, order=order)

    def empty_like_pinned(a, dtype=None, order="K", subok=None, shape=None):
        return np.empty_like(a, dtype=dtype, order=order, shape=shape)

    def zeros_like_pinned(a, dtype=None, order="K", subok=None, shape=None):
        return np.zeros_like(a, dtype=dtype, order=order, shape=shape)

    for function in (scatter_add, scatter_max, scatter_min, empty_pinned, zeros_pinned,
                     empty_like_pinned, zeros_like_pinned):
        setattr(module, function.__name__, function)
    return module


cupy = _build_cupy()
cupyx = _build_cupyx()
cuda = cupy.cuda
random = cupy.random

_MODULES = {
    "cupy": cupy,
    "cupy.random": cupy.random,
    "cupy.cuda": cupy.cuda,
    "cupy.cuda.runtime": cupy.cuda.runtime,
    "cupyx": cupyx,
}
_saved: dict | None = None


def install() -> None:
    """Put the fake in ``sys.modules`` (idempotent); ``uninstall()`` restores what was there."""
    global _saved
    if _saved is None:
        _saved = {name: sys.modules.get(name) for name in _MODULES}
    sys.modules.update(_MODULES)


def uninstall() -> None:
    global _saved
    if _saved is None:
        return
    for name, previous in _saved.items():
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
    _saved = None


def installed() -> bool:
    return sys.modules.get("cupy") is cupy
