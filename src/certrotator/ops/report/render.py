"""The report on a terminal (rich): a table per thing and a histogram of days to expiry."""

from __future__ import annotations

from datetime import datetime

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from certrotator.compat import UTC
from certrotator.ops.report.model import Report
from certrotator.ops.schedule.policy import Verdict

BAR_WIDTH = 40
_COLORS = {Verdict.ROTATE: "yellow", Verdict.BLOCKED: "red", Verdict.BACKOFF: "yellow"}


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d") if ts else "-"


def print_report(report: Report, console: Console, limit: int | None = None) -> None:
    rows = report.rows if limit is None else report.rows[:limit]
    table = Table(
        title=f"Fleet certificates ({len(report.rows)} things; policy {report.settings.describe()})"
    )
    for column in (
        "thing",
        "certificate",
        "issuer",
        "key",
        "not after",
        "days left",
        "last rotation",
        "next",
    ):
        table.add_column(column, overflow="fold")
    for row in rows:
        d, cert, last = row.decision, row.decision.certificate, row.decision.last_rotation
        days = row.days_left
        days_text = "-" if days is None else f"{days:.1f}"
        if days is not None and days < 30:
            days_text = f"[{'red' if days < 7 else 'yellow'}]{days_text}[/]"
        color = _COLORS.get(d.verdict)
        following = escape(row.next_rotation())
        table.add_row(
            row.thing,
            cert.certificate_id[:12] if cert else "-",
            escape(cert.issuer) if cert else "-",
            cert.key_algorithm if cert else "-",
            _when(cert.not_after) if cert else "-",
            days_text,
            f"{last.status} ({last.job_id}, {_when(last.ended_at)})" if last else "-",
            f"[{color}]{following}[/]" if color else following,
        )
    console.print(table)
    if limit is not None and len(report.rows) > limit:
        console.print(f"... and {len(report.rows) - limit} more (--json lists all)")
    print_histogram(report, console)


def print_histogram(report: Report, console: Console) -> None:
    bins = report.histogram()
    most = max((n for _, n in bins), default=0)
    table = Table(title="Days to expiry", show_header=False, box=None)
    table.add_column(justify="right")
    table.add_column()
    table.add_column(justify="right")
    for label, count in bins:
        length = 0 if most == 0 else max(1 if count else 0, round(BAR_WIDTH * count / most))
        color = "red" if label in ("expired", "< 7 d") else "yellow" if label == "7-30 d" else "green"
        table.add_row(label, f"[{color}]{'█' * length}[/]", str(count))
    console.print(table)
    ok = sum(1 for r in report.rotations if r.succeeded)
    console.print(f"rotations recorded: {ok} succeeded, {len(report.rotations) - ok} failed")
