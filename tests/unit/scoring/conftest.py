"""Unit-test fixtures for the scoring package."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _restore_model_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entry scripts set the model folder env vars in-process; undo that after each test."""
    for var in ("MODELFLEET_MODEL_DIR", "AZUREML_MODEL_DIR"):
        monkeypatch.delenv(var, raising=False)
