"""The usage log as the monitoring cores read it: through the readers their caller hands them.

The drift check and the cost model read the gateway's usage log, but they sit below the gateway
in the layers (pyproject.toml, [tool.importlinter]), so they never import it: the flows, the
benchmarks and the tests pass in serving.gateway.usage.count_usage and iter_usage, called as
these types say.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime

import pandas as pd

# (start, end, url, model) -> how many rows fall in [start, end), for one model or all (None).
CountUsage = Callable[[datetime, datetime, str, str | None], int]
# (start, end, columns, url, model, chunk_rows) -> those rows, only `columns`, oldest first, in
# frames of at most chunk_rows: a million rows are read in bounded memory.
IterUsage = Callable[
    [datetime, datetime, Sequence[str], str, str | None, int], Iterator[pd.DataFrame]
]
