"""Test doubles of imcluster's roles, part of the public package (like treq.testing).

Each fake implements the same interface as the real service and is run
through the same contract tests (``tests/test_contract_*.py``).
Sections are owned by their subsystem; keep each fake next to its kin.
"""

from __future__ import annotations

# --- bus (FakeBus) -------------------------------------------------------

# --- registry (FakeRegistry) ---------------------------------------------

# --- authenticator -------------------------------------------------------

# --- store (FakeStore / processor) ---------------------------------------

# --- client connection (FakeConnection) ----------------------------------
