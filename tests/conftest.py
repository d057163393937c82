"""Shared fixtures. Real data lives in ../shared/data (or $MTLIB_DATA_DIR); tests that need it skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MTLIB_DATA_DIR", REPO.parent / "shared" / "data"))
CENSUS = DATA_DIR / "census-income" / "census-income.test.gz"
ALIEXPRESS = DATA_DIR / "aliexpress" / "aliexpress_test_sample.csv"


@pytest.fixture
def census_path() -> Path:
    if not CENSUS.exists():
        pytest.skip(f"Census-Income file not found at {CENSUS}")
    return CENSUS


@pytest.fixture
def aliexpress_path() -> Path:
    if not ALIEXPRESS.exists():
        pytest.skip(f"AliExpress sample not found at {ALIEXPRESS}")
    return ALIEXPRESS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.slow`` tests (minutes of real training) are skipped unless ``MTLIB_SLOW=1``, with the reason
    in the summary; ``gpu`` tests are skipped where torch sees no CUDA device."""
    slow = os.environ.get("MTLIB_SLOW") == "1"
    cuda = None
    for item in items:
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="slow (minutes of real training): set MTLIB_SLOW=1 to run"))
        if "gpu" in item.keywords:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
