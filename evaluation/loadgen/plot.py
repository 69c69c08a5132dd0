"""The figure of a load report: latency and throughput against concurrency."""

from __future__ import annotations

from pathlib import Path

from evaluation.loadgen.report import LoadReport


def plot(report: LoadReport, path: Path) -> None:
    """Latency (left) and throughput (right) against concurrency, one point per level."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    levels = report.levels
    xs = [lv.concurrency if lv.concurrency is not None else i + 1 for i, lv in enumerate(levels)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in [
        ("TTFT p50", [lv.ttft_ms.p50 for lv in levels]),
        ("TTFT p99", [lv.ttft_ms.p99 for lv in levels]),
        ("TPOT p50", [lv.tpot_ms.p50 for lv in levels]),
        ("e2e p50", [lv.e2e_ms.p50 for lv in levels]),
    ]:
        left.plot(xs, values, marker="o", label=name)
    left.set(xlabel="concurrency", ylabel="ms", title="Latency")
    right.plot(xs, [lv.output_tokens_per_s for lv in levels], marker="o", label="output tokens/s")
    twin = right.twinx()
    twin.plot(
        xs, [lv.requests_per_s for lv in levels], marker="s", color="tab:green", label="requests/s"
    )
    twin.plot(
        xs, [lv.goodput_per_s for lv in levels], marker="^", color="tab:red", label="goodput req/s"
    )
    right.set(xlabel="concurrency", ylabel="output tokens/s", title="Throughput")
    twin.set_ylabel("requests/s")
    for axis in (left, right):
        axis.set_xticks(xs, [lv.label.removeprefix("concurrency ") for lv in levels])
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    handles = right.get_legend_handles_labels()
    twin_handles = twin.get_legend_handles_labels()
    right.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=8)
    fig.suptitle(f"{report.model} @ {report.base_url} ({report.endpoint})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
