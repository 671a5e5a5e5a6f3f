"""Fixtures of this subsystem (see tests/conftest.py)."""
