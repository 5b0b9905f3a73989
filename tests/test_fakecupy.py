"""Tests of the CuPy stand-in itself (tests/fakecupy.py), used directly: nothing is installed
into ``sys.modules`` here except inside the fixture that restores it."""

import pickle
import sys

import cupy_api as api
import fakecupy
import numpy as np
import pytest

cp = fakecupy.cupy
cupyx = fakecupy.cupyx


def fake(array):
    return cp.asarray(np.asarray(array))


# ------------------------------------------------------------------ refusing NumPy
def test_numpy_cannot_convert_it_implicitly():
    a = cp.arange(3)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(a)
    with pytest.raises(TypeError):
        np.array([a, a])
    with pytest.raises(TypeError):
        np.exp(a)
    with pytest.raises(TypeError):
        np.sum(a)
    with pytest.raises(TypeError):
        np.concatenate([np.ones(3), a])


@pytest.mark.parametrize("host", [np.ones(3), np.array(1.0)], ids=["1d", "0d"])
def test_numpy_arrays_do_not_mix_with_fake_arrays(host):
    a = cp.ones(3)
    for op in (lambda: a + host, lambda: host + a, lambda: a * host, lambda: a < host,
               lambda: cp.maximum(a, host), lambda: cp.where(a > 0, a, host),
               lambda: cp.concatenate([a, host]), lambda: cp.dot(a, host)):
        with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
            op()
    with pytest.raises(TypeError):
        a += host


def test_numpy_arrays_are_not_indices_or_setitem_values():
    a = cp.arange(5)
    with pytest.raises(TypeError):
        a[np.array([0, 1])]
    with pytest.raises(TypeError):
        a[np.array([True, False, True, False, True])]
    with pytest.raises(TypeError):
        a[:2] = np.array([7, 8])
    with pytest.raises(TypeError):
        cp.take(a, np.array([0]))


def test_scalars_python_and_numpy_are_fine_operands():
    a = cp.arange(3, dtype=cp.float32)
    for result in (a + 1, 1 + a, a * np.float32(2), np.float32(2) * a, 2.0 - a, a / np.int64(2),
                   a ** 2, -a, abs(a), cp.maximum(a, 1.0), cp.where(a > 1, a, 0.0)):
        assert isinstance(result, cp.ndarray)
    np.testing.assert_allclose((np.float32(2) * a).get(), [0, 2, 4])


def test_lists_follow_cupy():
    assert cp.asarray([1, 2]).shape == (2,)
    assert cp.array([[1.0], [2.0]]).shape == (2, 1)
    with pytest.raises(TypeError, match="Unsupported type <class 'list'>"):
        cp.exp([1.0, 2.0])
    with pytest.raises(TypeError):
        cp.sum([1, 2])
    assert cp.zeros([2, 3]).shape == (2, 3)  # shapes may be lists
    assert cp.arange(4)[[0, 2]].tolist() == [0, 2]  # a list index is copied to the device
    assert cp.concatenate([cp.ones(1), cp.zeros(2)]).shape == (3,)


def test_object_and_string_dtypes_are_refused():
    with pytest.raises(ValueError):
        cp.asarray(["a", "b"])
    with pytest.raises(ValueError):
        cp.zeros(2, dtype=object)


# ------------------------------------------------------------------ syncs
def test_host_reads_count_as_syncs_and_device_ops_do_not():
    a = cp.arange(6, dtype=cp.float32).reshape(2, 3)
    b = cp.ones((2, 3), dtype=cp.float32)
    with fakecupy.count_syncs() as syncs:
        c = a + b
        total = c.sum()
        cp.exp(a)
        _ = a[0, 1]
        _ = a @ b.T
        len(a)
        _ = a.shape
        list(iter(a))
        a[cp.asarray([1, 0])]
    assert syncs.count == 0
    assert isinstance(total, cp.ndarray) and total.shape == ()
    for read in (lambda: float(total), lambda: int(a[0, 0]), lambda: bool(a[0, 0] > 0),
                 lambda: total.item(), lambda: a.tolist(), lambda: a.get(),
                 lambda: cp.asnumpy(a), lambda: repr(a), lambda: str(a),
                 lambda: f"{total:.2f}", lambda: range(cp.asarray(3)),
                 lambda: a[a > 2], lambda: cp.flatnonzero(a), lambda: a.nonzero(),
                 lambda: pickle.dumps(a), lambda: cp.cuda.Device().synchronize(),
                 lambda: cp.cuda.Stream.null.synchronize()):
        with fakecupy.count_syncs() as syncs:
            read()
        assert syncs.count == 1, read
    fakecupy.reset_sync_count()
    float(total)
    assert fakecupy.sync_count() == 1


# ------------------------------------------------------------------ out-of-range indices
def test_out_of_range_integer_array_indices_raise_instead_of_wrapping():
    a = cp.arange(3)
    ids = cp.asarray([0, 3])
    with pytest.raises(IndexError, match="silently wrap"):
        a[ids]
    with pytest.raises(IndexError):
        a[ids] = 1
    with pytest.raises(IndexError):
        cp.take(a, ids)
    with pytest.raises(IndexError):
        a.take(ids)
    with pytest.raises(IndexError):
        cp.take_along_axis(a, ids, axis=0)
    with pytest.raises(IndexError):
        cupyx.scatter_add(cp.zeros(3), ids, 1.0)
    assert a[cp.asarray([-1])].tolist() == [2]  # negative indices in range are fine


def test_scatter_add_adds_repeats_in_place():
    target = cp.zeros((3, 2), dtype=cp.float32)
    cupyx.scatter_add(target, cp.asarray([0, 0, 2]), cp.ones((3, 2), dtype=cp.float32))
    np.testing.assert_array_equal(target.get(), [[2, 2], [0, 0], [1, 1]])
    with pytest.raises(TypeError, match="only supports"):  # as cupy.add.at: no int64
        cupyx.scatter_add(cp.zeros(3, dtype=cp.int64), cp.asarray([0]), 1)


# ------------------------------------------------------------------ the API lists
@pytest.mark.parametrize("name", api.NUMPY_ONLY + api.NOT_PROVIDED)
def test_names_cupy_lacks_are_refused(name):
    with pytest.raises(AttributeError, match=f"module 'cupy' has no attribute '{name}'"):
        getattr(cp, name)


def test_the_library_needs_are_all_offered():
    missing = [name for name in api.LIBRARY_REQUIRED if not hasattr(cp, name)]
    assert not missing


def test_only_listed_methods_exist_on_ndarray():
    a = cp.ones(3)
    for name in api.NDARRAY_METHODS + api.NDARRAY_ATTRIBUTES:
        getattr(a, name)
    for name in ("tostring", "itemset", "resize", "byteswap", "newbyteorder", "setflags",
                 "__array_interface__", "ctypes", "mT"):
        with pytest.raises(AttributeError):
            getattr(a, name)


def _example_args(name):
    """A small example call for each listed function: (args, kwargs)."""
    x = np.array([[0.5, 0.25, 0.75], [0.1, 0.9, 0.3]])
    i = np.array([[0, 2, 1], [1, 0, 2]])
    v = np.array([3.0, 1.0, 2.0, 1.0])
    table = {
        "arctan2": (x, x), "hypot": (x, x), "copysign": (x, x), "nextafter": (x, x),
        "logaddexp": (x, x), "logaddexp2": (x, x), "heaviside": (x, x), "float_power": (x, 2),
        "power": (x, 2), "ldexp": (x, i), "arccosh": (x + 1,),
        "left_shift": (i, 1), "right_shift": (i, 1), "bitwise_and": (i, i), "bitwise_or": (i, i),
        "bitwise_xor": (i, i), "invert": (i,), "logical_and": (x, x), "logical_or": (x, x),
        "logical_xor": (x, x),
        "empty": ((2, 3),), "zeros": ((2, 3),), "ones": ((2, 3),), "full": ((2, 3), 7.0),
        "eye": (3,), "identity": (3,), "arange": (5,), "linspace": (0, 1, 5),
        "logspace": (0, 1, 5), "tri": (3,), "indices": ((2, 3),), "diag_indices": (3,),
        "tril_indices": (3,), "triu_indices": (3,), "full_like": (x, 2.0), "diag": (v,),
        "diagflat": (v,), "meshgrid": (v, v), "copyto": (x.copy(), x),
        "reshape": (x, (3, 2)), "moveaxis": (x, 0, 1), "rollaxis": (x, 1), "swapaxes": (x, 0, 1),
        "broadcast_to": (v, (2, 4)), "broadcast_arrays": (x, x[:1]), "expand_dims": (x, 0),
        "concatenate": ([x, x],), "stack": ([x, x],), "vstack": ([x, x],), "hstack": ([x, x],),
        "dstack": ([x, x],), "column_stack": ([v, v],), "split": (v, 2), "array_split": (v, 3),
        "hsplit": (x[:, :2], 2), "vsplit": (x, 2), "tile": (v, 2), "repeat": (v, 2),
        "append": (v, v), "roll": (v, 1), "pad": (v, 1), "trim_zeros": (v,),
        "take": (v, np.array([0, 3])), "take_along_axis": (x, i, 1),
        "put_along_axis": (x.copy(), i, 0.0, 1), "choose": (np.array([0, 1, 0]), [v[:3], v[1:]]),
        "compress": (np.array([True, False, True]), v[:3]), "where": (x > 0.3, x, 0.0),
        "extract": (x > 0.3, x), "select": ([x > 0.3], [x]), "put": (v.copy(), np.array([0]), 9.0),
        "putmask": (v.copy(), v > 1, 0.0), "place": (v.copy(), v > 1, 0.0), "ix_": (v, v),
        "unravel_index": (np.array([1, 4]), (2, 3)),
        "ravel_multi_index": ((np.array([0, 1]), np.array([1, 2])), (2, 3)),
        "fill_diagonal": (np.zeros((3, 3)), 1.0), "lexsort": ([v, v],),
        "partition": (v, 1), "argpartition": (v, 1), "searchsorted": (np.sort(v), v),
        "clip": (x, 0.2, 0.6), "interp": (v, v, v), "convolve": (v, v), "diff": (v,),
        "gradient": (v,), "percentile": (v, 50), "quantile": (v, 0.5), "histogram": (v,),
        "bincount": (np.array([0, 1, 1]),), "digitize": (v, np.sort(v)), "cov": (x,),
        "corrcoef": (x,), "average": (x,), "allclose": (x, x), "isclose": (x, x),
        "array_equal": (x, x), "array_equiv": (x, x), "dot": (x, x.T), "vdot": (v, v),
        "inner": (v, v), "outer": (v, v), "matmul": (x, x.T), "tensordot": (x, x.T, 1),
        "einsum": ("ij,kj->ik", x, x), "kron": (v, v), "trace": (x[:, :2],),
        "in1d": (v, v), "isin": (v, v), "intersect1d": (v, v), "union1d": (v, v),
        "setdiff1d": (v, v), "setxor1d": (v, v), "bitwise_count": (i,),
        "fmod": (x, 0.3), "remainder": (x, 0.3), "mod": (x, 0.3), "divide": (x, 2.0),
        "true_divide": (x, 2.0), "floor_divide": (x, 0.3), "add": (x, x), "subtract": (x, x),
        "multiply": (x, x), "maximum": (x, 0.5), "minimum": (x, 0.5), "fmax": (x, 0.5),
        "fmin": (x, 0.5), "greater": (x, 0.5), "greater_equal": (x, 0.5), "less": (x, 0.5),
        "less_equal": (x, 0.5), "equal": (x, 0.5), "not_equal": (x, 0.5),
    }
    if name in table:
        return table[name], {}
    return (x,), {}


def _to_fake(value):
    if isinstance(value, np.ndarray):
        return cp.asarray(value)
    if isinstance(value, list):
        return [_to_fake(v) for v in value]
    if isinstance(value, tuple) and any(isinstance(v, np.ndarray) for v in value):
        return tuple(_to_fake(v) for v in value)
    return value


def _to_host(value):
    if isinstance(value, cp.ndarray):
        return value.get()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_host(v) for v in value)
    return value


@pytest.mark.parametrize("name", api.UFUNCS + tuple(
    n for n in api.FUNCTIONS if n not in ("asnumpy", "get_array_module", "ndarray")))
def test_every_listed_function_is_forwarded_and_matches_numpy(name):
    args, kwargs = _example_args(name)
    expected_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    with np.errstate(all="ignore"):
        fake_args = [_to_fake(a) for a in args]
        result = getattr(cp, name)(*fake_args, **kwargs)
        numpy_function = getattr(np, name, None) or fakecupy._NUMPY_FALLBACKS[name]
        expected = numpy_function(*expected_args, **kwargs)
    if expected is None:  # in place: compare the first argument
        result, expected = fake_args[0], expected_args[0]
    if name in ("empty", "empty_like"):  # 'uninitialised': just the shape
        assert result.shape == expected.shape
        return
    host = _to_host(result)
    if isinstance(expected, (tuple, list)):
        assert len(host) == len(expected)
        for h, e in zip(host, expected, strict=True):
            np.testing.assert_allclose(h, e)
    else:
        assert not isinstance(result, (np.ndarray, np.generic))
        np.testing.assert_allclose(host, expected)


@pytest.mark.parametrize("name", ("sum", "max", "mean", "argmax", "allclose", "count_nonzero",
                                  "vdot"))
def test_reductions_give_0d_device_arrays(name):
    x = fake([[1.0, 2.0], [3.0, 4.0]])
    args = (x, x) if name in ("allclose", "vdot") else (x,)
    result = getattr(cp, name)(*args)
    assert isinstance(result, cp.ndarray) and result.shape == ()
    assert isinstance(x.sum(), cp.ndarray) and isinstance(x.max(axis=0), cp.ndarray)


def test_dtypes_and_constants_are_numpys():
    for name in api.DTYPES + api.CONSTANTS:
        assert getattr(cp, name) is getattr(np, name) or getattr(cp, name) == getattr(np, name)
    assert cp.dtype is np.dtype
    assert cp.finfo(cp.float32).eps == np.finfo(np.float32).eps
    assert cp.result_type(cp.ones(1, cp.float16), cp.float32) == np.float32


def test_asarray_and_asnumpy():
    host = np.arange(3.0)
    with fakecupy.count_syncs() as syncs:
        device = cp.asarray(host)  # host to device: not a sync
    assert syncs.count == 0
    host[0] = 99.0  # a copy was made
    assert device.get()[0] == 0.0
    assert cp.asarray(device) is device
    assert cp.asarray(device, dtype=cp.float32).dtype == np.float32
    assert cp.ascontiguousarray(device) is device
    assert isinstance(cp.asnumpy(device), np.ndarray)
    assert cp.get_array_module(device) is cp and cp.get_array_module(host) is np


def test_ndarray_methods_match_numpy():
    x = np.array([[3.0, 1.0, 2.0], [0.5, 4.0, 1.5]], dtype=np.float32)
    a = cp.asarray(x)
    pairs = {
        "sum": ((), {"axis": 0}), "max": ((), {}), "min": ((1,), {}), "mean": ((), {}),
        "var": ((), {}), "std": ((), {}), "argmax": ((), {"axis": 1}), "argmin": ((), {}),
        "argsort": ((), {"axis": -1}), "cumsum": ((0,), {}), "cumprod": ((), {"axis": 1}),
        "prod": ((), {}), "ravel": ((), {}), "flatten": ((), {}), "squeeze": ((), {}),
        "swapaxes": ((0, 1), {}), "transpose": ((), {}), "round": ((1,), {}),
        "clip": ((1.0, 2.0), {}), "any": ((), {}), "all": ((), {}), "conj": ((), {}),
        "diagonal": ((), {}), "trace": ((), {}), "repeat": ((2,), {}), "copy": ((), {}),
        "astype": ((np.float64,), {}), "reshape": ((3, 2), {}), "view": ((np.int32,), {}),
    }
    for name, (args, kwargs) in pairs.items():
        result = getattr(a, name)(*args, **kwargs)
        assert isinstance(result, cp.ndarray), name
        np.testing.assert_allclose(result.get(), getattr(x, name)(*args, **kwargs), err_msg=name)
    np.testing.assert_allclose(a.dot(a.T).get(), x @ x.T)
    np.testing.assert_allclose(a.ptp().get(), np.ptp(x))
    np.testing.assert_allclose(a.take(cp.asarray([0, 4])).get(), x.take([0, 4]))
    b = a.copy()
    b.fill(2.0)
    b.set(x * 2)
    np.testing.assert_allclose(b.get(), x * 2)
    b.sort(axis=1)
    np.testing.assert_allclose(b.get(), np.sort(x * 2, axis=1))
    assert a.item if a.size > 1 else True
    assert cp.asarray(5).item() == 5
    assert a.T.shape == (3, 2) and a.nbytes == x.nbytes and a.strides == x.strides
    assert a.flags.c_contiguous and a.flags["C_CONTIGUOUS"]
    assert [row.shape for row in a] == [(3,), (3,)]
    assert a[0, 0].shape == ()  # a 0-d array, not a scalar


def test_indexing_and_setitem():
    x = np.arange(12.0).reshape(3, 4)
    a = cp.asarray(x)
    for key in ((1,), (slice(None), 2), (Ellipsis, 1), (None, 0), (slice(0, 2), slice(1, None))):
        np.testing.assert_array_equal(a[key].get(), x[key])
    np.testing.assert_array_equal(a[cp.asarray([2, 0])].get(), x[[2, 0]])
    np.testing.assert_array_equal(a[a > 5].get(), x[x > 5])
    np.testing.assert_array_equal(a[:, cp.asarray([1, 3])].get(), x[:, [1, 3]])
    a[0] = 7.0
    a[1, cp.asarray([0, 1])] = cp.asarray([8.0, 9.0])
    a[a > 10] = 0.0
    x[0] = 7.0
    x[1, [0, 1]] = [8.0, 9.0]
    x[x > 10] = 0.0
    np.testing.assert_array_equal(a.get(), x)
    a += 1
    a *= cp.asarray(2.0)
    np.testing.assert_array_equal(a.get(), (x + 1) * 2)


def test_empty_memory_is_garbage():
    assert np.isnan(cp.empty(3).get()).all()
    assert (cp.empty_like(cp.ones(2, dtype=cp.int32)).get() == np.iinfo(np.int32).max).all()


# ------------------------------------------------------------------ random
def test_generator_stream_differs_from_numpy_and_is_reproducible():
    ours = cp.random.default_rng(0).standard_normal(8)
    again = cp.random.default_rng(0).standard_normal(8)
    numpy_stream = np.random.default_rng(0).standard_normal(8)
    assert isinstance(ours, cp.ndarray)
    np.testing.assert_array_equal(ours.get(), again.get())
    assert not np.allclose(ours.get(), numpy_stream)
    assert not np.allclose(cp.random.default_rng(0).random(8).get(),
                           np.random.default_rng(0).random(8))


def test_generator_offers_only_cupys_methods():
    rng = cp.random.default_rng(1)
    public = {name for name in dir(rng) if not name.startswith("_")} - {"bit_generator"}
    assert public == set(api.GENERATOR_METHODS)
    for missing in ("normal", "choice", "permutation", "shuffle", "bytes", "lognormal"):
        with pytest.raises(AttributeError):
            getattr(rng, missing)


def test_generator_methods_work():
    rng = cp.random.default_rng(2)
    assert rng.random().shape == () and isinstance(rng.random(), cp.ndarray)
    assert rng.random((2, 3), dtype=np.float32).dtype == np.float32
    assert rng.standard_normal(4, dtype=np.float32).dtype == np.float32
    with pytest.raises(TypeError):
        rng.standard_normal(2, dtype=np.int32)
    ints = rng.integers(0, 5, size=100).get()
    assert ints.min() >= 0 and ints.max() < 5 and ints.dtype == np.int64
    assert rng.uniform(-1.0, 1.0, (3,)).shape == (3,)
    for name, args in (("beta", (2.0, 3.0)), ("binomial", (5, 0.5)), ("chisquare", (2.0,)),
                       ("dirichlet", (cp.asarray([1.0, 2.0]),)), ("exponential", ()),
                       ("f", (2.0, 3.0)), ("gamma", (2.0,)), ("geometric", (0.5,)),
                       ("hypergeometric", (5, 5, 3)), ("logseries", (0.5,)),
                       ("poisson", (2.0,)), ("power", (2.0,)), ("standard_exponential", ()),
                       ("standard_gamma", (2.0,))):
        result = getattr(rng, name)(*args, size=3) if name != "standard_exponential" else (
            rng.standard_exponential(3))
        assert isinstance(result, cp.ndarray) and result.shape[0] == 3, name
    with pytest.raises(TypeError):  # CuPy takes only Python scalars or cupy arrays here
        rng.beta(np.float32(2.0), 3.0)


def test_legacy_random_functions():
    cp.random.seed(3)
    first = cp.random.rand(3).get()
    cp.random.seed(3)
    np.testing.assert_array_equal(cp.random.rand(3).get(), first)
    assert cp.random.randint(0, 4, 5).shape == (5,)
    assert cp.random.permutation(4).shape == (4,)


# ------------------------------------------------------------------ cuda, install
def test_cuda_module():
    assert cp.cuda.runtime.getDeviceCount() == 1
    assert cp.cuda.runtime.getDeviceProperties(0)["name"] == b"FakeCuPy"
    with cp.cuda.Device(0):
        pass
    assert cp.cuda.get_current_stream() is cp.cuda.Stream.null
    pool = cp.get_default_memory_pool()
    assert pool.used_bytes() == 0
    pool.free_all_blocks()
    assert cp.__version__.endswith("+fake") and cp.IS_FAKE and fakecupy.IS_FAKE


@pytest.fixture
def installed():
    saved = {name: sys.modules.get(name) for name in fakecupy._MODULES}
    fakecupy.install()
    yield
    fakecupy.uninstall()
    for name, module in saved.items():  # whatever was there before (maybe the fake already)
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def test_install_is_idempotent_and_importable(installed):
    fakecupy.install()
    import cupy
    import cupy.cuda
    import cupy.random
    import cupyx
    from cupy.cuda import runtime

    assert cupy is cp and cupyx is fakecupy.cupyx and cupy.random is cp.random
    assert runtime.getDeviceCount() == 1
    assert cupy.cuda is cp.cuda
