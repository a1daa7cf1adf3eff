"""The GPU tier (a package, so that its conftest is `gpu.conftest` and never replaces tests/conftest.py
as the module `conftest`, which tests import WORDS from)."""
