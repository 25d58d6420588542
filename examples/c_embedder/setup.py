"""Build: python setup.py build_ext --inplace (needs gctrack installed)."""
import gctrack
from setuptools import Extension, setup

setup(
    name="embed_c",
    ext_modules=[Extension("embed_c", ["embed_c.c"], include_dirs=[gctrack.get_include()])],
)
