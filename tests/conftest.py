from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import SymbiUp


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SymbiUp]:
    """A fresh ``symbi up`` (no workers) with its own state directory for the module."""
    up = SymbiUp(tmp_path_factory.mktemp("state"))
    up.start()
    yield up
    assert up.stop() == 0, "".join(up.output)
