"""The boto3 adapters against moto (where faithful) and botocore's Stubber (where moto is not)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from botocore.stub import ANY, Stubber
from moto.iotdata.models import iotdata_backends
from moto.sns.models import sns_backends

from certrotator import crypto
from certrotator.backend.aws.adapters import (
    IotDataPublisher,
    IotIssuer,
    IotJobsData,
    IotRegistry,
    PrivateCaIssuer,
    SecretStateKey,
    ShadowStateStore,
    SnsNotifier,
    certificate_arn,
    state_mac,
)
from certrotator.backend.aws.clients import Clients, get_clients, use_clients
from certrotator.backend.ports import (
    CertificateStatus,
    Notification,
    PermanentFailure,
    RotationState,
    ThingNotFound,
)
from certrotator.protocol import JobExecutionStatus, RotationProgress

from .support import (
    ACCOUNT,
    REGION,
    ROTATION_DOCUMENT,
    TestCa,
    calls,
    execution_response,
    provision,
)


def registry(clients: Clients, sleeps: list[float] | None = None) -> IotRegistry:
    recorded = sleeps if sleeps is not None else []
    return IotRegistry(clients, account=ACCOUNT, sleep=recorded.append)




# -------------------------------------------------------------------------------------------- clients


def test_every_client_retries_throttling_adaptively(clients: Clients) -> None:
    # Only the clients are checked: botocore rewrites a Config's retries dict in place when the first
    # client is made from it (max_attempts -> total_max_attempts), so CLIENT_CONFIG itself reads
    # differently depending on which test made a client first.
    every = (
        clients.iot,
        clients.iot_data,
        clients.iot_jobs_data,
        clients.acm_pca,
        clients.sns,
        clients.secretsmanager,
    )
    for client in every:
        # botocore counts the first attempt too: 10 retries = 11 attempts
        retries = client.meta.config.retries  # type: ignore[attr-defined]
        assert retries == {"mode": "adaptive", "total_max_attempts": 11}


def test_clients_are_created_once_per_container(clients: Clients) -> None:
    assert get_clients(REGION) is clients
    assert clients.iot is clients.iot
    assert clients.iot_data is clients.iot_data
    assert clients.secretsmanager is clients.secretsmanager
    assert get_clients("eu-west-1") is not clients
    assert get_clients("eu-west-1").iot.meta.region_name == "eu-west-1"
    mine = Clients(REGION)
    use_clients(mine)
    assert get_clients(REGION) is mine


def test_data_plane_endpoints_are_looked_up_once(clients: Clients, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOT_DATA_ENDPOINT")
    monkeypatch.delenv("IOT_JOBS_ENDPOINT")
    lookups = calls(clients.iot, "iot.DescribeEndpoint")
    data, jobs = clients.iot_data, clients.iot_jobs_data
    assert clients.iot_data is data and clients.iot_jobs_data is jobs
    assert [c["endpointType"] for c in lookups] == ["iot:Data-ATS", "iot:Jobs"]
    assert data.meta.endpoint_url.startswith("https://")
    assert data.meta.endpoint_url.endswith(f"-ats.iot.{REGION}.amazonaws.com")
    assert jobs.meta.endpoint_url.endswith(f".jobs.iot.{REGION}.amazonaws.com")


def test_endpoint_override_skips_the_lookup(clients: Clients, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOT_DATA_ENDPOINT", "abc-ats.iot.us-east-1.amazonaws.com")
    monkeypatch.setenv("IOT_JOBS_ENDPOINT", "https://jobs.example.com")
    lookups = calls(clients.iot, "iot.DescribeEndpoint")
    assert clients.iot_data.meta.endpoint_url == "https://abc-ats.iot.us-east-1.amazonaws.com"
    assert clients.iot_jobs_data.meta.endpoint_url == "https://jobs.example.com"
    assert lookups == []


# ------------------------------------------------------------------------------------------- registry


def test_certificate_arn_is_built_from_partition_region_and_account(clients: Clients) -> None:
    assert certificate_arn("aws-cn", "cn-north-1", "111122223333", "ab" * 32) == (
        f"arn:aws-cn:iot:cn-north-1:111122223333:cert/{'ab' * 32}"
    )
    reg = IotRegistry(clients, account="111122223333", partition="aws-us-gov")
    assert reg.certificate_arn("cd" * 32) == f"arn:aws-us-gov:iot:{REGION}:111122223333:cert/{'cd' * 32}"


def test_exclusive_principals_are_certificate_ids(clients: Clients) -> None:
    device = provision(clients, "dev1")
    listing = calls(clients.iot, "iot.ListThingPrincipalsV2")
    assert registry(clients).exclusive_principals("dev1") == [device.certificate_id]
    assert listing == [{"thingName": "dev1", "thingPrincipalType": "EXCLUSIVE_THING"}]


def test_exclusive_principals_of_missing_thing_raise_thing_not_found(clients: Clients) -> None:
    with pytest.raises(ThingNotFound):
        registry(clients).exclusive_principals("nobody")


def test_exclusive_principals_paginate_and_skip_other_principals(clients: Clients) -> None:
    a, b, c = "aa" * 32, "bb" * 32, "cc" * 32
    arn = f"arn:aws:iot:{REGION}:{ACCOUNT}:cert/"
    with Stubber(clients.iot) as stub:
        stub.add_response(
            "list_thing_principals_v2",
            {
                "thingPrincipalObjects": [
                    {"principal": arn + a, "thingPrincipalType": "EXCLUSIVE_THING"},
                    {"principal": arn + b, "thingPrincipalType": "NON_EXCLUSIVE_THING"},
                    {"principal": "us-east-1:1234-cognito-identity", "thingPrincipalType": "EXCLUSIVE_THING"},
                ],
                "nextToken": "page2",
            },
            {"thingName": "dev1", "thingPrincipalType": "EXCLUSIVE_THING"},
        )
        stub.add_response(
            "list_thing_principals_v2",
            {
                "thingPrincipalObjects": [
                    {"principal": arn + c.upper(), "thingPrincipalType": "EXCLUSIVE_THING"}
                ]
            },
            {"thingName": "dev1", "thingPrincipalType": "EXCLUSIVE_THING", "nextToken": "page2"},
        )
        assert registry(clients).exclusive_principals("dev1") == [a, c]
        stub.assert_no_pending_responses()


def test_describe_certificate(clients: Clients) -> None:
    device = provision(clients, "dev1")
    record = registry(clients).describe_certificate(device.certificate_id)
    assert record is not None
    assert record.certificate_id == device.certificate_id
    assert record.status is CertificateStatus.ACTIVE
    assert crypto.certificate_id(record.pem) == device.certificate_id
    assert registry(clients).describe_certificate("ef" * 32) is None


def test_policies_are_listed_and_attached_by_certificate_id(clients: Clients, test_ca: TestCa) -> None:
    device = provision(clients, "dev1", policy="P1")
    clients.iot.create_policy(policyName="P2", policyDocument='{"Version":"2012-10-17","Statement":[]}')
    clients.iot.attach_policy(
        policyName="P2", target=registry(clients).certificate_arn(device.certificate_id)
    )
    new = clients.iot.register_certificate_without_ca(
        certificatePem=test_ca.sign(device.new_csr()[1]), status="ACTIVE"
    )
    reg = registry(clients)
    policies = reg.certificate_policies(device.certificate_id)
    assert sorted(policies) == ["P1", "P2"]
    for policy in policies:
        reg.attach_policy(policy, new["certificateId"])
    assert sorted(reg.certificate_policies(new["certificateId"])) == ["P1", "P2"]
    assert reg.certificate_policies("ef" * 32) == []


def test_attach_exclusive_asks_for_an_exclusive_attachment(clients: Clients, test_ca: TestCa) -> None:
    device = provision(clients, "dev1")
    new = clients.iot.register_certificate_without_ca(
        certificatePem=test_ca.sign(device.new_csr()[1]), status="ACTIVE"
    )
    attached = calls(clients.iot, "iot.AttachThingPrincipal")
    registry(clients).attach_exclusive("dev1", new["certificateId"])
    assert attached == [
        {"thingName": "dev1", "principal": new["certificateArn"], "thingPrincipalType": "EXCLUSIVE_THING"}
    ]
    assert sorted(registry(clients).exclusive_principals("dev1")) == sorted(
        [device.certificate_id, new["certificateId"]]
    )


def test_delete_certificate_removes_an_attached_certificate_with_policies(clients: Clients) -> None:
    device = provision(clients, "dev1")
    reg = registry(clients)
    deletes = calls(clients.iot, "iot.DeleteCertificate")
    reg.delete_certificate("dev1", device.certificate_id)
    assert reg.describe_certificate(device.certificate_id) is None
    assert reg.exclusive_principals("dev1") == []
    # the policy was never detached explicitly: forceDelete took the attachment with it
    assert deletes == [{"certificateId": device.certificate_id, "forceDelete": True}]


def test_delete_certificate_is_idempotent(clients: Clients) -> None:
    device = provision(clients, "dev1")
    reg = registry(clients)
    reg.delete_certificate("dev1", device.certificate_id)
    reg.delete_certificate("dev1", device.certificate_id)  # already gone
    reg.delete_certificate("dev1", "ef" * 32)  # never existed
    assert reg.describe_certificate(device.certificate_id) is None


def test_delete_certificate_already_detached_from_its_thing(clients: Clients) -> None:
    device = provision(clients, "dev1")
    reg = registry(clients)
    arn = reg.certificate_arn(device.certificate_id)
    clients.iot.update_certificate(certificateId=device.certificate_id, newStatus="INACTIVE")
    clients.iot.detach_thing_principal(thingName="dev1", principal=arn)
    reg.delete_certificate("dev1", device.certificate_id)
    assert reg.describe_certificate(device.certificate_id) is None


@pytest.fixture
def iot_stub(clients: Clients) -> Iterator[Stubber]:
    with Stubber(clients.iot) as stub:
        yield stub


def _stub_inactive_and_detach(stub: Stubber, cert_id: str) -> None:
    stub.add_response("update_certificate", {}, {"certificateId": cert_id, "newStatus": "INACTIVE"})
    stub.add_response(
        "detach_thing_principal",
        {},
        {"thingName": "dev1", "principal": f"arn:aws:iot:{REGION}:{ACCOUNT}:cert/{cert_id}"},
    )


def test_delete_certificate_retries_while_the_detach_propagates(clients: Clients, iot_stub: Stubber) -> None:
    cert_id = "ab" * 32
    _stub_inactive_and_detach(iot_stub, cert_id)
    expected = {"certificateId": cert_id, "forceDelete": True}
    iot_stub.add_client_error("delete_certificate", "DeleteConflictException", expected_params=expected)
    iot_stub.add_client_error("delete_certificate", "DeleteConflictException", expected_params=expected)
    iot_stub.add_response("delete_certificate", {}, expected)
    sleeps: list[float] = []
    registry(clients, sleeps).delete_certificate("dev1", cert_id)
    iot_stub.assert_no_pending_responses()
    assert sleeps == [0.5, 1.0]


def test_delete_certificate_gives_up_after_bounded_retries(clients: Clients, iot_stub: Stubber) -> None:
    cert_id = "ab" * 32
    _stub_inactive_and_detach(iot_stub, cert_id)
    for _ in range(3):
        iot_stub.add_client_error("delete_certificate", "DeleteConflictException")
    sleeps: list[float] = []
    reg = IotRegistry(clients, account=ACCOUNT, delete_retry_delays=(0.1, 0.2), sleep=sleeps.append)
    # Still attached after the retries (e.g. to another thing as well): waiting longer will not help.
    with pytest.raises(PermanentFailure, match="DeleteConflictException") as raised:
        reg.delete_certificate("dev1", cert_id)
    assert isinstance(raised.value.__cause__, ClientError)
    iot_stub.assert_no_pending_responses()
    assert sleeps == [0.1, 0.2]


def test_delete_certificate_deletes_a_revoked_certificate(clients: Clients, iot_stub: Stubber) -> None:
    cert_id = "ab" * 32
    iot_stub.add_client_error("update_certificate", "CertificateStateException", http_status_code=406)
    iot_stub.add_client_error("detach_thing_principal", "ResourceNotFoundException", http_status_code=404)
    iot_stub.add_response("delete_certificate", {}, {"certificateId": cert_id, "forceDelete": True})
    registry(clients).delete_certificate("dev1", cert_id)
    iot_stub.assert_no_pending_responses()


def test_delete_certificate_does_not_hide_other_errors(clients: Clients, iot_stub: Stubber) -> None:
    iot_stub.add_client_error("update_certificate", "UnauthorizedException", http_status_code=401)
    with pytest.raises(PermanentFailure, match="UnauthorizedException"):
        registry(clients).delete_certificate("dev1", "ab" * 32)


@pytest.mark.parametrize(
    ("operation", "code", "status"),
    [
        ("update_certificate", "ThrottlingException", 400),
        ("detach_thing_principal", "ServiceUnavailableException", 503),
        ("delete_certificate", "InternalFailureException", 500),
        ("delete_certificate", "TooManyRequestsException", 429),
    ],
)
def test_delete_certificate_lets_transient_errors_through_for_a_retry(
    clients: Clients, iot_stub: Stubber, operation: str, code: str, status: int
) -> None:
    """Not a PermanentFailure: the terminal handler lets it propagate and Lambda runs the event again."""
    cert_id = "ab" * 32
    steps = ["update_certificate", "detach_thing_principal", "delete_certificate"]
    for step in steps[: steps.index(operation)]:
        iot_stub.add_response(step, {})
    iot_stub.add_client_error(operation, code, http_status_code=status)
    with pytest.raises(ClientError, match=code) as raised:
        registry(clients).delete_certificate("dev1", cert_id)
    assert not isinstance(raised.value, PermanentFailure)
    iot_stub.assert_no_pending_responses()


# -------------------------------------------------------------------------------------------- issuers


def test_iot_issuer_creates_an_active_certificate_from_the_csr(clients: Clients, iot_stub: Stubber) -> None:
    iot_stub.add_response(
        "create_certificate_from_csr",
        {"certificateArn": "arn", "certificateId": "ab" * 32, "certificatePem": "PEM"},
        {"certificateSigningRequest": "CSR", "setAsActive": True},
    )
    issued = IotIssuer(clients).issue("dev1", "CSR")
    assert (issued.certificate_id, issued.pem) == ("ab" * 32, "PEM")


def test_iot_issuer_against_moto_registers_the_certificate(clients: Clients) -> None:
    device = provision(clients, "dev1")
    issued = IotIssuer(clients).issue("dev1", device.new_csr()[1])
    record = registry(clients).describe_certificate(issued.certificate_id)
    assert record is not None and record.status is CertificateStatus.ACTIVE
    assert crypto.certificate_id(issued.pem) == issued.certificate_id


def pca_issuer(clients: Clients, ca_arn: str, sleeps: list[float] | None = None) -> PrivateCaIssuer:
    return PrivateCaIssuer(
        clients,
        ca_arn=ca_arn,
        signing_algorithm=crypto.CaSigningAlgorithm.SHA256WITHECDSA,
        validity_days=7,
        sleep=(sleeps if sleeps is not None else []).append,
    )


def test_private_ca_issuer_signs_the_csr_key_and_registers_it(clients: Clients, private_ca: str) -> None:
    device = provision(clients, "dev1")
    key, csr = device.new_csr()
    issue_calls = calls(clients.acm_pca, "acm-pca.IssueCertificate")
    issued = pca_issuer(clients, private_ca).issue("dev1", csr)
    assert crypto.certificate_matches_key(issued.pem, key)
    assert issued.certificate_id == crypto.certificate_id(issued.pem)
    assert issued.pem.count("BEGIN CERTIFICATE") == 1  # the leaf only
    record = registry(clients).describe_certificate(issued.certificate_id)
    assert record is not None and record.status is CertificateStatus.ACTIVE
    (params,) = issue_calls
    assert params["SigningAlgorithm"] == "SHA256WITHECDSA"
    assert params["Validity"] == {"Value": 7, "Type": "DAYS"}
    assert 1 <= len(params["IdempotencyToken"]) <= 36
    # the same request from the same thing carries the same token, a different one another token
    pca_issuer(clients, private_ca).issue("dev1", csr)
    pca_issuer(clients, private_ca).issue("dev2", csr)
    tokens = [c["IdempotencyToken"] for c in issue_calls]
    assert tokens[0] == tokens[1] != tokens[2]


def test_private_ca_issuer_polls_until_issued(clients: Clients, test_ca: TestCa) -> None:
    device = provision(clients, "dev1")
    csr = device.new_csr()[1]
    pem = test_ca.sign(csr)
    ca_arn = f"arn:aws:acm-pca:{REGION}:{ACCOUNT}:certificate-authority/11111111-2222-3333-4444-555555555555"
    cert_arn = f"{ca_arn}/certificate/abc"
    sleeps: list[float] = []
    with Stubber(clients.acm_pca) as pca:
        pca.add_response(
            "issue_certificate",
            {"CertificateArn": cert_arn},
            {
                "CertificateAuthorityArn": ca_arn,
                "Csr": csr.encode(),
                "SigningAlgorithm": "SHA256WITHECDSA",
                "Validity": {"Value": 7, "Type": "DAYS"},
                "IdempotencyToken": ANY,
            },
        )
        pca.add_client_error("get_certificate", "RequestInProgressException")
        pca.add_response(
            "get_certificate",
            {"Certificate": pem, "CertificateChain": "CHAIN"},
            {"CertificateAuthorityArn": ca_arn, "CertificateArn": cert_arn},
        )
        issued = pca_issuer(clients, ca_arn, sleeps).issue("dev1", csr)
        pca.assert_no_pending_responses()
    assert sleeps == [1.0]
    assert issued.pem == pem and issued.certificate_id == crypto.certificate_id(pem)


def test_private_ca_issuer_accepts_a_certificate_registered_by_an_earlier_attempt(
    clients: Clients, test_ca: TestCa
) -> None:
    device = provision(clients, "dev1")
    csr = device.new_csr()[1]
    pem = test_ca.sign(csr)
    clients.iot.register_certificate_without_ca(certificatePem=pem, status="ACTIVE")
    ca_arn = f"arn:aws:acm-pca:{REGION}:{ACCOUNT}:certificate-authority/11111111-2222-3333-4444-555555555555"
    with Stubber(clients.acm_pca) as pca:
        pca.add_response("issue_certificate", {"CertificateArn": f"{ca_arn}/certificate/abc"})
        pca.add_response("get_certificate", {"Certificate": pem})
        issued = pca_issuer(clients, ca_arn).issue("dev1", csr)
    assert issued.certificate_id == crypto.certificate_id(pem)


def test_private_ca_issuer_rejects_non_positive_validity(clients: Clients) -> None:
    with pytest.raises(ValueError, match="validity_days"):
        PrivateCaIssuer(
            clients, ca_arn="arn", signing_algorithm=crypto.CaSigningAlgorithm.SHA256WITHRSA, validity_days=0
        )


# ------------------------------------------------------------------------------------------ jobs data


def test_describe_execution_parses_the_job_document(clients: Clients, jobs_stub: Stubber) -> None:
    jobs_stub.add_response(
        "describe_job_execution",
        execution_response("dev1", "job1", document=ROTATION_DOCUMENT),
        {"jobId": "job1", "thingName": "dev1", "includeJobDocument": True},
    )
    execution = IotJobsData(clients).describe_execution("dev1", "job1")
    assert execution is not None
    assert (execution.thing, execution.job_id) == ("dev1", "job1")
    assert execution.status is JobExecutionStatus.IN_PROGRESS
    assert execution.document == {"operation": "ROTATE_CERTIFICATE"}


@pytest.mark.parametrize("document", ["not json", "[1, 2]", '"text"'])
def test_a_document_that_is_no_json_object_is_none(
    clients: Clients, jobs_stub: Stubber, document: str
) -> None:
    jobs_stub.add_response("describe_job_execution", execution_response("dev1", "job1", "QUEUED", document))
    execution = IotJobsData(clients).describe_execution("dev1", "job1")
    assert execution is not None and execution.document is None
    assert execution.status is JobExecutionStatus.QUEUED


def test_describe_missing_execution_is_none(clients: Clients, jobs_stub: Stubber) -> None:
    jobs_stub.add_client_error("describe_job_execution", "ResourceNotFoundException", http_status_code=404)
    assert IotJobsData(clients).describe_execution("dev1", "job1") is None


def test_describe_execution_does_not_hide_throttling(clients: Clients, jobs_stub: Stubber) -> None:
    jobs_stub.add_client_error("describe_job_execution", "AccessDeniedException", http_status_code=403)
    with pytest.raises(ClientError, match="AccessDeniedException"):
        IotJobsData(clients).describe_execution("dev1", "job1")


# ------------------------------------------------------------------------------------ rotation state


STATE = RotationState("job1", "aa" * 32, "bb" * 32, RotationProgress.CREATED)
KEY = bytes(range(32))
SHADOW = "AWSLabsCertificateRotator"


def state_store(clients: Clients, shadow_name: str = SHADOW, key: bytes = KEY) -> ShadowStateStore:
    return ShadowStateStore(clients, key=lambda: key, shadow_name=shadow_name)


def write_reported(clients: Clients, thing: str, reported: Any, shadow_name: str = SHADOW) -> None:
    """What a device can do: publish any state to its own shadow."""
    payload = json.dumps({"state": {"reported": reported}}).encode()
    clients.iot_data.update_thing_shadow(thingName=thing, shadowName=shadow_name, payload=payload)


def read_reported(clients: Clients, thing: str, shadow_name: str = SHADOW) -> dict[str, Any]:
    shadow = clients.iot_data.get_thing_shadow(thingName=thing, shadowName=shadow_name)
    reported: dict[str, Any] = json.loads(shadow["payload"].read())["state"]["reported"]
    return reported


def test_shadow_state_round_trip(clients: Clients) -> None:
    clients.iot.create_thing(thingName="dev1")
    store = state_store(clients, "RotatorState")
    assert store.load("dev1") is None
    store.save("dev1", STATE)
    assert store.load("dev1") == STATE
    committed = RotationState("job1", "aa" * 32, "bb" * 32, RotationProgress.COMMITTED)
    store.save("dev1", committed)
    assert store.load("dev1") == committed
    mac = state_mac(KEY, "dev1", committed.to_dict())
    assert read_reported(clients, "dev1", "RotatorState") == committed.to_dict() | {"mac": mac}
    store.clear("dev1")
    assert store.load("dev1") is None
    store.clear("dev1")  # idempotent
    store.save("dev1", STATE)  # a shadow can come back after deletion
    assert store.load("dev1") == STATE


def test_shadow_state_of_an_unknown_thing_is_none(clients: Clients) -> None:
    assert state_store(clients).load("nobody") is None


def test_shadow_without_rotation_state_is_none(clients: Clients, caplog: pytest.LogCaptureFixture) -> None:
    clients.iot.create_thing(thingName="dev1")
    clients.iot_data.update_thing_shadow(
        thingName="dev1", shadowName=SHADOW, payload=b'{"state":{"desired":{"x":1}}}'
    )
    assert state_store(clients).load("dev1") is None
    assert caplog.records == []  # no state is not a forged state


def test_the_mac_binds_the_thing_and_every_field() -> None:
    fields = STATE.to_dict()
    mac = state_mac(KEY, "dev1", fields)
    assert len(mac) == 64 and mac == state_mac(KEY, "dev1", dict(fields))
    variants = [state_mac(KEY, "dev2", fields), state_mac(bytes(32), "dev1", fields)]
    variants += [state_mac(KEY, "dev1", fields | {name: fields[name] + "x"}) for name in fields]
    # the encoding is unambiguous: moving text between the thing name and a field changes the MAC
    variants.append(state_mac(KEY, "dev1job1", fields | {"jobId": ""}))
    assert mac not in variants and len(set(variants)) == len(variants)


def test_a_short_key_is_refused(clients: Clients) -> None:
    clients.iot.create_thing(thingName="dev1")
    with pytest.raises(ValueError, match="at least 32"):
        state_store(clients, key=b"k" * 31).save("dev1", STATE)
    with pytest.raises(ValueError, match="at least 32"):
        state_mac(b"", "dev1", STATE.to_dict())


def _forgeries() -> dict[str, Any]:
    """Shadow contents a device could write, keyed by what is wrong with them."""
    victim_state = RotationState("job1", "cc" * 32, "dd" * 32, RotationProgress.COMMITTED).to_dict()
    return {
        "no MAC": victim_state,
        "wrong MAC": victim_state | {"mac": "00" * 32},
        "MAC under another key": victim_state | {"mac": state_mac(b"x" * 32, "dev1", victim_state)},
        "MAC with other case": victim_state | {"mac": state_mac(KEY, "dev1", victim_state).upper()},
        "non-ASCII MAC": victim_state | {"mac": "é" * 64},
        "MAC not a string": victim_state | {"mac": 12},
        "MAC of a state of another thing": victim_state | {"mac": state_mac(KEY, "dev2", victim_state)},
        "field not a string": victim_state
        | {"jobId": 1, "mac": state_mac(KEY, "dev1", victim_state | {"jobId": "1"})},
        "field missing": {"jobId": "job1", "progress": "committed", "mac": "00" * 32},
        "malformed without a MAC": {"jobId": "job1", "progress": "half-done"},
    }


@pytest.mark.parametrize("forgery", sorted(_forgeries()))
def test_a_forged_state_is_ignored_with_a_warning(
    clients: Clients, caplog: pytest.LogCaptureFixture, forgery: str
) -> None:
    clients.iot.create_thing(thingName="dev1")
    write_reported(clients, "dev1", _forgeries()[forgery])
    with caplog.at_level(logging.WARNING, logger="certrotator"):
        assert state_store(clients).load("dev1") is None
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "'dev1'" in record.getMessage() and "tampered" in record.getMessage()
    assert record.__dict__["thing"] == "dev1"


def test_a_state_moved_from_another_thing_is_ignored(clients: Clients) -> None:
    """A device that can read another thing's shadow still cannot make that state its own."""
    for thing in ("dev1", "dev2"):
        clients.iot.create_thing(thingName=thing)
    store = state_store(clients)
    store.save("dev2", STATE)
    write_reported(clients, "dev1", read_reported(clients, "dev2"))
    assert store.load("dev2") == STATE
    assert store.load("dev1") is None


def test_a_forged_state_is_replaced_by_the_next_save(clients: Clients) -> None:
    clients.iot.create_thing(thingName="dev1")
    write_reported(clients, "dev1", _forgeries()["wrong MAC"])
    store = state_store(clients)
    store.save("dev1", STATE)
    assert store.load("dev1") == STATE


def test_an_authentic_but_unreadable_state_is_an_error(clients: Clients) -> None:
    """Written with the key (a newer backend, say) but not understood: stop rather than guess."""
    clients.iot.create_thing(thingName="dev1")
    fields = STATE.to_dict() | {"progress": "half-done"}
    write_reported(clients, "dev1", fields | {"mac": state_mac(KEY, "dev1", fields)})
    with pytest.raises(ValueError, match="no valid rotation state"):
        state_store(clients).load("dev1")


def test_clearing_and_missing_shadows_need_no_key(clients: Clients) -> None:
    clients.iot.create_thing(thingName="dev1")
    write_reported(clients, "dev1", _forgeries()["no MAC"])

    def no_key() -> bytes:
        raise AssertionError("the key was asked for")

    store = ShadowStateStore(clients, key=no_key)
    store.clear("dev1")  # removes a forged state as well as an authentic one
    assert store.load("dev1") is None
    assert state_store(clients).load("dev1") is None


# ------------------------------------------------------------------------------------------ state key


def secret(clients: Clients, name: str = "state-key", **value: Any) -> str:
    arn: str = clients.secretsmanager.create_secret(Name=name, **value)["ARN"]
    return arn


def test_the_state_key_is_the_secret_string_fetched_once(clients: Clients) -> None:
    arn = secret(clients, SecretString="ß" * 16)  # 16 characters, 32 UTF-8 bytes
    fetched = calls(clients.secretsmanager, "secretsmanager.GetSecretValue")
    key = SecretStateKey(clients, arn)
    assert key() == ("ß" * 16).encode()
    assert key() == SecretStateKey(clients, arn)()  # another user of the same clients: still cached
    assert fetched == [{"SecretId": arn}]


def test_the_state_key_can_be_a_secret_binary(clients: Clients) -> None:
    arn = secret(clients, SecretBinary=KEY)
    assert SecretStateKey(clients, arn)() == KEY


def test_a_short_secret_is_refused(clients: Clients) -> None:
    arn = secret(clients, SecretString="é" * 15 + "x")  # 16 characters, 31 UTF-8 bytes
    with pytest.raises(ValueError, match="31 bytes long; it must be at least 32"):
        SecretStateKey(clients, arn)()


def test_a_missing_secret_is_an_api_error(clients: Clients) -> None:
    arn = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:nothing-AbCdEf"
    with pytest.raises(ClientError, match="ResourceNotFoundException"):
        SecretStateKey(clients, arn)()


# ------------------------------------------------------------------------------ replies, notifications


def test_publisher_sends_compact_json_with_qos_1(clients: Clients) -> None:
    published = calls(clients.iot_data, "iot-data.Publish")
    topic = "awslabs/things/dev1/certificate/create/accepted"
    IotDataPublisher(clients).publish(topic, {"certificatePem": "P"})
    assert published[0]["qos"] == 1
    payloads = iotdata_backends[ACCOUNT][REGION].published_payloads
    assert payloads == [(topic, b'{"certificatePem":"P"}')]


def test_notifier_publishes_json_with_filterable_attributes(clients: Clients) -> None:
    topic = clients.sns.create_topic(Name="rotations")["TopicArn"]
    notification = Notification("dev1", "job1", "FAILED", "new certificate deleted", "fix it", {"k": "v"})
    SnsNotifier(clients, topic).notify(notification)
    ((_, message, subject, attributes, _),) = sns_backends[ACCOUNT][REGION].topics[topic].sent_notifications
    assert subject == "Certificate rotation FAILED for dev1"
    assert json.loads(message) == notification.to_dict()
    assert attributes == {
        "status": {"Type": "String", "Value": "FAILED"},
        "thingName": {"Type": "String", "Value": "dev1"},
    }


def test_notifier_subject_fits_the_sns_limit(clients: Clients) -> None:
    topic = clients.sns.create_topic(Name="rotations")["TopicArn"]
    SnsNotifier(clients, topic).notify(Notification("d" * 128, "job1", "TIMED_OUT", "o", "a"))
    ((_, _, subject, _, _),) = sns_backends[ACCOUNT][REGION].topics[topic].sent_notifications
    assert subject is not None and len(subject) == 100
