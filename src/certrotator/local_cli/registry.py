"""`certrotator local certificate|rule|things|certificates|jobs|notifications`: the registry, read
straight from the database (safe beside a running engine: WAL) and changed through the running engine's
admin endpoint when one runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from certrotator.backend.ports import CertificateStatus
from certrotator.console import fail
from certrotator.local import admin
from certrotator.local.registry import RULES, RegistryError
from certrotator.local_cli.common import (
    DEFAULT_DATA_DIR,
    DataDir,
    JsonFlag,
    admin_call,
    certificate_app,
    console,
    emit,
    iso,
    local_app,
    open_stores,
    rule_app,
    when,
)


@certificate_app.command("set-status")
def set_status(
    certificate_id: Annotated[str, typer.Argument(help="Certificate id (64 hex).")],
    status: Annotated[str, typer.Argument(help="ACTIVE, INACTIVE or REVOKED.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Change a certificate's status; leaving ACTIVE disconnects its live connections."""
    if status not in ("ACTIVE", "INACTIVE", "REVOKED"):
        raise fail(f"status must be ACTIVE, INACTIVE or REVOKED, not {status!r}")
    if not admin_call(data_dir, "set_certificate_status", certificate_id=certificate_id, status=status):
        try:
            open_stores(data_dir)[0].set_certificate_status(certificate_id, CertificateStatus(status))
        except RegistryError as exc:
            raise fail(str(exc)) from None
    console.print(f"certificate {certificate_id} is {status}")


@certificate_app.command("detach")
def certificate_detach(
    certificate_id: Annotated[str, typer.Argument(help="Certificate id (64 hex).")],
    thing: Annotated[str, typer.Option("--thing", help="The thing it is attached to.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """End a certificate's exclusive attachment to a thing (status and policies stay; new connections
    with it are refused, live ones are not cut). For what `reconcile` leaves to an operator."""
    from certrotator.ops.reconcile.local import detach_certificate

    try:
        console.print(detach_certificate(data_dir, thing, certificate_id))
    except (ValueError, RegistryError) as exc:
        raise fail(str(exc)) from None


@certificate_app.command("delete")
def certificate_delete(
    certificate_id: Annotated[str, typer.Argument(help="Certificate id (64 hex).")],
    force: Annotated[
        bool,
        typer.Option(help="Delete even an ACTIVE attached certificate, or one a device is connected with."),
    ] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Retire a certificate as the backend does: INACTIVE (its connections are cut), detached from its
    thing and policies, deleted. An ACTIVE certificate still attached may be the device's only working
    one: refused unless --force (detach it or set it INACTIVE first)."""
    from certrotator.ops.reconcile.local import delete_certificate

    if not force:
        registry, _ = open_stores(data_dir)
        cert = registry.certificate(certificate_id)
        registry.db.close()
        if cert is not None and cert.status is CertificateStatus.ACTIVE and cert.thing is not None:
            raise fail(
                f"certificate {certificate_id} is ACTIVE and attached to {cert.thing!r}: it may be the only "
                "one the device can connect with. Detach it (`certrotator local certificate detach "
                f"{certificate_id} --thing {cert.thing}`) or set it INACTIVE first, or add --force"
            )
    try:
        console.print(delete_certificate(data_dir, certificate_id, force))
    except (ValueError, RegistryError, admin.AdminError) as exc:
        raise fail(str(exc)) from None


def _set_rule(name: str, enabled: bool, data_dir: Path) -> None:
    if name not in RULES:
        raise fail(f"unknown rule {name!r}; rules: {', '.join(RULES)}")
    if not admin_call(data_dir, "set_rule", name=name, enabled=enabled):
        open_stores(data_dir)[0].set_rule_enabled(name, enabled)
    console.print(f"rule {name} {'enabled' if enabled else 'disabled'}")


@rule_app.command("enable")
def rule_enable(
    name: Annotated[str, typer.Argument(help="create, commit or terminal")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Enable a rule."""
    _set_rule(name, True, data_dir)


@rule_app.command("disable")
def rule_disable(
    name: Annotated[str, typer.Argument(help="create, commit or terminal")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Disable a rule: its messages are dropped, like a disabled IoT rule."""
    _set_rule(name, False, data_dir)


# ------------------------------------------------------------------------------------------ listings


@local_app.command()
def things(data_dir: DataDir = DEFAULT_DATA_DIR, as_json: JsonFlag = False) -> None:
    """Things with their groups and certificates (--json: full certificate ids with status, issuer and
    expiry)."""
    registry, _ = open_stores(data_dir)
    listed: list[dict[str, Any]] = [
        {
            "thing": t,
            "groups": registry.groups_of(t),
            "certificates": [
                {
                    "certificateId": c.certificate_id,
                    "status": c.status.value,
                    "issuer": c.issuer,
                    "notAfter": iso(c.not_after),
                }
                for c in registry.certificates(t)
            ],
        }
        for t in registry.things()
    ]
    if as_json:
        emit(listed, True, "Things")
        return
    rows = [
        {
            "thing": t["thing"],
            "groups": ", ".join(t["groups"]),
            # the first 12 hex digits name a certificate well enough for a person; --json has them all
            "certificates": ", ".join(
                f"{c['certificateId'][:12]} ({c['status']})" for c in t["certificates"]
            ),
        }
        for t in listed
    ]
    emit(rows, False, "Things", ["thing", "groups", "certificates"])


@local_app.command()
def certificates(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    as_json: JsonFlag = False,
    expiring_within_days: Annotated[
        float | None,
        typer.Option(help="Only ACTIVE certificates attached to a thing that expire within this many days."),
    ] = None,
) -> None:
    """Certificates with status, issuer, validity and thing (an expiry report with --expiring-within-days;
    feed its things to `jobs create --thing`)."""
    registry, _ = open_stores(data_dir)
    listed = registry.certificates()
    if expiring_within_days is not None:
        horizon = time.time() + expiring_within_days * 86400
        listed = [
            c
            for c in listed
            if c.status is CertificateStatus.ACTIVE and c.thing is not None and c.not_after <= horizon
        ]
    rows = [
        {
            "certificateId": c.certificate_id,
            "status": c.status.value,
            "issuer": c.issuer,
            "notAfter": when(c.not_after),
            "daysLeft": round((c.not_after - time.time()) / 86400, 1),
            "thing": c.thing or "-",
        }
        for c in sorted(listed, key=lambda c: c.not_after)
    ]
    emit(
        rows, as_json, "Certificates", ["certificateId", "status", "issuer", "notAfter", "daysLeft", "thing"]
    )


@local_app.command("jobs")
def list_jobs(data_dir: DataDir = DEFAULT_DATA_DIR, as_json: JsonFlag = False) -> None:
    """Jobs with their execution status counts."""
    _, store = open_stores(data_dir)
    rows = [
        {
            "jobId": j["jobId"],
            "status": j["status"],
            "created": when(j["created"]),
            "executions": json.dumps(store.status_counts(j["jobId"])),
        }
        for j in store.jobs()
    ]
    emit(rows, as_json, "Jobs", ["jobId", "status", "created", "executions"])


@local_app.command()
def notifications(data_dir: DataDir = DEFAULT_DATA_DIR, as_json: JsonFlag = False) -> None:
    """Notifications of failed, timed-out or contradictory rotations."""
    registry, _ = open_stores(data_dir)
    rows = [
        {
            "time": when(n.get("created")),
            "thing": n.get("thingName"),
            "job": n.get("jobId"),
            "status": n.get("status"),
            "outcome": n.get("outcome"),
            "action": n.get("operatorAction"),
        }
        for n in registry.notifications()
    ]
    if as_json:
        console.print_json(json.dumps(registry.notifications()))
        return
    emit(rows, False, "Notifications", ["time", "thing", "job", "status", "outcome", "action"])
