"""A stand-in for `GreengrassCoreIPCClientV2` and the nucleus behind it.

Same method names, keyword arguments and `awsiot.greengrasscoreipc.model` classes as the real client,
so the component code runs unchanged. IoT Core publish/subscribe is bridged, as the nucleus does, to a
real MQTT broker over mutual TLS with the nucleus's credential files (client id = thing name); the
connection is built from the files on disk at every (re)start, so `restart_nucleus()` connects with
whatever credentials the rotator installed. Without a broker (`endpoint=None`) the IoT Core side is a
loopback for unit tests: publishes are recorded, `inject()` delivers messages.

Like the nucleus it enforces the component's `accessControl` for aws.greengrass.ipc.mqttproxy (when
given), so a recipe that grants too little fails the tests. Configuration lives in memory;
`deploy()` runs the validate-then-apply sequence of a deployment.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from awscrt import mqtt
from awsiot import mqtt_connection_builder
from awsiot.greengrasscoreipc import model

WAIT = 10.0


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching ('+' one level, '#' the rest)."""
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels) or (level != "+" and level != topic_levels[i]):
            return False
    return len(filter_levels) == len(topic_levels)


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future


def _failed(error: BaseException) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_exception(error)
    return future


class StandInOperation:
    """What the V2 client returns as the stream operation: only `close()` is used."""

    def __init__(self, on_close: Callable[[StandInOperation], None]) -> None:
        self._on_close = on_close
        self.closed = False

    def close(self) -> Future[Any]:
        if not self.closed:
            self.closed = True
            self._on_close(self)
        return _done(None)


@dataclass
class _Stream:
    operation: StandInOperation
    on_event: Callable[[Any], None] | None
    on_closed: Callable[[], None] | None
    topic_filter: str = ""


@dataclass(frozen=True)
class Published:
    topic: str
    payload: bytes
    qos: str


class GreengrassIpcStandIn:
    def __init__(
        self,
        *,
        thing: str,
        component_name: str,
        configuration: dict[str, Any],
        other_components: dict[str, dict[str, Any]] | None = None,
        endpoint: str | None = None,
        port: int = 8883,
        root_ca: Path | None = None,
        certificate: Path | None = None,
        private_key: Path | None = None,
    ) -> None:
        self.thing, self.component_name = thing, component_name
        self.configuration = copy.deepcopy(configuration)
        self.other_components = copy.deepcopy(other_components or {})
        self.endpoint, self.port = endpoint, port
        self.root_ca, self.certificate, self.private_key = root_ca, certificate, private_key
        # Same executor semantics as the real client: stream events run on a thread pool.
        self.executor = ThreadPoolExecutor(thread_name_prefix="ipc-standin")
        self._lock = threading.RLock()
        self._iot_streams: dict[StandInOperation, _Stream] = {}
        self._validators: dict[StandInOperation, _Stream] = {}
        self._update_streams: dict[StandInOperation, _Stream] = {}
        self._reports: dict[str, Future[model.ConfigurationValidityReport]] = {}
        self._deployments = itertools.count(1)
        self._connection: mqtt.Connection | None = None
        self._mqtt_filters: dict[str, int] = {}  # filter -> live streams using it
        self.published: list[Published] = []
        self.subscribe_qos: list[tuple[str, str]] = []
        self.refused: list[str] = []  # authorization refusals, for assertions
        self.subscribe_failures: dict[str, BaseException] = {}  # filter -> error its subscribe fails with
        self.nucleus_restarts = 0
        self.closed = False
        self._changed = threading.Condition()
        if endpoint is not None:
            self._connect()

    # ---------------------------------------------------------------------------- the "nucleus"

    def _connect(self) -> None:
        assert self.root_ca and self.certificate and self.private_key
        connection = mqtt_connection_builder.mtls_from_path(
            endpoint=self.endpoint,
            port=self.port,
            cert_filepath=str(self.certificate),  # read now: a restart picks up rotated files
            pri_key_filepath=str(self.private_key),
            ca_filepath=str(self.root_ca),
            client_id=self.thing,
            clean_session=True,
            keep_alive_secs=30,
        )
        connection.on_message(self._on_mqtt_message)
        connection.connect().result(timeout=WAIT)
        self._connection = connection

    def restart_nucleus(self) -> None:
        """What a Greengrass service restart does to IoT Core: a new connection with the credentials now
        on disk; subscriptions of live streams are restored."""
        with self._lock:
            if self._connection is not None:
                self._connection.disconnect().result(timeout=WAIT)
                self._connection = None
            self._connect()
            self.nucleus_restarts += 1
            filters = list(self._mqtt_filters)
        # Not under the lock: a message that arrives meanwhile (a broker may publish right after a
        # SUBACK, e.g. the thing's current job) is delivered on the CRT's event-loop thread, which must
        # not wait for this one while this one waits for the SUBACKs that thread would process.
        for topic_filter in filters:
            self._mqtt_subscribe(topic_filter).result(timeout=WAIT)

    def _mqtt_subscribe(self, topic_filter: str) -> Future[Any]:
        if self._connection is None:
            return _done(None)  # loopback mode
        future, _packet_id = self._connection.subscribe(topic_filter, mqtt.QoS.AT_LEAST_ONCE)
        result: Future[Any] = Future()

        def suback(f: Future[Any]) -> None:
            error = f.exception()
            if error is None and f.result().get("qos") is None:
                error = model.ServiceError(message=f"SUBACK refused {topic_filter}")
            if error is not None:
                result.set_exception(error)
            else:
                result.set_result(model.SubscribeToIoTCoreResponse())

        future.add_done_callback(suback)
        return result

    def _on_mqtt_message(self, topic: str, payload: bytes, **_kwargs: Any) -> None:
        self.inject(topic, bytes(payload))

    def inject(self, topic: str, payload: bytes) -> None:
        """Deliver a message from IoT Core to every live subscription stream that matches."""
        with self._lock:
            streams = [s for s in self._iot_streams.values() if topic_matches(s.topic_filter, topic)]
        event = model.IoTCoreMessage(message=model.MQTTMessage(topic_name=topic, payload=payload))
        for stream in streams:
            if stream.on_event is not None:
                self.executor.submit(stream.on_event, event)

    def _authorized(self, operation: str, topic: str) -> bool:
        """The nucleus's mqttproxy authorization: a resource grants a topic (publish) or a filter
        (subscribe) if it is that string or an MQTT filter covering it."""
        policies = self.configuration.get("accessControl", {}).get("aws.greengrass.ipc.mqttproxy")
        if policies is None:
            return True  # no accessControl configured in this test: everything allowed
        for policy in policies.values():
            if f"aws.greengrass#{operation}" not in policy.get("operations", []):
                continue
            for template in policy.get("resources", []):
                resource = template.replace("{iot:thingName}", self.thing)
                if resource == topic or topic_matches(resource, topic):
                    return True
        self.refused.append(f"{operation} {topic}")
        return False

    def _check_open(self) -> None:
        if self.closed:
            raise model.ServiceError(message="IPC connection closed")

    # ------------------------------------------------------------------------------- IoT Core

    def publish_to_iot_core_async(
        self,
        *,
        topic_name: str | None = None,
        qos: str | None = None,
        payload: bytes | str | None = None,
        **_kw: Any,
    ) -> Future[Any]:
        self._check_open()
        assert topic_name is not None and qos is not None
        data = payload.encode() if isinstance(payload, str) else bytes(payload or b"")
        if not self._authorized("PublishToIoTCore", topic_name):
            return _failed(model.UnauthorizedError(message=f"not authorized to publish to {topic_name}"))
        self.published.append(Published(topic_name, data, qos))
        self._notify()
        if self._connection is None:
            return _done(model.PublishToIoTCoreResponse())
        future, _packet_id = self._connection.publish(topic_name, data, mqtt.QoS(int(qos)))
        result: Future[Any] = Future()
        future.add_done_callback(
            lambda f: (
                result.set_exception(e)
                if (e := f.exception()) is not None
                else result.set_result(model.PublishToIoTCoreResponse())
            )
        )
        return result

    def publish_to_iot_core(self, **kwargs: Any) -> Any:
        return self.publish_to_iot_core_async(**kwargs).result(timeout=WAIT)

    def subscribe_to_iot_core_async(
        self,
        *,
        topic_name: str | None = None,
        qos: str | None = None,
        stream_handler: Any = None,
        on_stream_event: Callable[[model.IoTCoreMessage], None] | None = None,
        on_stream_error: Callable[[Exception], bool] | None = None,
        on_stream_closed: Callable[[], None] | None = None,
    ) -> tuple[Future[Any], StandInOperation]:
        self._check_open()
        assert topic_name is not None and qos is not None and stream_handler is None
        operation = StandInOperation(self._close_iot_stream)
        if not self._authorized("SubscribeToIoTCore", topic_name):
            return _failed(
                model.UnauthorizedError(message=f"not authorized to subscribe to {topic_name}")
            ), operation
        if topic_name in self.subscribe_failures:
            return _failed(self.subscribe_failures[topic_name]), operation
        self.subscribe_qos.append((topic_name, qos))
        with self._lock:
            self._iot_streams[operation] = _Stream(operation, on_stream_event, on_stream_closed, topic_name)
            first = self._mqtt_filters.get(topic_name, 0) == 0
            self._mqtt_filters[topic_name] = self._mqtt_filters.get(topic_name, 0) + 1
        if first:
            return self._mqtt_subscribe(topic_name), operation
        return _done(model.SubscribeToIoTCoreResponse()), operation

    def subscribe_to_iot_core(self, **kwargs: Any) -> tuple[Any, StandInOperation]:
        future, operation = self.subscribe_to_iot_core_async(**kwargs)
        return future.result(timeout=WAIT), operation

    def _close_iot_stream(self, operation: StandInOperation) -> None:
        with self._lock:
            stream = self._iot_streams.pop(operation, None)
            if stream is None:
                return
            remaining = self._mqtt_filters[stream.topic_filter] - 1
            if remaining:
                self._mqtt_filters[stream.topic_filter] = remaining
                return
            del self._mqtt_filters[stream.topic_filter]
            if self._connection is not None:
                self._connection.unsubscribe(stream.topic_filter)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        """Block until `predicate()` holds, re-checked whenever something was published or closed."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    @property
    def live_subscriptions(self) -> list[str]:
        with self._lock:
            return sorted(s.topic_filter for s in self._iot_streams.values())

    # -------------------------------------------------------------------------- configuration

    def get_configuration_async(
        self, *, component_name: str | None = None, key_path: list[str] | None = None
    ) -> Future[Any]:
        self._check_open()
        name = component_name or self.component_name
        value = self.configuration if name == self.component_name else self.other_components.get(name, {})
        for key in key_path or []:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        return _done(model.GetConfigurationResponse(component_name=name, value=copy.deepcopy(value)))

    def get_configuration(self, **kwargs: Any) -> Any:
        return self.get_configuration_async(**kwargs).result(timeout=WAIT)

    def subscribe_to_validate_configuration_updates(
        self,
        *,
        stream_handler: Any = None,
        on_stream_event: Callable[[Any], None] | None = None,
        on_stream_error: Callable[[Exception], bool] | None = None,
        on_stream_closed: Callable[[], None] | None = None,
    ) -> tuple[Any, StandInOperation]:
        self._check_open()
        operation = StandInOperation(self._forget_stream)
        self._validators[operation] = _Stream(operation, on_stream_event, on_stream_closed)
        return model.SubscribeToValidateConfigurationUpdatesResponse(), operation

    def subscribe_to_configuration_update(
        self,
        *,
        component_name: str | None = None,
        key_path: list[str] | None = None,
        stream_handler: Any = None,
        on_stream_event: Callable[[Any], None] | None = None,
        on_stream_error: Callable[[Exception], bool] | None = None,
        on_stream_closed: Callable[[], None] | None = None,
    ) -> tuple[Any, StandInOperation]:
        self._check_open()
        operation = StandInOperation(self._forget_stream)
        self._update_streams[operation] = _Stream(operation, on_stream_event, on_stream_closed)
        return model.SubscribeToConfigurationUpdateResponse(), operation

    def _forget_stream(self, operation: StandInOperation) -> None:
        self._validators.pop(operation, None)
        self._update_streams.pop(operation, None)

    def send_configuration_validity_report_async(
        self, *, configuration_validity_report: model.ConfigurationValidityReport | None = None
    ) -> Future[Any]:
        self._check_open()
        assert configuration_validity_report is not None
        pending = self._reports.get(configuration_validity_report.deployment_id or "")
        if pending is None:
            return _failed(model.InvalidArgumentsError(message="no deployment awaits this report"))
        pending.set_result(configuration_validity_report)
        return _done(model.SendConfigurationValidityReportResponse())

    def send_configuration_validity_report(self, **kwargs: Any) -> Any:
        return self.send_configuration_validity_report_async(**kwargs).result(timeout=WAIT)

    def deploy(self, update: dict[str, Any]) -> model.ConfigurationValidityReport | None:
        """A deployment that merges `update` into the component configuration: components subscribed to
        validation are asked first, a REJECTED report fails it (configuration unchanged); otherwise the
        configuration is merged and configuration-update streams are told which keys changed."""
        proposed = {**copy.deepcopy(self.configuration), **copy.deepcopy(update)}
        deployment_id = f"deployment-{next(self._deployments)}"
        report: model.ConfigurationValidityReport | None = None
        if self._validators:
            pending: Future[model.ConfigurationValidityReport] = Future()
            self._reports[deployment_id] = pending
            event = model.ValidateConfigurationUpdateEvents(
                validate_configuration_update_event=model.ValidateConfigurationUpdateEvent(
                    configuration=copy.deepcopy(proposed), deployment_id=deployment_id
                )
            )
            for stream in list(self._validators.values()):
                if stream.on_event is not None:
                    self.executor.submit(stream.on_event, event)
            report = pending.result(timeout=WAIT)
            del self._reports[deployment_id]
            if report.status == model.ConfigurationValidityStatus.REJECTED:
                return report
        changed = [key for key in proposed if proposed[key] != self.configuration.get(key)]
        self.configuration = proposed
        for key in changed:
            event_update = model.ConfigurationUpdateEvents(
                configuration_update_event=model.ConfigurationUpdateEvent(
                    component_name=self.component_name, key_path=[key]
                )
            )
            for stream in list(self._update_streams.values()):
                if stream.on_event is not None:
                    self.executor.submit(stream.on_event, event_update)
        return report

    # ---------------------------------------------------------------------------------- close

    def close(self, *, executor_wait: bool = True) -> Future[Any]:
        if self.closed:
            return _done(None)
        self.closed = True
        with self._lock:
            streams = [
                *self._iot_streams.values(),
                *self._validators.values(),
                *self._update_streams.values(),
            ]
            self._iot_streams.clear()
            self._validators.clear()
            self._update_streams.clear()
            self._mqtt_filters.clear()
        for stream in streams:
            if stream.on_closed is not None:
                self.executor.submit(stream.on_closed)
        self.executor.shutdown(wait=executor_wait)
        if self._connection is not None:
            self._connection.disconnect().result(timeout=WAIT)
            self._connection = None
        self._notify()
        return _done(None)
