"""The package list, found rather than written out: a new sub-package of fastsft/ is packed without
anyone remembering to add it (a wheel once shipped without fastsft/data/). Everything else about the
build is in pyproject.toml. `fastsft.kernels` is added by name: its code is the top-level kernels/
folder (mapped in pyproject.toml's package-dir), which has no __init__.py on purpose (see
fastsft/kernels.py), so no finder can see it."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["fastsft", "fastsft.*"]), "fastsft.kernels"])
