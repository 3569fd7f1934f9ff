"""The downstream tests' zoo and SANE: the session's synthetic zoo splits and untrained tiny SANE
(tests/conftest.py), under the names these tests use."""

import pytest


@pytest.fixture(scope="module")
def zoo(synthetic_zoo):
    return synthetic_zoo


@pytest.fixture(scope="module")
def sane(synthetic_sane):
    return synthetic_sane
