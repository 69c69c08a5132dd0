"""The accelerator slot: every trial (serving a variant and measuring it) holds one slot of the
Prefect global concurrency limit `gpu`, sized to the machine's GPUs, or 1 on a CPU, where two
trials at once would share cores and corrupt each other's speed figures. Variant flow runs on
several workers then trial one per GPU, whatever runs them.

The slot is a lease the holder renews (Settings.gpu_slot_lease_s): a holder killed -9 stops
renewing, and the server frees its slot once the lease expires. Only flow runs of a deployment
(a worker's) take it: see trial_slot."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

from configs.settings import Settings
from serving.vllm import gpu_count

GPU_LIMIT = "gpu"


def slots_here() -> int:
    """The slots this machine has: one per GPU, else one for the whole CPU."""
    return gpu_count() or 1


def ensure_gpu_limit() -> int:
    """The `gpu` limit on the current Prefect server, created sized to this machine when missing
    (one that exists keeps its size: a pool's machines may differ from this one); its size."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        # Read first: a create that collides makes the server log an integrity error.
        with suppress(ObjectNotFound):
            return client.read_global_concurrency_limit_by_name(GPU_LIMIT).limit
        # One made by another process just now keeps its size.
        with suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots_here())
            )
        return client.read_global_concurrency_limit_by_name(GPU_LIMIT).limit


@contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold one `gpu` slot, waiting for it; without the limit on the server (a flow run with no
    server set up for it), Prefect warns and runs unguarded."""
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1, lease_duration=Settings().gpu_slot_lease_s):
        yield


@contextmanager
def trial_slot() -> Iterator[None]:
    """A slot for a trial of a worker's flow run; none for a release run in process, which tries
    its variants one after another anyway. There the server is often a temporary one whose leases
    live in its memory and die with a killed release, while the slot count stays in its database:
    the next release would wait for that slot forever."""
    from prefect.runtime import deployment

    if deployment.id is None:
        yield
        return
    with gpu_slot():
        yield
