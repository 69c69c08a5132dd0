"""The pull task retries what a retry can mend (an unreachable source) and nothing else: a wrong
source or a corrupt checkpoint fails on its first run, with its own message."""

from __future__ import annotations

import huggingface_hub.constants
from prefect import flow, get_client
from prefect.utilities.asyncutils import run_coro_as_sync

from configs.models import DirSource, HubSource
from tasks import hub


def run_count(task_run_id) -> int:
    async def read() -> int:
        async with get_client() as client:
            return (await client.read_task_run(task_run_id)).run_count

    return run_coro_as_sync(read())


@flow
def pull_once(source, dest, home):
    """The pull task's run id and the error it ended with."""
    # No delay between tries, so the test does not wait the production back-off.
    pull = hub.pull_task.with_options(retry_delay_seconds=0)
    state = pull(source, dest, home, return_state=True)
    return state.state_details.task_run_id, state.result(raise_on_failure=False)


def test_a_missing_source_is_not_retried(prefect_server, home, tmp_path):
    run, error = pull_once(DirSource(path=tmp_path / "absent"), home.models / "m" / "weights", home)
    assert isinstance(error, hub.PullError) and "no such directory" in str(error)
    assert run_count(run) == 1


def test_an_unreachable_hub_is_retried(prefect_server, home, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    run, error = pull_once(HubSource(repo="acme/absent"), home.models / "a" / "weights", home)
    assert isinstance(error, hub.SourceUnreachable) and "unreachable" in str(error)
    assert run_count(run) == 3  # the first run and both retries
