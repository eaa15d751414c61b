"""Greengrass mode: configuration validation over IPC, the nucleus's credential locations
(effectiveConfig.yaml, config.tlog, defaults), the IPC transport, and one whole rotation through a
stand-in for GreengrassCoreIPCClientV2 bridged to the local IoT Core."""

from __future__ import annotations

import json
import queue
import signal
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from awsiot.greengrasscoreipc import model
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from certrotator import crypto
from certrotator.compat import UTC
from certrotator.device import machine as m
from certrotator.device.agent_cli import agent as agent_command
from certrotator.device.greengrass import runtime as gg
from certrotator.device.greengrass import transport as transport_module
from certrotator.device.greengrass.component_settings import (
    ComponentSettings,
    ConfigurationWatcher,
    parse_component_configuration,
)
from certrotator.device.greengrass.nucleus_config import (
    NucleusCredentials,
    read_tlog,
    resolve_nucleus_credentials,
)
from certrotator.device.greengrass.transport import GreengrassTransport
from certrotator.device.keystores.files import FileKeyStore
from certrotator.device.keystores.pkcs11.location import PKCS11_PROVIDER
from certrotator.device.reactor import Reactor
from certrotator.device.settings import ConfigError
from certrotator.protocol import Topics

from ..e2e.harness import running_fleet
from .gg_standin import GreengrassIpcStandIn

pytestmark = pytest.mark.timeout(120)

WAIT = 10.0
THING = "gg-core-001"
COMPONENT = "aws.greengrass.labs.CertificateRotator"
RECIPE = Path(__file__).resolve().parents[2] / "component" / "recipe.yaml"


def recipe_configuration() -> dict[str, Any]:
    """The recipe's DefaultConfiguration, with the component name filled in (accessControl included)."""
    text = RECIPE.read_text().replace("{COMPONENT_NAME}", COMPONENT)
    configuration: dict[str, Any] = yaml.safe_load(text)["ComponentConfiguration"]["DefaultConfiguration"]
    return configuration


def standin(configuration: dict[str, Any] | None = None, **kwargs: Any) -> GreengrassIpcStandIn:
    return GreengrassIpcStandIn(
        thing=THING,
        component_name=COMPONENT,
        configuration=recipe_configuration() if configuration is None else configuration,
        **kwargs,
    )


# ------------------------------------------------------------------------------------ configuration


class Applied:
    def __init__(self) -> None:
        self.settings: queue.Queue[ComponentSettings] = queue.Queue()

    def __call__(self, settings: ComponentSettings) -> None:
        self.settings.put(settings)


@pytest.mark.parametrize(
    ("update", "store", "reason"),
    [
        ({"keyAlgorithm": "RSA-2048", "signingAlgorithm": "ECDSA-WITH-SHA256"}, "file", "does not match"),
        ({"keyAlgorithm": "ECDSA-P384", "signingAlgorithm": "SHA384WITHRSA"}, "file", "does not match"),
        ({"keyAlgorithm": "RSA-1024"}, "file", "unknown key algorithm 'RSA-1024'"),
        ({"signingAlgorithm": "DSA_WITH_SHA256"}, "file", "unknown signing algorithm"),
        ({"keyAlgorithm": "ECDSA-P521", "signingAlgorithm": "ECDSA-WITH-SHA512"}, "pkcs11", "PKCS#11"),
        ({"keyAlgorithm": 2048}, "file", "keyAlgorithm must be a string"),
        ({"stateTimeoutSeconds": 0}, "file", "stateTimeoutSeconds"),
        ({"stateTimeoutSeconds": "soon"}, "file", "stateTimeoutSeconds"),
    ],
)
def test_invalid_configuration_is_rejected_with_the_reason(
    update: dict[str, Any], store: str, reason: str
) -> None:
    ipc = standin()
    applied = Applied()
    watcher = ConfigurationWatcher(ipc, store, applied)
    watcher.start()
    try:
        report = ipc.deploy(update)
        assert report is not None
        assert report.status == model.ConfigurationValidityStatus.REJECTED
        assert reason in (report.message or "")
        assert report.deployment_id == "deployment-1"
        assert ipc.configuration == recipe_configuration()  # the deployment failed: nothing merged
        assert applied.settings.empty()
    finally:
        watcher.close()
        ipc.close()


@pytest.mark.parametrize(
    ("update", "store", "expected"),
    [
        (
            {"keyAlgorithm": "ECDSA-P521", "signingAlgorithm": "ECDSA-WITH-SHA512"},
            "file",
            ComponentSettings(
                crypto.KeyAlgorithm.ECDSA_P521, crypto.SigningAlgorithm.ECDSA_WITH_SHA512, 30.0
            ),
        ),
        (
            {
                "keyAlgorithm": "ECDSA-P384",
                "signingAlgorithm": "ECDSA-WITH-SHA384",
                "stateTimeoutSeconds": "45",
            },
            "pkcs11",
            ComponentSettings(
                crypto.KeyAlgorithm.ECDSA_P384, crypto.SigningAlgorithm.ECDSA_WITH_SHA384, 45.0
            ),
        ),
        (
            {
                "keyAlgorithm": "RSA-3072",
                "signingAlgorithm": "SHA512WITHRSAANDMGF1",
                "stateTimeoutSeconds": 12,
            },
            "file",
            ComponentSettings(
                crypto.KeyAlgorithm.RSA_3072, crypto.SigningAlgorithm.SHA512WITHRSAANDMGF1, 12.0
            ),
        ),
    ],
)
def test_valid_configuration_is_accepted_and_applied(
    update: dict[str, Any], store: str, expected: ComponentSettings
) -> None:
    ipc = standin()
    applied = Applied()
    watcher = ConfigurationWatcher(ipc, store, applied)
    watcher.start()
    try:
        report = ipc.deploy(update)
        assert report is not None
        assert report.status == model.ConfigurationValidityStatus.ACCEPTED
        assert expected.key_algorithm.value in (report.message or "")
        assert applied.settings.get(timeout=WAIT) == expected
    finally:
        watcher.close()
        ipc.close()


def test_recipe_defaults_are_valid_and_missing_keys_take_them() -> None:
    defaults = parse_component_configuration(recipe_configuration(), "file")
    assert defaults == ComponentSettings(
        crypto.KeyAlgorithm.RSA_2048, crypto.SigningAlgorithm.SHA256WITHRSA, 30.0
    )
    assert parse_component_configuration({}, "pkcs11") == defaults
    assert parse_component_configuration(None, "file") == defaults


# ---------------------------------------------------------------------------- nucleus configuration

EFFECTIVE_CONFIG = """\
---
system:
  certificateFilePath: "/greengrass/v2/thingCert.crt"
  privateKeyPath: "/greengrass/v2/privKey.key"
  rootCaPath: "/greengrass/v2/rootCA.pem"
  rootpath: "/greengrass/v2"
  thingName: "gg-core-001"
services:
  aws.greengrass.Nucleus:
    componentType: "NUCLEUS"
    configuration:
      awsRegion: "eu-west-1"
      componentStoreMaxSizeBytes: "10000000000"
      deploymentPollingFrequencySeconds: "15"
      envStage: "prod"
      greengrassDataPlaneEndpoint: ""
      greengrassDataPlanePort: "8443"
      interpolateComponentConfiguration: true
      iotCredEndpoint: "c1a2b3c4d5e6f7.credentials.iot.eu-west-1.amazonaws.com"
      iotDataEndpoint: "a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com"
      iotRoleAlias: "GreengrassV2TokenExchangeRoleAlias"
      jvmOptions: "-Dlog.store=FILE"
      logging: {}
      mqtt:
        spooler:
          keepQos0WhenOffline: false
      networkProxy:
        proxy: {}
      platformOverride: {}
      runWithDefault:
        posixUser: "ggc_user:ggc_group"
      telemetry: {}
    dependencies: []
    lifecycle:
      bootstrap:
        requiresPrivilege: "true"
        script: "\\t\\n\\t\\t\\tset -eu\\n\\t\\t\\tKERNEL_ROOT=\\"/greengrass/v2\\"\\n"
    version: "2.12.1"
  aws.greengrass.labs.CertificateRotator:
    componentType: "GENERIC"
    configuration:
      keyAlgorithm: "RSA-2048"
      signingAlgorithm: "SHA256WITHRSA"
    dependencies:
    - "aws.greengrass.Nucleus:SOFT"
    version: "0.1.0"
  main:
    dependencies:
    - "aws.greengrass.labs.CertificateRotator"
    - "aws.greengrass.Nucleus"
    lifecycle: {}
"""

# What the installer with the fleet provisioning plugin leaves in effectiveConfig.yaml: it is written
# before the plugin has provisioned the device, so the credential paths are still empty (seed #120).
FLEET_PROVISIONED_EFFECTIVE_CONFIG = """\
---
system:
  certificateFilePath: ""
  privateKeyPath: ""
  rootCaPath: "/greengrass/v2/AmazonRootCA1.pem"
  rootpath: "/greengrass/v2"
  thingName: ""
services:
  aws.greengrass.Nucleus:
    componentType: "NUCLEUS"
    configuration:
      awsRegion: "eu-west-1"
      iotDataEndpoint: "a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com"
    version: "2.12.1"
  aws.greengrass.FleetProvisioningByClaim:
    configuration:
      claimCertificatePath: "/greengrass/v2/claim-certs/claim.pem.crt"
      claimCertificatePrivateKeyPath: "/greengrass/v2/claim-certs/claim.private.pem.key"
      provisioningTemplate: "GreengrassFleetProvisioningTemplate"
      rootPath: "/greengrass/v2"
"""


def tlog_line(ts: int, path: list[str], what: str, value: Any = None) -> str:
    return json.dumps({"TS": ts, "TP": path, "W": what, "V": value}, separators=(",", ":"))


def write_root(root: Path, effective: str | None, tlog_lines: list[str] | None = None) -> Path:
    (root / "config").mkdir(parents=True, exist_ok=True)
    if effective is not None:
        (root / "config" / "effectiveConfig.yaml").write_text(effective)
    if tlog_lines is not None:
        (root / "config" / "config.tlog").write_text("\n".join(tlog_lines) + "\n")
    return root


def fleet_provisioned_tlog(cert: str, key: str) -> list[str]:
    """A transaction log as the nucleus writes it across installer start, fleet provisioning and later
    deployments: values overriding each other, an out-of-order stale write, a removal, noise."""
    return [
        tlog_line(1700000000000, ["system", "certificateFilePath"], "changed", ""),
        tlog_line(1700000000000, ["system", "privateKeyPath"], "changed", ""),
        tlog_line(1700000000000, ["system", "rootCaPath"], "changed", "/greengrass/v2/AmazonRootCA1.pem"),
        tlog_line(
            1700000000001,
            ["services", "aws.greengrass.Nucleus", "configuration", "awsRegion"],
            "changed",
            "eu-west-1",
        ),
        tlog_line(1700000000002, ["services", "main", "lifecycle"], "interiorAdded"),
        # The provisioning plugin first wrote the claim's paths, then the device's own.
        tlog_line(
            1700000004000,
            ["system", "certificateFilePath"],
            "changed",
            "/greengrass/v2/claim-certs/claim.pem.crt",
        ),
        tlog_line(
            1700000004001,
            ["system", "privateKeyPath"],
            "changed",
            "/greengrass/v2/claim-certs/claim.private.pem.key",
        ),
        tlog_line(1700000005123, ["system", "certificateFilePath"], "changed", cert),
        tlog_line(1700000005124, ["system", "privateKeyPath"], "changed", key),
        tlog_line(1700000005125, ["system", "thingName"], "changed", THING),
        # Later in the file but older: the replay keeps the newer value.
        tlog_line(1700000004500, ["system", "privateKeyPath"], "changed", "/greengrass/v2/stale.key"),
        tlog_line(1700000006000, ["system", "certificateFilePath"], "timestampUpdated"),
        "this line is not JSON",
        json.dumps({"TS": "yesterday", "TP": ["system", "certificateFilePath"], "W": "changed", "V": "/bad"}),
        json.dumps({"TS": 1700000009999, "TP": "system/privateKeyPath", "W": "changed", "V": "/bad"}),
        json.dumps(["TS", 1700000009999]),
        tlog_line(1700000007000, ["services", "aws.greengrass.FleetProvisioningByClaim"], "removed"),
        # A power cut while appending: the last line is torn.
        '{"TS":1700000009000,"TP":["system","certificateFilePath"],"W":"chan',
    ]


def test_effective_config_paths_are_used(tmp_path: Path) -> None:
    root = write_root(
        tmp_path, EFFECTIVE_CONFIG, [tlog_line(1, ["system", "certificateFilePath"], "changed", "/tlog.crt")]
    )
    credentials = resolve_nucleus_credentials(root)
    assert (credentials.certificate, credentials.private_key, credentials.root_ca) == (
        "/greengrass/v2/thingCert.crt",
        "/greengrass/v2/privKey.key",
        "/greengrass/v2/rootCA.pem",
    )
    assert set(credentials.sources.values()) == {"effectiveConfig.yaml"}
    assert not credentials.uses_pkcs11
    assert credentials.pkcs11_provider == {}


def test_fleet_provisioned_paths_come_from_the_latest_tlog_values(tmp_path: Path) -> None:
    root = write_root(
        tmp_path,
        FLEET_PROVISIONED_EFFECTIVE_CONFIG,
        fleet_provisioned_tlog("/greengrass/v2/thingCert.crt", "/greengrass/v2/privKey.key"),
    )
    credentials = resolve_nucleus_credentials(root)
    assert credentials.certificate == "/greengrass/v2/thingCert.crt"
    assert credentials.private_key == "/greengrass/v2/privKey.key"
    assert credentials.root_ca == "/greengrass/v2/AmazonRootCA1.pem"
    assert credentials.sources == {
        "certificateFilePath": "config.tlog",
        "privateKeyPath": "config.tlog",
        "rootCaPath": "effectiveConfig.yaml",
    }


def test_tlog_replay_semantics(tmp_path: Path) -> None:
    path = tmp_path / "config.tlog"
    claim = ["services", "aws.greengrass.FleetProvisioningByClaim"]
    path.write_text(
        "\n".join(
            [
                *fleet_provisioned_tlog("/c.crt", "/k.key"),
                tlog_line(1700000007500, [*claim, "configuration", "rootPath"], "changed", "/again"),
                tlog_line(1700000008000, ["System", "RootCaPath"], "changed", "/greengrass/v2/newRoot.pem"),
                tlog_line(1700000008001, ["system", "rootCaPath"], "removed"),
            ]
        )
    )
    values = read_tlog(path)
    assert values[("system", "certificatefilepath")] == "/c.crt"
    assert values[("system", "privatekeypath")] == "/k.key"
    assert values[("system", "thingname")] == THING
    assert values[("services", "aws.greengrass.nucleus", "configuration", "awsregion")] == "eu-west-1"
    # The removal dropped the plugin's whole subtree; a write after it starts the subtree afresh.
    lowered = tuple(p.lower() for p in claim)
    assert {k: v for k, v in values.items() if k[:2] == lowered} == {
        (*lowered, "configuration", "rootpath"): "/again"
    }
    # Keys are case-insensitive: a removal spelled differently still removes.
    assert ("system", "rootcapath") not in values
    assert read_tlog(tmp_path / "missing.tlog") == {}


def test_defaults_when_neither_file_has_the_paths(tmp_path: Path) -> None:
    root = write_root(
        tmp_path, FLEET_PROVISIONED_EFFECTIVE_CONFIG.replace('"/greengrass/v2/AmazonRootCA1.pem"', '""'), []
    )
    credentials = resolve_nucleus_credentials(root)
    assert credentials.certificate == str(root / "thingCert.crt")
    assert credentials.private_key == str(root / "privKey.key")
    assert credentials.root_ca == str(root / "rootCA.pem")
    assert set(credentials.sources.values()) == {"default"}
    # No files at all: defaults as well; a corrupt effectiveConfig.yaml is no worse than a missing one.
    assert resolve_nucleus_credentials(write_root(tmp_path / "empty", None)).certificate.endswith(
        "thingCert.crt"
    )
    broken = write_root(tmp_path / "broken", "system: [unclosed\n", fleet_provisioned_tlog("/c", "/k"))
    assert resolve_nucleus_credentials(broken).certificate == "/c"


def test_pkcs11_credentials_and_provider_configuration(tmp_path: Path) -> None:
    effective = EFFECTIVE_CONFIG.replace(
        '"/greengrass/v2/thingCert.crt"', '"pkcs11:object=greengrass_cert;type=cert"'
    ).replace('"/greengrass/v2/privKey.key"', '"pkcs11:object=greengrass_key;type=private"')
    effective += """\
  aws.greengrass.crypto.Pkcs11Provider:
    componentType: "PLUGIN"
    configuration:
      library: "/usr/lib/softhsm/libsofthsm2.so"
      name: "softhsm_pkcs11"
      slot: 1
      userPin: ""
    version: "2.0.9"
"""
    provider = ["services", "aws.greengrass.crypto.Pkcs11Provider", "configuration"]
    root = write_root(
        tmp_path,
        effective,
        [
            tlog_line(1, [*provider, "userPin"], "changed", "0000"),
            tlog_line(2, [*provider, "UserPin"], "changed", "1234"),
            tlog_line(3, [*provider, "slot"], "changed", 7),  # effectiveConfig.yaml wins where it has a value
        ],
    )
    credentials = resolve_nucleus_credentials(root)
    assert credentials.uses_pkcs11
    assert credentials.private_key == "pkcs11:object=greengrass_key;type=private"
    assert credentials.pkcs11_provider == {
        "library": "/usr/lib/softhsm/libsofthsm2.so",
        "name": "softhsm_pkcs11",
        "slot": 1,
        "userPin": "1234",
    }


def test_key_store_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import certrotator.device.keystores.pkcs11.from_settings as pkcs11_module

    calls: list[tuple[Any, ...]] = []
    sentinel = object()

    def fake_store(
        provider: dict[str, Any], cert_uri: str, key_uri: str, cert_file: Path, journal: Path
    ) -> Any:
        calls.append((provider, cert_uri, key_uri, cert_file, journal))
        return sentinel

    monkeypatch.setattr(pkcs11_module, "store_from_greengrass", fake_store, raising=False)
    ipc = standin(other_components={PKCS11_PROVIDER: {"library": "/lib/p11.so", "slot": 0, "userPin": "42"}})
    work = tmp_path / "work"
    files = NucleusCredentials("/gg/thingCert.crt", "/gg/privKey.key", "/gg/rootCA.pem")
    store = gg.key_store(files, work, ipc)
    assert isinstance(store, FileKeyStore)
    assert (store.cert, store.key, store.journal.path) == (
        Path("/gg/thingCert.crt"),
        Path("/gg/privKey.key"),
        work / gg.JOURNAL_FILE,
    )
    # Key in the token, provider configuration not in the nucleus files: asked over IPC.
    token = NucleusCredentials("pkcs11:object=c;type=cert", "pkcs11:object=k;type=private", "/gg/rootCA.pem")
    assert gg.key_store(token, work, ipc) is sentinel
    assert calls[-1] == (
        {"library": "/lib/p11.so", "slot": 0, "userPin": "42"},
        "pkcs11:object=c;type=cert",
        "pkcs11:object=k;type=private",
        work / gg.TOKEN_CERTIFICATE_FILE,
        work / gg.JOURNAL_FILE,
    )
    # Key in the token, certificate a file: that file is the certificate file.
    mixed = NucleusCredentials(
        "/gg/thingCert.crt", "pkcs11:object=k;type=private", "/gg/rootCA.pem", {"library": "/l.so"}
    )
    gg.key_store(mixed, work, ipc)
    assert calls[-1][0] == {"library": "/l.so"} and calls[-1][3] == Path("/gg/thingCert.crt")
    with pytest.raises(ConfigError, match="not supported"):
        gg.key_store(NucleusCredentials("pkcs11:object=c;type=cert", "/gg/privKey.key", "/r"), work, ipc)
    ipc.close()


# ----------------------------------------------------------------------------------------- transport


def test_transport_qos_subscriptions_and_messages() -> None:
    assert (transport_module.QOS_AT_MOST_ONCE, transport_module.QOS_AT_LEAST_ONCE) == (
        model.QOS.AT_MOST_ONCE,
        model.QOS.AT_LEAST_ONCE,
    )
    ipc = standin()
    transport = GreengrassTransport(ipc, THING)
    ready: queue.Queue[str | None] = queue.Queue()
    messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
    resumed: queue.Queue[str | None] = queue.Queue()
    transport.start(lambda t, p: messages.put((t, p)), ready.put, resumed.put)
    assert ready.get(timeout=WAIT) is None
    assert ipc.subscribe_qos == [(f, "1") for f in Topics.device_subscriptions(THING)]

    transport.publish(Topics.next_get(THING), b"{}")
    assert transport.flush(WAIT)
    assert [(p.topic, p.payload, p.qos) for p in ipc.published] == [(Topics.next_get(THING), b"{}", "0")]

    accepted = Topics.accepted(Topics.next_get(THING))
    ipc.inject(accepted, b'{"timestamp":1}')
    assert messages.get(timeout=WAIT) == (accepted, b'{"timestamp":1}')

    transport.stop()
    assert ipc.live_subscriptions == []
    transport.publish(Topics.next_get(THING), b"{}")  # a stopped transport publishes nothing
    assert len(ipc.published) == 1
    ipc.close()
    # The nucleus tells components nothing of its reconnects: the periodic resync stands in (runtime).
    assert resumed.empty()


def test_transport_reports_a_failed_subscribe() -> None:
    ipc = standin()
    failing = Topics.device_subscriptions(THING)[2]
    ipc.subscribe_failures[failing] = model.ServiceError(message="MQTT connection is offline")
    ready: queue.Queue[str | None] = queue.Queue()
    GreengrassTransport(ipc, THING).start(lambda t, p: None, ready.put, lambda e: None)
    reason = ready.get(timeout=WAIT)
    assert reason is not None and failing in reason and "offline" in reason
    ipc.close()

    # An IPC connection that is gone fails every subscribe synchronously: still one on_ready.
    GreengrassTransport(ipc, THING).start(lambda t, p: None, ready.put, lambda e: None)
    reason = ready.get(timeout=WAIT)
    assert reason is not None and reason.count("IPC connection closed") == 4
    assert ready.empty()


def test_recipe_access_control_refuses_other_topics() -> None:
    ipc = standin()
    ready: queue.Queue[str | None] = queue.Queue()
    GreengrassTransport(ipc, THING, subscriptions=[f"$aws/things/{THING}/shadow/#"]).start(
        lambda t, p: None, ready.put, lambda e: None
    )
    reason = ready.get(timeout=WAIT)
    assert reason is not None and "UnauthorizedError" in reason
    transport = GreengrassTransport(ipc, THING)
    transport.publish(f"$aws/things/{THING}/jobs/j1/get", b"{}")  # only $next/get is granted
    transport.publish("awslabs/things/other-thing/certificate/create", b"{}")
    assert transport.flush(WAIT)
    assert ipc.published == []
    assert len(ipc.refused) == 3
    ipc.close()


# ------------------------------------------------------------------------------- restart decisions


def test_only_credential_changes_restart_greengrass(tmp_path: Path) -> None:
    """A failed subscribe without a rotation in flight resubscribes (with back-off); it must not restart
    the whole Greengrass service."""
    root = write_root(tmp_path / "gg", EFFECTIVE_CONFIG)
    ipc = standin({**recipe_configuration(), "stateTimeoutSeconds": 5})
    ipc.subscribe_failures[Topics.device_subscriptions(THING)[0]] = model.ServiceError(message="offline")
    restarts: list[m.Restart] = []
    events: queue.Queue[m.Event] = queue.Queue()

    def exit_for_restart(action: m.Restart) -> bool:
        restarts.append(action)
        return True

    reactor = Reactor().start()
    try:
        component = gg.GreengrassAgent(
            ipc,
            THING,
            root,
            tmp_path / "work",
            reactor,
            exit_for_restart,
            observer=lambda _s, e, _a: events.put(e),
        )
        component.start()
        event = events.get(timeout=WAIT)
        assert isinstance(event, m.ConnectFailed) and "offline" in event.reason
        assert restarts == []  # handled by the agent: a new transport after the back-off
        assert component._restart("rolled back: x") is False  # the last Restart seen had back-off

        component._observe(component.agent.state, m.Started(True), [m.Restart("new credentials installed")])
        assert component._restart("new credentials installed") is True
        assert [r.reason for r in restarts] == ["new credentials installed"]
        component.agent.stop()
        component.close()
    finally:
        reactor.stop()
        ipc.close()


def self_signed() -> tuple[bytes, bytes]:
    """A certificate and its key (PEM), as a device keeps them."""
    key = crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P256)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, THING)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return crypto.certificate_pem(certificate).encode(), crypto.private_key_pem(key)


def drive(ipc: GreengrassIpcStandIn, then: Callable[[], None]) -> tuple[threading.Thread, threading.Event]:
    """While `gg.run` blocks the main thread: once the agent has asked `$next/get`, do `then`. Should
    run() not return by itself afterwards (or the agent never ask), SIGTERM ends it so the test fails
    on its assertions instead of hanging."""
    asked = threading.Event()

    def work() -> None:
        if ipc.wait_for(lambda: any(p.topic == Topics.next_get(THING) for p in ipc.published)):
            asked.set()
            then()
        if not ipc.wait_for(lambda: ipc.closed):
            signal.raise_signal(signal.SIGTERM)

    helper = threading.Thread(target=work)
    helper.start()
    return helper, asked


def test_run_exits_for_a_greengrass_restart_after_rolling_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New credentials on trial, and `$next/get` is rejected (throttling, seed #68): the old pair is
    restored and the process exits with the code the recipe turns into a Greengrass restart."""
    root = write_root(tmp_path / "gg", None)  # no effectiveConfig.yaml or tlog: the installer's defaults
    old_cert, old_key = self_signed()
    new_cert, new_key = self_signed()
    (root / "thingCert.crt").write_bytes(new_cert)
    (root / "privKey.key").write_bytes(new_key)
    (root / "thingCert.crt.bak").write_bytes(old_cert)
    (root / "privKey.key.bak").write_bytes(old_key)
    ipc = standin()
    monkeypatch.setenv("AWS_IOT_THING_NAME", THING)
    sigterm_before = signal.getsignal(signal.SIGTERM)

    def reject_get() -> None:
        ipc.inject(
            Topics.rejected(Topics.next_get(THING)), b'{"code":"Throttling","message":"Rate exceeded"}'
        )

    helper, asked = drive(ipc, reject_get)
    code = gg.run(root, tmp_path / "work", client_factory=lambda: ipc)
    helper.join(WAIT)
    assert asked.is_set(), "the agent never asked for its job"

    assert code == gg.RESTART_EXIT_CODE
    assert (root / "thingCert.crt").read_bytes() == old_cert
    assert (root / "privKey.key").read_bytes() == old_key
    assert not (root / "thingCert.crt.bak").exists() and not (root / "privKey.key.bak").exists()
    assert ipc.closed
    assert signal.getsignal(signal.SIGTERM) is sigterm_before


def test_run_stops_cleanly_on_sigterm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_root(tmp_path / "gg", None)
    cert, key = self_signed()
    (root / "thingCert.crt").write_bytes(cert)
    (root / "privKey.key").write_bytes(key)
    ipc = standin()
    monkeypatch.setenv("AWS_IOT_THING_NAME", THING)

    helper, asked = drive(ipc, lambda: signal.raise_signal(signal.SIGTERM))  # how the nucleus stops us
    code = gg.run(root, tmp_path / "work", client_factory=lambda: ipc)
    helper.join(WAIT)
    assert asked.is_set(), "the agent never asked for its job"
    assert code == 0
    assert ipc.closed
    assert (root / "thingCert.crt").read_bytes() == cert


# ----------------------------------------------------------------------------------------------- CLI


def cli_runner_app() -> Any:
    import typer

    app = typer.Typer()
    app.command("agent")(agent_command)
    return app


def test_cli_rejects_invalid_greengrass_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_root(tmp_path / "gg", EFFECTIVE_CONFIG)
    ipc = standin({**recipe_configuration(), "signingAlgorithm": "ECDSA-WITH-SHA256"})
    monkeypatch.setattr(gg, "connect_ipc", lambda: ipc)
    monkeypatch.setenv("AWS_IOT_THING_NAME", THING)
    result = CliRunner().invoke(
        cli_runner_app(), ["--greengrass", "--root", str(root), "--work", str(tmp_path / "work")]
    )
    assert result.exit_code == 2, result.output
    assert (
        "invalid configuration" in result.output and "does not match key algorithm RSA-2048" in result.output
    )
    assert ipc.closed


def test_cli_argument_and_standalone_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = cli_runner_app()
    runner = CliRunner()
    assert runner.invoke(app, []).exit_code == 2
    assert runner.invoke(app, ["--greengrass"]).exit_code == 2
    both = runner.invoke(app, ["--greengrass", "--root", str(tmp_path), "--config", "x.toml"])
    assert both.exit_code == 2 and "exactly one" in both.output
    monkeypatch.delenv("AWS_IOT_THING_NAME", raising=False)
    outside = runner.invoke(app, ["--greengrass", "--root", str(tmp_path)])
    assert outside.exit_code == 2 and "AWS_IOT_THING_NAME" in outside.output
    bad = tmp_path / "device.toml"
    bad.write_text(
        'thing_name = "t"\nendpoint = "h"\nroot_ca = "ca.pem"\n[credentials]\ncertificate = "c"\n'
        'private_key = "k"\n[rotation]\nkey_algorithm = "ECDSA-P256"\nsigning_algorithm = "SHA256WITHRSA"\n'
    )
    standalone = runner.invoke(app, ["--config", str(bad)])
    assert standalone.exit_code == 2 and "does not match" in standalone.output


# -------------------------------------------------------------------------------------- end to end


def test_greengrass_agent_rotates_against_the_local_iot_core(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        (device,) = fleet.provision(1, group="gg")
        assert device.config.private_key is not None
        # A fleet-provisioned core: the credential paths are only in config.tlog.
        root = write_root(
            tmp_path / "greengrass",
            FLEET_PROVISIONED_EFFECTIVE_CONFIG.replace(
                "/greengrass/v2/AmazonRootCA1.pem", str(device.config.root_ca)
            ),
            fleet_provisioned_tlog(str(device.config.certificate), str(device.config.private_key)),
        )
        ipc = GreengrassIpcStandIn(
            thing=device.thing,
            component_name=COMPONENT,
            configuration={**recipe_configuration(), "stateTimeoutSeconds": 10},
            endpoint="127.0.0.1",
            port=fleet.engine.port,
            root_ca=device.config.root_ca,
            certificate=device.config.certificate,
            private_key=device.config.private_key,
        )
        restarts: list[str] = []

        def restart_nucleus(action: m.Restart) -> bool:
            # Instead of exiting for a Greengrass service restart: the stand-in nucleus reconnects with
            # the credentials now on disk, and the agent resubscribes through it.
            restarts.append(action.reason)
            ipc.restart_nucleus()
            return False

        subscribed = threading.Event()
        component = gg.GreengrassAgent(
            ipc,
            device.thing,
            root,
            tmp_path / "work",
            fleet.reactors[0],
            restart_nucleus,
            observer=lambda _s, e, _a: subscribed.set() if isinstance(e, m.Started) else None,
        )
        try:
            component.start()
            assert subscribed.wait(WAIT)

            report = fleet.run_job("rotate-gg", group="gg", timeout_s=60, unlimited_rollout=True)
            fleet.verify(report)  # matching pair, new cert only in the registry and on the connection

            assert report.statuses == {device.thing: "SUCCEEDED"}
            assert report.problems == []
            assert restarts == ["new credentials installed"]
            assert ipc.nucleus_restarts == 1
            # The recipe's default keyAlgorithm replaced the provisioned P-256 key.
            assert crypto.key_algorithm_of(device.key().public_key()) is crypto.KeyAlgorithm.RSA_2048
            assert not device.config.certificate.with_name(device.config.certificate.name + ".bak").exists()
            assert not (tmp_path / "work" / gg.JOURNAL_FILE).exists()
            # QoS as the seed: publish 0, subscribe 1; and the recipe granted everything used.
            assert {p.qos for p in ipc.published} == {"0"}
            assert {qos for _f, qos in ipc.subscribe_qos} == {"1"}
            assert ipc.refused == []
        finally:
            component.agent.stop()
            component.close()
            ipc.close()
