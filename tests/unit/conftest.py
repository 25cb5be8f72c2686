"""Fixtures shared by the unit tests of the tiny teachers."""

from __future__ import annotations

import pytest

from vidalign.vda import DiffusionTeacher, load_teacher


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory):
    """The tiny tokenizers' generated files in a temporary cache, not in ~/.cache (a
    module asks for it with ``pytestmark = pytest.mark.usefixtures("isolated_cache")``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIDALIGN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def animatediff(isolated_cache) -> DiffusionTeacher:
    return load_teacher("tiny-animatediff")


@pytest.fixture(scope="module")
def sd15(isolated_cache) -> DiffusionTeacher:
    return load_teacher("tiny-sd15")
