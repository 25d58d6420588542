"""Build: python setup.py build_ext --inplace (needs gctrack installed)."""
import gctrack
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    name="embed_cython",
    ext_modules=cythonize(
        [Extension("embed_cython", ["embed_cython.pyx"], include_dirs=[gctrack.get_include()])],
        include_path=[gctrack.get_cython_include()],
        language_level=3,
    ),
)
