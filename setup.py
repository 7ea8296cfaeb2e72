"""Legacy entry point; the project's metadata lives in pyproject.toml."""

from setuptools import setup

setup()
