"""The local IoT Core's three rules, as AWS IoT rules feed the Lambda functions: `create` and `commit`
route a device's certificate requests to the backend handlers, `terminal` routes every job execution
that ends with the rotation's statusDetails key to the terminal handler.

A rule can be disabled and enabled (the registry keeps the switch across restarts; it is cached here
because every request asks). What the broker knows of the connection becomes the handlers'
`BrokerContext` directly: there is no event dict to build and parse back.
"""

from __future__ import annotations

import logging

from certrotator.backend.handlers import (
    HandlerResult,
    handle_commit_certificate,
    handle_create_certificate,
    handle_job_execution_terminal,
    reject_malformed_request,
)
from certrotator.backend.ports import Ports
from certrotator.local.jobs import Execution
from certrotator.local.policy import Connection
from certrotator.local.registry import LocalRegistry
from certrotator.protocol import (
    STATUS_DETAILS_KEY,
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
    def __init__(self, registry: LocalRegistry, ports: Ports) -> None:
        self.registry, self.ports = registry, ports
        self.results: list[HandlerResult] = []
        self._enabled: dict[str, bool] = {}

    def enabled(self, name: str) -> bool:
        if name not in self._enabled:
            self._enabled[name] = self.registry.rule_enabled(name)
        return self._enabled[name]

    def set_enabled(self, name: str, enabled: bool) -> None:
        self.registry.set_rule_enabled(name, enabled)
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
        try:
            if kind is TopicKind.CREATE:
                create = CreateCertificateRequest.parse(payload)
                result = handle_create_certificate(context, create, self.ports)
            else:
                commit = CommitCertificateRequest.parse(payload)
                result = handle_commit_certificate(context, commit, self.ports)
        except ProtocolError as exc:  # only the parse raises: the handlers answer every other problem
            result = reject_malformed_request(kind, parsed.thing, str(exc), self.ports)
        self._record(result)

    def execution_ended(self, execution: Execution) -> None:
        """A job execution reached a terminal status (whatever ended it: device, timeout, cancel)."""
        if STATUS_DETAILS_KEY not in execution.status_details or not self.enabled(TERMINAL_RULE):
            return
        event = JobExecutionEvent(
            execution.thing, execution.job_id, execution.status, dict(execution.status_details)
        )
        self._record(handle_job_execution_terminal(event, self.ports))

    def _record(self, result: HandlerResult) -> None:
        self.results.append(result)
        if len(self.results) > _KEEP_RESULTS:
            del self.results[: _KEEP_RESULTS // 2]
