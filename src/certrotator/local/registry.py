"""The local registry: things, groups, certificates, policies, exclusive attachments, rotation state,
rules and notifications, in SQLite. Errors are `RegistryError` with a message an operator can act on."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from certrotator import crypto
from certrotator.backend.ports import CertificateStatus, RotationState
from certrotator.local.db import Database
from certrotator.protocol import RotationProgress, validate_thing_name

RULES = ("create", "commit", "terminal")


class RegistryError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Certificate:
    certificate_id: str
    pem: str
    status: CertificateStatus
    issuer: str
    not_before: float
    not_after: float
    thing: str | None


class LocalRegistry:
    def __init__(self, db: Database) -> None:
        self.db = db

    # ------------------------------------------------------------------------------------ things

    def create_thing(self, name: str) -> None:
        validate_thing_name(name)
        with self.db.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO things(name, created) VALUES (?, ?)", (name, time.time()))

    def thing_exists(self, name: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM things WHERE name=?", (name,)))

    def things(self) -> list[str]:
        return [r["name"] for r in self.db.query("SELECT name FROM things ORDER BY name")]

    def create_group(self, name: str) -> None:
        validate_thing_name(name)
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO thing_groups(name, created) VALUES (?, ?)", (name, time.time())
            )

    def add_to_group(self, group: str, thing: str) -> None:
        self.create_group(group)
        if not self.thing_exists(thing):
            raise RegistryError(f"thing {thing!r} does not exist")
        with self.db.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO group_members VALUES (?, ?)", (group, thing))

    def group_exists(self, name: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM thing_groups WHERE name=?", (name,)))

    def group_members(self, group: str) -> list[str]:
        if not self.group_exists(group):
            raise RegistryError(f"thing group {group!r} does not exist")
        rows = self.db.query(
            "SELECT thing_name FROM group_members WHERE group_name=? ORDER BY thing_name", (group,)
        )
        return [r["thing_name"] for r in rows]

    def groups_of(self, thing: str) -> list[str]:
        rows = self.db.query("SELECT group_name FROM group_members WHERE thing_name=? ORDER BY 1", (thing,))
        return [r["group_name"] for r in rows]

    # ------------------------------------------------------------------------------ certificates

    def add_certificate(
        self, pem: str, issuer: str, status: CertificateStatus = CertificateStatus.ACTIVE
    ) -> str:
        cert = crypto.load_certificate(pem)
        cid = crypto.certificate_id(cert)
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO certificates VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    cid,
                    crypto.certificate_pem(cert),
                    status.value,
                    issuer,
                    cert.not_valid_before_utc.timestamp(),
                    cert.not_valid_after_utc.timestamp(),
                    time.time(),
                ),
            )
        return cid

    def certificate(self, certificate_id: str) -> Certificate | None:
        rows = self.db.query(
            "SELECT c.*, p.thing_name FROM certificates c LEFT JOIN thing_principals p "
            "ON p.certificate_id = c.id WHERE c.id=?",
            (certificate_id,),
        )
        return _certificate(rows[0]) if rows else None

    def certificates(self, thing: str | None = None) -> list[Certificate]:
        sql = (
            "SELECT c.*, p.thing_name FROM certificates c LEFT JOIN thing_principals p "
            "ON p.certificate_id = c.id"
        )
        rows = (
            self.db.query(f"{sql} WHERE p.thing_name=? ORDER BY c.created", (thing,))
            if thing
            else self.db.query(f"{sql} ORDER BY c.created")
        )
        return [_certificate(r) for r in rows]

    def set_certificate_status(self, certificate_id: str, status: CertificateStatus) -> None:
        with self.db.transaction() as conn:
            updated = conn.execute(
                "UPDATE certificates SET status=? WHERE id=?", (status.value, certificate_id)
            ).rowcount
        if not updated:
            raise RegistryError(f"certificate {certificate_id} does not exist")

    def delete_certificate(self, certificate_id: str) -> None:
        """Delete an INACTIVE/REVOKED certificate (policies go with it, as with forceDelete)."""
        with self.db.transaction() as conn:
            row = conn.execute("SELECT status FROM certificates WHERE id=?", (certificate_id,)).fetchone()
            if row is None:
                return
            if row["status"] == CertificateStatus.ACTIVE.value:
                raise RegistryError(f"certificate {certificate_id} is ACTIVE; deactivate it before deleting")
            if conn.execute(
                "SELECT 1 FROM thing_principals WHERE certificate_id=?", (certificate_id,)
            ).fetchone():
                raise RegistryError(f"certificate {certificate_id} is attached to a thing; detach it first")
            conn.execute("DELETE FROM certificates WHERE id=?", (certificate_id,))

    # --------------------------------------------------------------------------------- principals

    def attach_exclusive(self, thing: str, certificate_id: str) -> None:
        with self.db.transaction() as conn:
            if not conn.execute("SELECT 1 FROM things WHERE name=?", (thing,)).fetchone():
                raise RegistryError(f"thing {thing!r} does not exist")
            if not conn.execute("SELECT 1 FROM certificates WHERE id=?", (certificate_id,)).fetchone():
                raise RegistryError(f"certificate {certificate_id} does not exist")
            owner = conn.execute(
                "SELECT thing_name FROM thing_principals WHERE certificate_id=?", (certificate_id,)
            ).fetchone()
            if owner is not None and owner["thing_name"] != thing:
                raise RegistryError(
                    f"certificate {certificate_id} is exclusively attached to {owner['thing_name']!r}"
                )
            conn.execute(
                "INSERT OR IGNORE INTO thing_principals VALUES (?, ?, ?)",
                (certificate_id, thing, time.time()),
            )

    def detach(self, thing: str, certificate_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "DELETE FROM thing_principals WHERE certificate_id=? AND thing_name=?",
                (certificate_id, thing),
            )

    def thing_principals(self, thing: str) -> list[str]:
        rows = self.db.query(
            "SELECT certificate_id FROM thing_principals WHERE thing_name=? ORDER BY attached, certificate_id",
            (thing,),
        )
        return [r["certificate_id"] for r in rows]

    # ----------------------------------------------------------------------------------- policies

    def create_policy(self, name: str, document: dict[str, Any]) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO policies VALUES (?, ?)", (name, json.dumps(document)))

    def policy(self, name: str) -> dict[str, Any] | None:
        rows = self.db.query("SELECT document FROM policies WHERE name=?", (name,))
        return dict(json.loads(rows[0]["document"])) if rows else None

    def attach_policy(self, name: str, certificate_id: str) -> None:
        with self.db.transaction() as conn:
            if not conn.execute("SELECT 1 FROM policies WHERE name=?", (name,)).fetchone():
                raise RegistryError(f"policy {name!r} does not exist")
            conn.execute("INSERT OR IGNORE INTO policy_attachments VALUES (?, ?)", (name, certificate_id))

    def certificate_policies(self, certificate_id: str) -> list[str]:
        rows = self.db.query(
            "SELECT policy_name FROM policy_attachments WHERE certificate_id=? ORDER BY 1", (certificate_id,)
        )
        return [r["policy_name"] for r in rows]

    # ---------------------------------------------------------------------------- rotation state

    def load_state(self, thing: str) -> RotationState | None:
        rows = self.db.query("SELECT * FROM rotation_state WHERE thing_name=?", (thing,))
        if not rows:
            return None
        r = rows[0]
        return RotationState(
            r["job_id"], r["old_certificate_id"], r["new_certificate_id"], RotationProgress(r["progress"])
        )

    def save_state(self, thing: str, state: RotationState) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO rotation_state VALUES (?, ?, ?, ?, ?)",
                (
                    thing,
                    state.job_id,
                    state.old_certificate_id,
                    state.new_certificate_id,
                    state.progress.value,
                ),
            )

    def clear_state(self, thing: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM rotation_state WHERE thing_name=?", (thing,))

    # ------------------------------------------------------------------------ rules, notifications

    def rule_enabled(self, name: str) -> bool:
        self._check_rule(name)
        rows = self.db.query("SELECT enabled FROM rules WHERE name=?", (name,))
        return bool(rows[0]["enabled"]) if rows else True

    def set_rule_enabled(self, name: str, enabled: bool) -> None:
        self._check_rule(name)
        with self.db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO rules VALUES (?, ?)", (name, int(enabled)))

    @staticmethod
    def _check_rule(name: str) -> None:
        if name not in RULES:
            raise RegistryError(f"unknown rule {name!r}; rules: {', '.join(RULES)}")

    def add_notification(self, body: dict[str, Any]) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO notifications(created, body) VALUES (?, ?)", (time.time(), json.dumps(body))
            )

    def notifications(self) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT created, body FROM notifications ORDER BY id")
        return [{"created": r["created"], **json.loads(r["body"])} for r in rows]


def _certificate(row: Any) -> Certificate:
    return Certificate(
        certificate_id=row["id"],
        pem=row["pem"],
        status=CertificateStatus(row["status"]),
        issuer=row["issuer"],
        not_before=row["not_before"],
        not_after=row["not_after"],
        thing=row["thing_name"],
    )
