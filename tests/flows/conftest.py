"""Prefect for flow tests: one real temporary server for the session, state in a temp dir."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefect")
    # Set before Prefect reads its settings, so results and cached keys never leak across runs.
    os.environ.update(
        PREFECT_HOME=str(root),
        PREFECT_LOCAL_STORAGE_PATH=str(root / "storage"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def stored_events(name: str, within_s: float = 30, where=lambda event: True) -> list:
    """The events named `name` for which `where` holds that the test server has stored (they
    arrive asynchronously; the server is shared by the session, so other tests' events are there
    too)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    deadline = time.monotonic() + within_s
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(EventFilter(event=EventNameFilter(name=[name])), limit=50)
            events = [event for event in page.events if where(event)]
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def latest_artifact(key: str):
    """The newest Prefect artifact stored under `key` (filtered by key: the server is shared by
    the session, so the newest few artifacts may all be other tests')."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    with get_client(sync_client=True) as client:
        [artifact] = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key])),
            limit=1,
        )
    return artifact
