"""The report as a PNG (matplotlib, the Agg backend: no display needed): the days-to-expiry distribution
and the rotations over time, succeeded and failed per day. matplotlib is the `report` extra."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path

from certrotator.compat import UTC
from certrotator.ops.report.model import Report
from certrotator.ops.schedule.settings import DAY


class ChartUnavailable(RuntimeError):
    pass


def write_png(report: Report, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # before pyplot: files only, never a window
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ChartUnavailable("--png needs matplotlib: pip install 'certrotator[report]'") from None

    figure, (expiry, history) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    bins = report.histogram()
    labels = [label for label, _ in bins]
    counts = [count for _, count in bins]
    colors = ["#c0392b" if i < 2 else "#e67e22" if i == 2 else "#27ae60" for i in range(len(bins))]
    bars = expiry.bar(labels, counts, color=colors)
    expiry.bar_label(bars, labels=[str(c) if c else "" for c in counts])
    expiry.set_title(f"Days to expiry ({len(report.rows)} things)")
    expiry.set_xlabel("certificate expires in")
    expiry.set_ylabel("things")
    expiry.tick_params(axis="x", labelrotation=30)

    days: Counter[tuple[datetime, bool]] = Counter()
    for point in report.rotations:
        day = datetime.fromtimestamp(point.ended_at // DAY * DAY, UTC)
        days[(day, point.succeeded)] += 1
    dates = sorted({day for day, _ in days})
    if dates:
        succeeded = [days[(d, True)] for d in dates]
        failed = [days[(d, False)] for d in dates]
        history.bar(dates, succeeded, width=0.8, color="#27ae60", label="succeeded")
        history.bar(dates, failed, width=0.8, bottom=succeeded, color="#c0392b", label="failed")
        history.legend()
        history.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))  # type: ignore[no-untyped-call]
        history.tick_params(axis="x", labelrotation=30)
    else:
        history.text(
            0.5, 0.5, "no rotation recorded yet", ha="center", va="center", transform=history.transAxes
        )
    history.yaxis.set_major_locator(MaxNLocator(integer=True))  # whole rotations
    history.set_title("Rotations per day")
    history.set_ylabel("rotations")
    generated = datetime.fromtimestamp(report.now, UTC).strftime("%Y-%m-%d %H:%M UTC")
    figure.suptitle(f"certrotator fleet report — {generated} — policy {report.settings.describe()}")
    figure.savefig(path, dpi=110)
    plt.close(figure)
