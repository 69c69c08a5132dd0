"""A corrupt checkpoint given to the release flow: a clear error naming the file, nothing
registered, no model directory left. (A bad config is refused before any work: test_release.py;
bad sources and corrupt files at the pull itself: tests/tasks/test_hub.py.) The pull is not
retried: a corrupt checkpoint would be as corrupt the second time
(tests/flows/test_pull_retries.py)."""

from __future__ import annotations

import pytest

from tasks.hub import PullError
from tasks.registry import Registry


def test_a_corrupt_checkpoint_is_refused_and_nothing_is_registered(
    prefect_server, home, tiny_model, tmp_path
):
    from flows.release import release

    weights = tiny_model / "model.safetensors"
    weights.write_bytes(
        weights.read_bytes()[:-100]
    )  # truncated, as an interrupted download leaves it
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\nsource: {tiny_model}\nvariants: [{{recipe: bf16}}]\n")
    with pytest.raises(
        PullError, match=r"model\.safetensors is not a valid safetensors file .* truncated"
    ):
        release(str(config))
    assert not (home.models / "tiny" / "bf16" / "weights").exists()
    assert Registry(home).client.search_registered_models() == []
