"""The backend ports implemented on the local IoT Core: registry, jobs, CA, the outbox (publisher) and
the notifier. The handlers run unchanged on these, exactly as they run on the boto3 adapters."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from certrotator import crypto
from certrotator.backend.ports import (
    CertificateRecord,
    CertificateStatus,
    IssuedCertificate,
    JobExecution,
    Notification,
    RotationState,
    ThingNotFound,
)
from certrotator.local.ca import Issuer
from certrotator.local.jobs import JobStore
from certrotator.local.registry import LocalRegistry
from certrotator.protocol import encode

log = logging.getLogger("certrotator.local")

NOTIFICATIONS_FILE = "notifications.jsonl"


class RegistryPort:
    def __init__(self, registry: LocalRegistry, on_deactivated: Callable[[str], None]) -> None:
        self.registry = registry
        self.on_deactivated = on_deactivated  # disconnects live connections of that certificate

    def exclusive_principals(self, thing: str) -> list[str]:
        if not self.registry.thing_exists(thing):
            raise ThingNotFound(thing)
        return self.registry.thing_principals(thing)

    def describe_certificate(self, certificate_id: str) -> CertificateRecord | None:
        cert = self.registry.certificate(certificate_id)
        return CertificateRecord(cert.certificate_id, cert.pem, cert.status) if cert else None

    def certificate_policies(self, certificate_id: str) -> list[str]:
        return self.registry.certificate_policies(certificate_id)

    def attach_policy(self, policy_name: str, certificate_id: str) -> None:
        self.registry.attach_policy(policy_name, certificate_id)

    def attach_exclusive(self, thing: str, certificate_id: str) -> None:
        self.registry.attach_exclusive(thing, certificate_id)

    def delete_certificate(self, thing: str, certificate_id: str) -> None:
        if self.registry.certificate(certificate_id) is None:
            return
        self.registry.set_certificate_status(certificate_id, CertificateStatus.INACTIVE)
        self.on_deactivated(certificate_id)
        self.registry.detach(thing, certificate_id)
        self.registry.delete_certificate(certificate_id)


class JobsDataPort:
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def describe_execution(self, thing: str, job_id: str) -> JobExecution | None:
        e = self.store.execution(thing, job_id)
        return JobExecution(e.thing, e.job_id, e.status, e.document) if e else None


class IssuerPort:
    """Signs with a local CA and registers the certificate ACTIVE, as CreateCertificateFromCsr does
    (and as IssueCertificate + RegisterCertificateWithoutCA do for the private CA)."""

    def __init__(self, issuer: Issuer, registry: LocalRegistry) -> None:
        self.issuer, self.registry = issuer, registry

    def issue(self, thing: str, csr_pem: str) -> IssuedCertificate:
        cert = self.issuer.sign_csr(csr_pem)
        pem = crypto.certificate_pem(cert)
        return IssuedCertificate(self.registry.add_certificate(pem, self.issuer.name.value), pem)


class StatePort:
    def __init__(self, registry: LocalRegistry) -> None:
        self.registry = registry

    def load(self, thing: str) -> RotationState | None:
        return self.registry.load_state(thing)

    def save(self, thing: str, state: RotationState) -> None:
        self.registry.save_state(thing, state)

    def clear(self, thing: str) -> None:
        self.registry.clear_state(thing)


class Outbox:
    """The publisher port, and the one buffer between everything the engine publishes and the broker.

    Inside `holding()` (a unit of work: one device message and its transaction) messages are held and
    go out once the unit has committed, so a device never sees a reply about a change that was then
    rolled back; the held messages are dropped if the unit fails. Outside a unit (timers, admin
    operations) they go out at once.

    Everything goes out at QoS 0. At QoS 1 the device's PUBACK is a small write still unacknowledged
    when it sends its next request, so Nagle (the AWS CRT offers no TCP_NODELAY) holds that request for
    the broker's delayed ACK: ~40 ms per round trip. A lost QoS 0 reply is what the device's per-state
    timeouts are for, as with any lost message."""

    def __init__(self, send: Callable[[str, bytes, int], None]) -> None:
        self._send = send  # the broker's publish_nowait(topic, payload, qos)
        self._held: list[tuple[str, bytes]] | None = None

    def publish(self, topic: str, message: dict[str, Any]) -> None:
        if self._held is not None:
            self._held.append((topic, encode(message)))
        else:
            self._send(topic, encode(message), 0)

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Hold what is published until the block ends without an exception, then send it in order."""
        self._held = []
        try:
            yield
            held = self._held
        finally:
            self._held = None
        for topic, data in held:
            self._send(topic, data, 0)


class LocalNotifier:
    """Notifications go to the registry, `notifications.jsonl`, the log and an optional webhook."""

    def __init__(
        self,
        registry: LocalRegistry,
        data_dir: Path,
        webhook_url: str | None = None,
        webhook_attempts: int = 3,
    ) -> None:
        self.registry = registry
        self.path = data_dir / NOTIFICATIONS_FILE
        self.webhook_url = webhook_url
        self.webhook_attempts = webhook_attempts
        self._lock = threading.Lock()

    def notify(self, notification: Notification) -> None:
        body = {"timestamp": time.time(), **notification.to_dict()}
        self.registry.add_notification(body)
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(body) + "\n")
        log.warning(
            "notification: %s %s %s: %s",
            notification.thing,
            notification.job_id,
            notification.status,
            notification.outcome,
        )
        if self.webhook_url:
            threading.Thread(target=self._post, args=(body,), daemon=True, name="webhook").start()

    def _post(self, body: dict[str, Any]) -> None:
        assert self.webhook_url is not None
        data = json.dumps(body).encode()
        for attempt in range(1, self.webhook_attempts + 1):
            request = urllib.request.Request(
                self.webhook_url, data=data, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if 200 <= response.status < 300:
                        return
            except (urllib.error.URLError, OSError) as exc:
                log.warning("webhook attempt %d/%d failed: %s", attempt, self.webhook_attempts, exc)
            time.sleep(min(2.0**attempt * 0.1, 2.0))  # backoff between bounded retries, off the engine loop
        log.error("webhook gave up after %d attempts", self.webhook_attempts)
