"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
from support import train_synthetic


@pytest.fixture(scope="session")
def labels_run(tmp_path_factory):
    """The synthetic room trained 300 CPU steps with the labels proxy teachers (shared: it takes ~40 s)."""
    return train_synthetic(tmp_path_factory.mktemp("labels_run"))
