"""Build the Cython extensions that live next to the Python sources.

Every ``fastloss/**/*.pyx`` is compiled, with OpenMP where the compiler is
GCC-like on Linux (Cython's ``prange``; elsewhere the loops run serially, with
the same results); pyproject.toml holds the metadata.
"""
import sys
from pathlib import Path

import numpy as np
from setuptools import Extension, setup

openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
pyx_files = sorted(Path("fastloss").rglob("*.pyx"))
extensions = [
    Extension(
        ".".join(path.with_suffix("").parts),
        [str(path)],
        include_dirs=[np.get_include(), str(path.parent)],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"] + openmp,
        extra_link_args=openmp,
    )
    for path in pyx_files
]

if extensions:
    from Cython.Build import cythonize

    extensions = cythonize(extensions, language_level=3)

setup(ext_modules=extensions)
