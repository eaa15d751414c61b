"""The fleet report from synthetic facts: rows, the next rotation per policy, the days-to-expiry
histogram, the terminal rendering and the PNG chart (matplotlib, Agg)."""

from __future__ import annotations

import struct
from pathlib import Path

from rich.console import Console

from certrotator.ops.report.chart import write_png
from certrotator.ops.report.model import EXPIRY_BINS, build_report
from certrotator.ops.report.render import print_report
from certrotator.ops.schedule.policy import CertificateFacts, Rotation, ThingFacts
from certrotator.ops.schedule.settings import DAY, HOUR, Settings
from certrotator.protocol import JobExecutionStatus

NOW = 1_800_000_000.0
RENEW_30D = Settings(renew_before_s=30 * DAY)


def facts(name: str, days_left: float, *rotations: Rotation, lifetime: float = 400) -> ThingFacts:
    not_after = NOW + days_left * DAY
    cert = CertificateFacts(
        name[0] * 64, not_after - lifetime * DAY, not_after, "ACTIVE", "Local IoT CA", "ECDSA-P256"
    )
    return ThingFacts(name, (cert,), rotations)


def fleet() -> list[ThingFacts]:
    ok = Rotation("renew-1", JobExecutionStatus.SUCCEEDED.value, NOW - 3 * DAY, NOW - 3 * DAY + 60)
    bad = Rotation("renew-2", JobExecutionStatus.TIMED_OUT.value, NOW - 2 * HOUR, NOW - HOUR / 2)
    return [
        facts("year", 300, ok),
        facts("soon", 10),
        facts("retry", 5, bad),
        facts("gone", -1),
        ThingFacts("bare", ()),
    ]


def test_rows_are_soonest_expiry_first_with_the_policy_next_step() -> None:
    report = build_report(fleet(), NOW, RENEW_30D)
    rows = {r["thing"]: r for r in report.to_dict()["things"]}
    assert [r.thing for r in report.rows] == ["gone", "retry", "soon", "year", "bare"]
    assert rows["soon"]["nextRotation"] == "due now" and rows["soon"]["daysLeft"] == 10.0
    assert rows["retry"]["nextRotation"] == "in 30.0 min (back-off)"  # a first failure waits 1 h
    assert rows["retry"]["lastRotation"]["status"] == "TIMED_OUT"
    assert (
        rows["year"]["nextRotation"].startswith("in 26")
        and rows["year"]["lastRotation"]["jobId"] == "renew-1"
    )
    assert rows["gone"]["nextRotation"] == "blocked" and rows["bare"]["certificateId"] is None
    assert rows["year"]["issuer"] == "Local IoT CA" and rows["year"]["keyAlgorithm"] == "ECDSA-P256"


def test_histogram_of_days_to_expiry() -> None:
    histogram = dict(build_report(fleet(), NOW, RENEW_30D).histogram())
    assert list(histogram) == [label for label, _ in EXPIRY_BINS]
    assert histogram["expired"] == 1 and histogram["< 7 d"] == 1 and histogram["7-30 d"] == 1
    assert histogram["180-365 d"] == 1 and sum(histogram.values()) == 4  # "bare" has no certificate


def test_terminal_rendering(tmp_path: Path) -> None:
    console = Console(record=True, width=160)
    print_report(build_report(fleet(), NOW, RENEW_30D), console)
    text = console.export_text()
    assert "Fleet certificates (5 things; policy renew-before=30d)" in text
    assert "TIMED_OUT (renew-2" in text and "due now" in text
    assert "Days to expiry" in text and "█" in text
    assert "rotations recorded: 1 succeeded, 1 failed" in text


def test_png_chart(tmp_path: Path) -> None:
    many = [facts(f"d{i:03d}", (i * 37) % 800 - 5) for i in range(200)]
    history = [
        Rotation(
            f"r{i}",
            (JobExecutionStatus.SUCCEEDED if i % 7 else JobExecutionStatus.FAILED).value,
            0,
            NOW - i * 9 * HOUR,
        )
        for i in range(60)
    ]
    many.append(facts("z", 100, *history))
    path = tmp_path / "fleet.png"
    write_png(build_report(many, NOW, RENEW_30D), path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1430, 550)  # 13 x 5 inches at 110 dpi
    assert len(data) > 20_000  # bars, labels and text, not an empty canvas
