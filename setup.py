"""Build the Cython extensions that live next to the Python sources.

Every ``fastloss/**/*.pyx`` is compiled; pyproject.toml holds the metadata.
"""
from pathlib import Path

import numpy as np
from setuptools import Extension, setup

pyx_files = sorted(Path("fastloss").rglob("*.pyx"))
extensions = [
    Extension(
        ".".join(path.with_suffix("").parts),
        [str(path)],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    )
    for path in pyx_files
]

if extensions:
    from Cython.Build import cythonize

    extensions = cythonize(extensions, language_level=3)

setup(ext_modules=extensions)
