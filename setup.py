"""Build of the native packed binary-convolution kernels (``edge_runtime._packed``).

All metadata lives in pyproject.toml; setuptools merges this ``ext_modules`` into it. The module
uses only the CPython C API and the buffer protocol (no NumPy headers at build time). It is
compiled for the baseline of the target (no ``-march``): the AVX2 and AVX-512 kernels come from
per-function ``target`` attributes and are picked at import by CPU feature detection.
``-ffp-contract=off`` keeps ``y * scale + bias`` two roundings (no FMA) on every path.
"""

import sys

from setuptools import Extension, setup

SRC = "edge_runtime/_packed/"
args = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-strict-aliasing"]

setup(
    ext_modules=[
        Extension(
            "edge_runtime._packed",
            sources=[SRC + f for f in (
                "packed.c", "bconv.c", "chain.c", "chain_py.c", "pool.c", "pointwise.c",
                "shifted.c", "parallel.c", "driver.c", "kernel_portable.c", "kernel_avx2.c",
                "kernel_avx512.c",
            )],
            depends=[SRC + "kernels.h", SRC + "glue.h", SRC + "chain.h"],
            extra_compile_args=args,
        )
    ]
)
