"""The last completed release flow run, read back from Prefect: wall time per stage, and the
share of the flow's wall time spent outside the stages' own work (Prefect orchestration and MLflow
calls).
"""

from __future__ import annotations

import re
from pathlib import Path

from configs.home import Home

# Stages whose work is MLflow calls: their time counts as MLflow overhead, not as the stage's work.
MLFLOW_STAGES = {"register", "find-registered", "first-champion", "log-evaluation"}


async def release_stages(home: Home) -> dict:
    """Stage wall times of the last completed release flow run, and the overhead share."""
    # Prefect is imported when asked, after the benchmarks: it takes seconds, and the figures
    # import this module for MLFLOW_STAGES alone.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    database = settings.server.database.connection_url.get_secret_value()
    local = database.removeprefix("sqlite+aiosqlite:///")
    if settings.api.url is None and local != database and not Path(local).is_file():
        return {
            "status": f"skipped: no Prefect database at {local} (PREFECT_HOME): "
            "run `make demo` first"
        }
    async with get_client() as client:
        [last, *_] = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["release"])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["COMPLETED"]))
            ),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        ) or [None]
        if last is None:
            return {
                "status": "skipped: no completed release flow run in Prefect; run `make demo` first"
            }
        runs, frontier = [last], [last.id]
        while frontier:  # subflows (release-variant), any depth
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)
                )
            )
            runs += children
            frontier = [c.id for c in children]
        ids = [r.id for r in runs]
        tasks = await client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids))
        )
    wrappers = {r.parent_task_run_id for r in runs}  # the task runs standing for subflows
    stages: dict[str, float] = {}
    for t in tasks:
        if t.id in wrappers:
            continue
        stage = re.sub(r"-[0-9a-f]{3}$", "", t.name)  # Prefect names a task run <task>-<3 hex>
        stages[stage] = stages.get(stage, 0.0) + t.total_run_time.total_seconds()
    wall = (last.end_time - last.start_time).total_seconds()
    mlflow = sum(s for name, s in stages.items() if name in MLFLOW_STAGES)
    prefect = wall - sum(stages.values())
    return {
        "status": f"flow run {last.name} ({last.id}) "
        f"of {last.start_time.isoformat(timespec='seconds')}",
        "wall_s": round(wall, 1),
        "stages_s": {k: round(v, 2) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])},
        "prefect_overhead_s": round(prefect, 2),
        "mlflow_s": round(mlflow, 2),
        "overhead_share": round((prefect + mlflow) / wall, 4) if wall else None,
    }
