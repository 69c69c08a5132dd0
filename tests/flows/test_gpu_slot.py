"""The `gpu` concurrency limit that trials hold a slot of, against the session's Prefect server:
made once, sized to this machine's GPUs (one on a CPU); held for exactly the trial; its lease
checked before any work. The slot across workers, and a killed worker's coming back:
test_release_fan_out.py (stress)."""

from __future__ import annotations

import os
import stat

import pytest
from pydantic import ValidationError

from configs.settings import Settings
from tasks.gpu_slot import GPU_LIMIT, ensure_gpu_limit, gpu_slot, slots_here, trial_slot


def gpu_limit():
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(GPU_LIMIT)


def resize(limit: int) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=limit))


def test_a_machine_has_a_slot_per_gpu_or_one_for_its_cpu(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: a)'\necho 'GPU 1: NVIDIA H100 (UUID: b)'\n"
    )
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert slots_here() == 2
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert slots_here() == 1
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert slots_here() == 1


def test_the_limit_is_made_sized_to_this_machine_and_then_kept(prefect_server):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # another test's release may have made it
        for limit in client.read_global_concurrency_limits(limit=200):
            if limit.name == GPU_LIMIT:
                client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
    assert ensure_gpu_limit() == slots_here() == gpu_limit().limit
    resize(3)  # as for a pool of several machines
    assert ensure_gpu_limit() == 3


def test_a_trial_holds_one_slot_while_it_runs(prefect_server):
    ensure_gpu_limit()
    resize(1)
    assert gpu_limit().active_slots == 0
    with gpu_slot():
        assert gpu_limit().active_slots == 1
    assert gpu_limit().active_slots == 0
    with pytest.raises(RuntimeError, match="trial broke"), gpu_slot():
        raise RuntimeError("trial broke")
    assert gpu_limit().active_slots == 0  # released however the trial ends


@pytest.mark.timeout(120)  # a slot taken here would wait for the one held below forever
def test_a_trial_of_a_release_run_in_process_takes_no_slot(prefect_server):
    """Its server may be a temporary one, whose leases die with a killed release while the slot
    count stays: the next release would wait forever."""
    from prefect import flow

    ensure_gpu_limit()
    resize(1)

    @flow
    def in_process() -> int:
        with trial_slot():
            return gpu_limit().active_slots

    with gpu_slot():  # even with the only slot taken, it does not wait
        assert in_process() == 1
    assert gpu_limit().active_slots == 0


@pytest.mark.parametrize("lease", ["30", "100000", "soon"])
def test_a_lease_the_server_would_refuse_fails_before_any_work(monkeypatch, lease):
    monkeypatch.setenv("SLIPWAY_GPU_SLOT_LEASE_S", lease)
    with pytest.raises(ValidationError, match="gpu_slot_lease_s"):
        Settings()
    monkeypatch.setenv("SLIPWAY_GPU_SLOT_LEASE_S", "60")
    assert Settings().gpu_slot_lease_s == 60
