"""The local IoT Core's three rules, as AWS IoT rules feed the Lambda functions: `create` and `commit`
route a device's certificate requests to the backend handlers, `terminal` routes the end of every job
execution to the terminal handler, which tells rotation jobs apart by their document and decides from
the backend's own rotation state (never from what the device wrote in statusDetails).

A rule can be disabled and enabled (the registry keeps the switch across restarts; it is cached here
because every request asks). What the broker knows of the connection becomes the handlers'
`BrokerContext` directly: there is no event dict to build and parse back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from certrotator.backend.handlers import (
    HandlerResult,
    handle_commit_certificate,
    handle_create_certificate,
    handle_job_execution_terminal,
    reject_malformed_request,
)
from certrotator.backend.ports import Ports
from certrotator.backend.rotation_jobs import DocumentLookup, RotationJobs
from certrotator.local.policy import Connection
from certrotator.local.registry import LocalRegistry
from certrotator.protocol import (
    BrokerContext,
    CommitCertificateRequest,
    CreateCertificateRequest,
    JobExecutionEvent,
    ParsedTopic,
    ProtocolError,
    TopicKind,
)

log = logging.getLogger("certrotator.local")

TERMINAL_RULE = "terminal"
# Recent handler decisions kept for tests and diagnostics (the log has all of them).
_KEEP_RESULTS = 10_000


class Rules:
    def __init__(
        self,
        registry: LocalRegistry,
        ports: Ports,
        job_document: DocumentLookup,
        on_result: Callable[[HandlerResult, float], None] | None = None,
    ) -> None:
        """`job_document(thing, job_id)` is the job's document (the local job store has it at hand);
        `on_result(result, seconds)` is told each handler's decision and how long it took (metrics)."""
        self.registry, self.ports, self.on_result = registry, ports, on_result
        # Which jobs are rotations, as the Lambda remembers it: one look at a job's document per job.
        self.rotation_jobs = RotationJobs(job_document)
        self.results: list[HandlerResult] = []
        self._enabled: dict[str, bool] = {}

    def enabled(self, name: str) -> bool:
        if name not in self._enabled:
            self._enabled[name] = self.registry.rule_enabled(name)
        return self._enabled[name]

    def set_enabled(self, name: str, enabled: bool) -> None:
        self.registry.set_rule_enabled(name, enabled)
        self._enabled[name] = enabled

    def override(self, name: str, enabled: bool) -> None:
        """Switch a rule for this run only, not saved (a fault plan's disabled rule)."""
        self._enabled[name] = enabled

    def certificate_request(
        self, parsed: ParsedTopic, topic: str, payload: bytes, connection: Connection
    ) -> None:
        """A device's create or commit request (`parsed.kind`), from an authenticated connection."""
        kind = parsed.kind
        if not self.enabled(kind.value):
            log.info("rule %s disabled: dropped %s", kind.value, topic)
            return
        assert parsed.thing is not None and kind in (TopicKind.CREATE, TopicKind.COMMIT)
        # What the rule's SELECT adds in AWS (topic(3), topic(), clientid(), principal()), here straight
        # from the connection the broker authenticated.
        context = BrokerContext(parsed.thing, connection.client_id, connection.principal, topic)
        started = time.perf_counter()
        try:
            if kind is TopicKind.CREATE:
                create = CreateCertificateRequest.parse(payload)
                result = handle_create_certificate(context, create, self.ports)
            else:
                commit = CommitCertificateRequest.parse(payload)
                result = handle_commit_certificate(context, commit, self.ports)
        except ProtocolError as exc:  # only the parse raises: the handlers answer every other problem
            result = reject_malformed_request(kind, parsed.thing, str(exc), self.ports)
        self._record(result, started)

    def execution_ended(self, event: JobExecutionEvent) -> None:
        """A job execution reached a terminal status (whatever ended it: device, timeout, cancel), any
        job's. What the handler raises propagates: the caller keeps the work and tries again."""
        if not self.enabled(TERMINAL_RULE):
            log.info("rule %s disabled: dropped the end of %s / %s", TERMINAL_RULE, event.thing, event.job_id)
            return
        started = time.perf_counter()
        self._record(handle_job_execution_terminal(event, self.ports, self.rotation_jobs), started)

    def _record(self, result: HandlerResult, started: float) -> None:
        if self.on_result is not None:
            self.on_result(result, time.perf_counter() - started)
        self.results.append(result)
        if len(self.results) > _KEEP_RESULTS:
            del self.results[: _KEEP_RESULTS // 2]
