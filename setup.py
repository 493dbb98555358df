"""Only the package list, which pyproject.toml cannot compute: every package under edgekit/, found, plus
edgekit.targets, which lives at the top level as targets/ (devices are data). Everything else is pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["edgekit", "edgekit.*"]), "edgekit.targets"])
