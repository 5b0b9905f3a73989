"""The checked-in list of CuPy names the fake CuPy (tests/fakecupy.py) offers.

Every name here exists in real CuPy 13.x. Checked against (do not add a name without checking):

* CuPy's "Comparison Table" of NumPy / CuPy APIs, module level and ``cupy.ndarray``:
  https://docs.cupy.dev/en/latest/reference/comparison.html and
  https://docs.cupy.dev/en/v11.6.0/reference/comparison.html, cross-checked with the CuPy v13.6.0
  column of https://intelpython.github.io/dpnp/reference/comparison.html (e.g. the NumPy 2
  aliases ``acos``/``asin``/``atan``/``pow``/``concat`` are absent from CuPy 13, so not here).
* Routine pages: https://docs.cupy.dev/en/stable/reference/routines.html (creation,
  manipulation, indexing, sorting, statistics, logic, math, linalg ``dot vdot inner outer matmul
  tensordot einsum kron trace``), ``cupy.take_along_axis`` / ``cupy.put_along_axis`` /
  ``cupy.take`` pages (docs.cupy.dev/en/stable/reference/generated/...).
* ``cupy.ndarray`` methods: CuPy source ``cupy/_core/core.pyx`` (class ``ndarray``) and
  https://docs.cupy.dev/en/v13.3.0/reference/generated/cupy.ndarray.html.
* ``cupy.random.Generator`` methods: CuPy source ``cupy/random/_generator_api.pyx`` (class
  ``Generator``) and https://docs.cupy.dev/en/stable/reference/generated/cupy.random.Generator.html.
  Unlike NumPy's Generator it has NO ``normal``, ``choice``, ``permutation``, ``shuffle``,
  ``exponential``-with-dtype, ``bytes`` ... (only the methods listed below).
* Legacy ``cupy.random`` functions: CuPy ``docs/source/reference/random.rst``.
"""

CUPY_VERSION_CHECKED = "13.3.0 (docs.cupy.dev v13.3.0 / stable pages, checked 2025)"

# Elementwise functions that are ``cupy.ufunc`` objects: their operands must be cupy arrays or
# scalars (Python or NumPy scalars); lists and NumPy arrays raise TypeError ("Unsupported type").
UFUNCS = (
    # arithmetic
    "add", "subtract", "multiply", "divide", "true_divide", "floor_divide", "negative",
    "positive", "power", "float_power", "remainder", "mod", "fmod", "absolute", "abs", "fabs",
    "reciprocal", "sign", "heaviside",
    # exponents and logarithms
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "logaddexp", "logaddexp2",
    "sqrt", "square", "cbrt",
    # trigonometric / hyperbolic
    "sin", "cos", "tan", "arcsin", "arccos", "arctan", "arctan2", "hypot", "sinh", "cosh",
    "tanh", "arcsinh", "arccosh", "arctanh", "degrees", "radians", "deg2rad", "rad2deg",
    # rounding
    "rint", "floor", "ceil", "trunc", "fix",
    # comparison / logic
    "greater", "greater_equal", "less", "less_equal", "equal", "not_equal", "logical_and",
    "logical_or", "logical_xor", "logical_not", "isfinite", "isinf", "isnan", "signbit",
    "copysign", "nextafter",
    # extrema
    "maximum", "minimum", "fmax", "fmin",
    # bitwise
    "bitwise_and", "bitwise_or", "bitwise_xor", "invert", "left_shift", "right_shift",
    # complex
    "conj", "conjugate",
)

# Other module-level functions (forwarded to NumPy with the same name).
FUNCTIONS = (
    # creation
    "empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
    "eye", "identity", "array", "asarray", "asanyarray", "ascontiguousarray", "asfortranarray",
    "copy", "arange", "linspace", "logspace", "meshgrid", "diag", "diagflat", "tri", "tril",
    "triu",
    # manipulation
    "copyto", "reshape", "ravel", "moveaxis", "rollaxis", "swapaxes", "transpose",
    "atleast_1d", "atleast_2d", "atleast_3d", "broadcast_to", "broadcast_arrays", "expand_dims",
    "squeeze", "concatenate", "stack", "vstack", "hstack", "dstack", "column_stack", "split",
    "array_split", "hsplit", "vsplit", "tile", "repeat", "append", "flip", "fliplr", "flipud",
    "roll", "rot90", "pad", "unique", "trim_zeros",
    # indexing
    "take", "take_along_axis", "put_along_axis", "choose", "compress", "diagonal", "where",
    "nonzero", "flatnonzero", "argwhere", "extract", "select", "put", "putmask", "place",
    "indices", "ix_", "unravel_index", "ravel_multi_index", "diag_indices", "tril_indices",
    "triu_indices", "fill_diagonal",
    # sorting / searching / counting
    "sort", "argsort", "lexsort", "partition", "argpartition", "argmax", "argmin", "nanargmax",
    "nanargmin", "searchsorted", "count_nonzero",
    # math that is not a ufunc
    "sum", "prod", "cumsum", "cumprod", "nansum", "nanprod", "nancumsum", "nancumprod", "diff",
    "clip", "around", "round", "nan_to_num", "real", "imag", "angle", "sinc", "i0", "interp",
    "convolve", "gradient",
    # statistics
    "amax", "amin", "max", "min", "nanmax", "nanmin", "ptp", "mean", "var", "std", "nanmean",
    "nanvar", "nanstd", "median", "nanmedian", "average", "percentile", "quantile",
    "histogram", "bincount", "digitize", "cov", "corrcoef",
    # logic
    "all", "any", "allclose", "isclose", "array_equal", "array_equiv", "iscomplexobj",
    "isrealobj",
    # linear algebra
    "dot", "vdot", "inner", "outer", "matmul", "tensordot", "einsum", "kron", "trace",
    # sets
    "in1d", "isin", "intersect1d", "union1d", "setdiff1d", "setxor1d",
    # CuPy-specific
    "asnumpy", "get_array_module", "ndarray",
)

# Data-type routines: NumPy's own objects, re-exported by CuPy as they are (``cupy.dtype is
# numpy.dtype``); cupy arrays given to them are looked at for their dtype only.
DTYPE_ROUTINES = (
    "dtype", "finfo", "iinfo", "can_cast", "result_type", "promote_types", "min_scalar_type",
    "common_type", "issubdtype",
)

# Functions whose output shape depends on the data: real CuPy copies a count to the host
# (``int(scan[-1])  # synchronize!`` in cupy/_core/_routines_indexing.pyx), so they count as
# a device-to-host synchronisation in the fake. Boolean-mask indexing does too.
SYNC_FUNCTIONS = (
    "nonzero", "flatnonzero", "argwhere", "extract", "compress", "unique", "intersect1d",
    "union1d", "setdiff1d", "setxor1d", "trim_zeros", "asnumpy",
)

# Functions that take a SEQUENCE of cupy arrays as one argument (a list/tuple of arrays is fine).
SEQUENCE_FUNCTIONS = (
    "concatenate", "stack", "vstack", "hstack", "dstack", "column_stack", "lexsort", "select",
    "broadcast_arrays", "meshgrid", "ix_", "ravel_multi_index", "choose", "einsum",
    "atleast_1d", "atleast_2d", "atleast_3d",
)

# Functions that accept host data (NumPy arrays, lists, scalars): a host-to-device copy.
HOST_INPUT_FUNCTIONS = ("array", "asarray", "asanyarray", "ascontiguousarray", "asfortranarray")

DTYPES = (
    "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "intp", "byte",
    "ubyte", "short", "ushort", "intc", "uintc", "longlong", "ulonglong", "half", "single",
    "double", "csingle", "cdouble", "number", "integer", "signedinteger", "unsignedinteger",
    "floating", "complexfloating", "inexact", "generic",
)

CONSTANTS = ("nan", "inf", "pi", "e", "euler_gamma", "newaxis")

# cupy.ndarray: methods (forwarded) and attributes/properties.
NDARRAY_METHODS = (
    "all", "any", "argmax", "argmin", "argpartition", "argsort", "astype", "choose", "clip",
    "compress", "conj", "conjugate", "copy", "cumprod", "cumsum", "diagonal", "dot", "dump",
    "dumps", "fill", "flatten", "get", "item", "max", "mean", "min", "nonzero", "partition",
    "prod", "ptp", "put", "ravel", "reduced_view", "repeat", "reshape", "round",
    "scatter_add", "scatter_max", "scatter_min", "searchsorted", "set", "sort", "squeeze",
    "std", "sum", "swapaxes", "take", "tobytes", "tofile", "tolist", "trace", "transpose",
    "var", "view",
)
NDARRAY_ATTRIBUTES = (
    "T", "base", "data", "device", "dtype", "flags", "imag", "itemsize", "nbytes", "ndim",
    "real", "shape", "size", "strides",
)

# cupy.random.Generator (cupy/random/_generator_api.pyx, class Generator).
GENERATOR_METHODS = (
    "random", "uniform", "integers", "beta", "binomial", "chisquare", "dirichlet",
    "exponential", "f", "gamma", "geometric", "hypergeometric", "logseries", "poisson",
    "power", "standard_exponential", "standard_gamma", "standard_normal",
)

# Legacy cupy.random functions (docs/source/reference/random.rst): the easy subset.
RANDOM_FUNCTIONS = (
    "seed", "rand", "randn", "randint", "random", "random_sample", "ranf", "sample",
    "uniform", "normal", "standard_normal", "choice", "permutation", "shuffle",
    "default_rng", "get_random_state", "RandomState", "Generator",
)

# Deliberately NOT offered by the fake (CUDA-C kernels cannot run on the CPU): code must test
# ``hasattr(cupy, "ElementwiseKernel")`` (or fakecupy.IS_FAKE) and fall back to plain ops.
NOT_PROVIDED = ("ElementwiseKernel", "RawKernel", "ReductionKernel", "RawModule", "fuse")

# Names that exist in NumPy but NOT in CuPy 13 (per the comparison tables above): the fake must
# refuse them with AttributeError.
NUMPY_ONLY = (
    "busday_count", "asmatrix", "nditer", "set_printoptions", "einsum_path", "acos", "concat",
    "pow", "frompyfunc", "genfromtxt",
)

# What tinygrad_llm itself needs (grep ``xp.`` in tinygrad_llm/): must all be present.
LIBRARY_REQUIRED = (
    "exp", "log", "tanh", "sqrt", "abs", "maximum", "minimum", "where", "zeros", "zeros_like",
    "ones", "ones_like", "empty", "empty_like", "full", "arange", "asarray", "array",
    "ascontiguousarray", "concatenate", "stack", "triu", "tril", "take", "take_along_axis",
    "argsort", "flatnonzero", "cumsum", "divide", "matmul", "einsum", "isfinite", "isnan",
    "allclose", "argmax", "sum", "max", "log1p", "expm1", "clip", "vdot", "broadcast_to",
    "split", "float16", "float32", "float64", "int32", "int64", "uint8", "uint16", "uint32",
    "bool_", "dtype", "nan", "inf", "newaxis", "pi", "asnumpy", "get_array_module", "ndarray",
)
