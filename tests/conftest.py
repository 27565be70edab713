"""Shared test set-up: a fresh random seed per session, reported so that a failure can be replayed."""

from __future__ import annotations

import os
import random

import pytest
import torch

SEED = int(os.environ.get("RTO_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"rto: random seed {SEED} (replay with RTO_TEST_SEED={SEED})"


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator seeded from the session seed and reset for each test."""
    return torch.Generator().manual_seed(SEED)
