"""The component's own settings, from its Greengrass configuration over IPC.

`keyAlgorithm`, `signingAlgorithm` and the optional `stateTimeoutSeconds` are parsed into
`ComponentSettings`. A deployment's proposed configuration is validated on the validate-configuration
stream and REJECTED with the reason, so an invalid deployment fails; accepted ones are applied live.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from certrotator import crypto
from certrotator.device.greengrass.transport import StreamOperation, describe
from certrotator.device.settings import ConfigError, validate_algorithms

log = logging.getLogger("certrotator.device")

DEFAULT_KEY_ALGORITHM = "RSA-2048"
DEFAULT_SIGNING_ALGORITHM = "SHA256WITHRSA"
DEFAULT_STATE_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ComponentSettings:
    key_algorithm: crypto.KeyAlgorithm
    signing_algorithm: crypto.SigningAlgorithm
    state_timeout_s: float


def parse_component_configuration(configuration: Mapping[str, Any] | None, store: str) -> ComponentSettings:
    """Validate the component configuration; ConfigError says what is wrong (it becomes the REJECTED
    reason a deployment shows). Absent keys take the recipe's defaults."""
    configuration = configuration or {}
    key = configuration.get("keyAlgorithm", DEFAULT_KEY_ALGORITHM)
    signing = configuration.get("signingAlgorithm", DEFAULT_SIGNING_ALGORITHM)
    for name, value in (("keyAlgorithm", key), ("signingAlgorithm", signing)):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
    key_algorithm, signing_algorithm = validate_algorithms(key, signing, store)
    timeout: Any = configuration.get("stateTimeoutSeconds", DEFAULT_STATE_TIMEOUT_S)
    if isinstance(timeout, str):  # values typed into the console arrive as strings
        try:
            timeout = float(timeout)
        except ValueError:
            raise ConfigError(f"stateTimeoutSeconds must be a number of seconds, got {timeout!r}") from None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise ConfigError(f"stateTimeoutSeconds must be a number of seconds in (0, 3600], got {timeout!r}")
    return ComponentSettings(key_algorithm, signing_algorithm, float(timeout))


class ConfigIpc(Protocol):
    """The configuration part of `GreengrassCoreIPCClientV2` used here."""

    def get_configuration(
        self, *, component_name: str | None = None, key_path: list[str] | None = None
    ) -> Any: ...

    def get_configuration_async(
        self, *, component_name: str | None = None, key_path: list[str] | None = None
    ) -> Future[Any]: ...

    def subscribe_to_validate_configuration_updates(
        self,
        *,
        on_stream_event: Callable[[Any], None] | None = None,
        on_stream_error: Callable[[Exception], bool] | None = None,
        on_stream_closed: Callable[[], None] | None = None,
    ) -> tuple[Any, StreamOperation]: ...

    def subscribe_to_configuration_update(
        self,
        *,
        component_name: str | None = None,
        key_path: list[str] | None = None,
        on_stream_event: Callable[[Any], None] | None = None,
        on_stream_error: Callable[[Exception], bool] | None = None,
        on_stream_closed: Callable[[], None] | None = None,
    ) -> tuple[Any, StreamOperation]: ...

    def send_configuration_validity_report_async(
        self, *, configuration_validity_report: Any = None
    ) -> Future[Any]: ...


class ConfigurationWatcher:
    """Answers configuration validation requests and applies accepted configuration updates."""

    def __init__(self, client: ConfigIpc, store: str, apply: Callable[[ComponentSettings], None]) -> None:
        self.client, self.store, self.apply = client, store, apply
        self._operations: list[StreamOperation] = []

    def start(self) -> None:
        """Subscribe to both streams; raises if the nucleus refuses (then the component fails to start)."""
        _response, validate = self.client.subscribe_to_validate_configuration_updates(
            on_stream_event=self._validate,
            on_stream_error=_keep_stream("validate-configuration"),
            on_stream_closed=lambda: log.info("validate-configuration stream closed"),
        )
        self._operations.append(validate)
        _response, updates = self.client.subscribe_to_configuration_update(
            key_path=[],  # the whole component configuration
            on_stream_event=self._updated,
            on_stream_error=_keep_stream("configuration-update"),
            on_stream_closed=lambda: log.info("configuration-update stream closed"),
        )
        self._operations.append(updates)

    def check(self, configuration: Mapping[str, Any] | None) -> tuple[bool, str]:
        try:
            settings = parse_component_configuration(configuration, self.store)
        except ConfigError as exc:
            return False, str(exc)
        return True, (
            f"keyAlgorithm {settings.key_algorithm.value}, signingAlgorithm {settings.signing_algorithm.value}, "
            f"stateTimeoutSeconds {settings.state_timeout_s:g}"
        )

    def _validate(self, events: Any) -> None:
        from awsiot.greengrasscoreipc.model import ConfigurationValidityReport, ConfigurationValidityStatus

        event = getattr(events, "validate_configuration_update_event", None)
        if event is None:
            return
        valid, message = self.check(event.configuration)
        status = ConfigurationValidityStatus.ACCEPTED if valid else ConfigurationValidityStatus.REJECTED
        log.info("configuration for deployment %s %s: %s", event.deployment_id, status, message)
        report = ConfigurationValidityReport(
            status=status, deployment_id=event.deployment_id, message=message
        )
        try:
            # The async call: this runs on an IPC callback thread, which must never block on IPC.
            future = self.client.send_configuration_validity_report_async(
                configuration_validity_report=report
            )
        except Exception as exc:
            log.error("cannot report the configuration validity: %s", describe(exc))
            return
        future.add_done_callback(lambda f: _log_failure(f, "reporting the configuration validity"))

    def _updated(self, _events: Any) -> None:
        try:
            future = self.client.get_configuration_async(key_path=[])  # [] = all of it
        except Exception as exc:
            log.error("cannot read the updated configuration: %s", describe(exc))
            return
        future.add_done_callback(self._fetched)

    def _fetched(self, future: Future[Any]) -> None:
        if (error := future.exception()) is not None:
            log.error("cannot read the updated configuration: %s", describe(error))
            return
        try:
            settings = parse_component_configuration(future.result().value, self.store)
        except ConfigError as exc:
            # Only reachable if the nucleus merged a configuration we rejected: keep the last good one.
            log.error("ignoring invalid configuration update: %s", exc)
            return
        self.apply(settings)

    def close(self) -> None:
        for operation in self._operations:
            try:
                operation.close()
            except Exception as exc:
                log.debug("closing a configuration stream failed: %s", exc)
        self._operations.clear()


def _keep_stream(name: str) -> Callable[[Exception], bool]:
    def on_error(error: Exception) -> bool:
        log.warning("%s stream error: %s", name, describe(error))
        return False  # keep the stream open

    return on_error


def _log_failure(future: Future[Any], what: str) -> None:
    if (error := future.exception()) is not None:
        log.error("%s failed: %s", what, describe(error))
