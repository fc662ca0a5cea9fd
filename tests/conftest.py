"""Shared fixtures: one embedded tritonserver over the committed repository for the serving tests."""

from __future__ import annotations

import pytest

from recserve.control.runtime.triton import DEFAULT_REPOSITORY, TritonConfig, TritonServer


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real tritonserver on free ports with every servable model; stopped even when tests fail."""
    srv = TritonServer(TritonConfig(model_repository=DEFAULT_REPOSITORY, workdir=tmp_path_factory.mktemp("triton")))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
