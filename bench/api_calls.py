"""AWS API calls per certificate rotation, through the three Lambda entry points.

Two full successful rotations of one thing (create -> commit -> terminal SUCCEEDED) against moto, with
a warm container for the second one: its calls are the steady-state cost of a rotation. The three
entry points share one container here; on AWS each function has its own, so the once-per-container
calls (DescribeEndpoint, the state key's GetSecretValue) happen once per function's cold start.

The device side is real: real keys, real CSRs with the current certificate's subject, the certificate
in use as the connection's principal, and the device checks that each certificate it gets is for its
new key.

What moto lacks is answered by botocore `before-call` hooks (a hook that returns a response replaces
the HTTP request, as botocore's Stubber does): iot-jobs-data DescribeJobExecution, and
CreateCertificateFromCsr (moto signs a random key, so a small CA signs the CSR's key and the
certificate goes into moto's registry directly). Calls are counted on `provide-client-params`, which
fires once per API call before any hook, retries not included.

Run: .venv/bin/python bench/api_calls.py
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
from collections import Counter
from collections.abc import Callable
from typing import Any

# Before moto and boto3: nothing may reach AWS, and moto's iot-data serves only the default host.
REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
os.environ.update(
    AWS_ACCESS_KEY_ID="bench",
    AWS_SECRET_ACCESS_KEY="bench",
    AWS_DEFAULT_REGION=REGION,
    AWS_REGION=REGION,
    HTTPS_PROXY="http://127.0.0.1:9",
    HTTP_PROXY="http://127.0.0.1:9",
    IOT_DATA_ENDPOINT=f"data-ats.iot.{REGION}.amazonaws.com",
    SNS_TOPIC_ARN=f"arn:aws:sns:{REGION}:{ACCOUNT}:AWSLabsCertificateRotatorNotification",
    POWERTOOLS_LOG_LEVEL="WARNING",
    POWERTOOLS_METRICS_DISABLED="true",  # keep the EMF lines out of the report
)
os.environ.pop("IOT_JOBS_ENDPOINT", None)  # let the cold start look the jobs endpoint up

import boto3  # noqa: E402
import moto  # noqa: E402
from botocore.awsrequest import AWSResponse  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_pem_private_key  # noqa: E402
from moto.iot.models import IoTBackend, iot_backends  # noqa: E402
from moto.iotdata.models import iotdata_backends  # noqa: E402

from certrotator import crypto, protocol  # noqa: E402
from certrotator.backend.aws import lambdas  # noqa: E402
from certrotator.backend.aws.clients import Clients, use_clients  # noqa: E402

THING = "bench-device"
POLICY = "BenchDevicePolicy"
FUNCTION_ARN = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:CertificateRotator"


class Context:
    function_name = "CertificateRotator"
    memory_limit_in_mb = 256
    invoked_function_arn = FUNCTION_ARN
    aws_request_id = "bench"


class CallCounter:
    def __init__(self) -> None:
        self.phase = "setup"
        self.calls: Counter[tuple[str, str]] = Counter()

    def __call__(self, event_name: str, **_: Any) -> None:
        _event, service, operation = event_name.split(".", 2)
        self.calls[(self.phase, f"{service}.{operation}")] += 1


class JobsService:
    """The Jobs data plane's DescribeJobExecution for the executions the bench starts."""

    def __init__(self) -> None:
        self.in_progress: set[tuple[str, str]] = set()

    def describe(self, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        # rest-json: GET /things/{thingName}/jobs/{jobId}
        _, _, thing, _, job_id = params["url_path"].split("?")[0].split("/")[:5]
        if (thing, job_id) not in self.in_progress:
            error = {"Error": {"Code": "ResourceNotFoundException", "Message": "no such execution"}}
            return AWSResponse("", 404, {}, None), error  # type: ignore[arg-type]
        execution = {
            "jobId": job_id,
            "thingName": thing,
            "status": "IN_PROGRESS",
            "versionNumber": 2,
            "executionNumber": 1,
            "jobDocument": json.dumps(protocol.JOB_DOCUMENT),
        }
        return AWSResponse("", 200, {}, None), {"execution": execution}  # type: ignore[arg-type]


class BenchCa:
    """Signs the CSR's own key, as AWS IoT's CreateCertificateFromCsr does."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "bench CA")])

    def create_from_csr(self, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        csr = x509.load_pem_x509_csr(json.loads(params["body"])["certificateSigningRequest"].encode())
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.name)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .sign(self.key, crypto.CaSigningAlgorithm.SHA256WITHECDSA.hash())
        )
        pem = crypto.certificate_pem(certificate)
        registered = iot_backends[ACCOUNT][REGION].register_certificate_without_ca(pem, "ACTIVE")
        parsed = {
            "certificateArn": registered.arn,
            "certificateId": registered.certificate_id,
            "certificatePem": pem,
        }
        return AWSResponse("", 200, {}, None), parsed  # type: ignore[arg-type]


class Device:
    """The device agent's side of the protocol, reduced to its credentials and messages."""

    def __init__(self, key: crypto.PrivateKey, certificate_pem: str) -> None:
        self.key, self.certificate_pem = key, certificate_pem
        self.pending_key: crypto.PrivateKey | None = None

    @property
    def principal(self) -> str:
        return crypto.certificate_id(self.certificate_pem)

    def create_request(self, job_id: str) -> dict[str, Any]:
        self.pending_key = crypto.generate_private_key(crypto.KeyAlgorithm.RSA_2048)
        subject = crypto.load_certificate(self.certificate_pem).subject
        csr = crypto.build_csr(self.pending_key, crypto.SigningAlgorithm.SHA256WITHRSA, subject)
        request = protocol.CreateCertificateRequest(job_id, csr).to_payload()
        return request | self._broker_fields(protocol.Topics.create(THING))

    def install(self, reply: bytes) -> None:
        pem = protocol.parse_certificate_accepted(reply)
        assert self.pending_key is not None and crypto.certificate_matches_key(pem, self.pending_key)
        self.key, self.certificate_pem, self.pending_key = self.pending_key, pem, None

    def commit_request(self, job_id: str) -> dict[str, Any]:
        request = protocol.CommitCertificateRequest(job_id).to_payload()
        return request | self._broker_fields(protocol.Topics.commit(THING))

    def _broker_fields(self, topic: str) -> dict[str, str]:
        # What the IoT rule adds: the thing, the client id and the connection's certificate id.
        return protocol.BrokerContext(THING, THING, self.principal, topic).to_event_fields()


def make_force_delete_faithful() -> None:
    """moto 5.2.5's DeleteCertificate(forceDelete) leaves the policy attachments behind, and every later
    DeleteCertificate then fails with ResourceNotFound on the dangling ARN. AWS drops them."""
    original = IoTBackend.delete_certificate

    def delete_certificate(self: Any, certificate_id: str, force_delete: bool) -> None:
        arn = self.describe_certificate(certificate_id).arn
        original(self, certificate_id, force_delete)
        for key in [k for k in self.principal_policies if k[0] == arn]:
            del self.principal_policies[key]

    IoTBackend.delete_certificate = delete_certificate  # type: ignore[method-assign]


def last_publication(topic: str) -> bytes:
    for published_topic, payload in reversed(iotdata_backends[ACCOUNT][REGION].published_payloads):
        if published_topic == topic:
            return payload
    raise AssertionError(f"nothing published on {topic}")


def rotate(device: Device, jobs: JobsService, counter: CallCounter, job_id: str, iot: Any) -> None:
    context = Context()
    # The job itself (control plane): the terminal handler asks for its document once per job and
    # container to tell a rotation from an unrelated job. Created outside the counted phases.
    thing_arn = iot.describe_thing(thingName=THING)["thingArn"]
    iot.create_job(jobId=job_id, targets=[thing_arn], document=json.dumps(protocol.JOB_DOCUMENT))
    jobs.in_progress.add((THING, job_id))
    old_id = device.principal

    def run(phase: str, entry: Callable[[dict[str, Any], Any], dict[str, Any]], event: dict[str, Any]) -> str:
        counter.phase = phase
        try:
            return str(entry(event, context)["outcome"])
        finally:
            counter.phase = "bench"

    outcome = run("create", lambdas.create_certificate, device.create_request(job_id))
    assert outcome == "accepted", outcome
    device.install(last_publication(protocol.Topics.accepted(protocol.Topics.create(THING))))
    outcome = run("commit", lambdas.commit_certificate, device.commit_request(job_id))
    assert outcome == "accepted", outcome
    jobs.in_progress.discard((THING, job_id))
    status = protocol.JobExecutionStatus.SUCCEEDED
    event = protocol.JobExecutionEvent(THING, job_id, status, {protocol.STATUS_DETAILS_KEY: status.value})
    outcome = run(
        "terminal", lambdas.job_execution_terminal, event.to_event(f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/")
    )
    assert outcome == "succeeded", outcome

    # Invariant 2: the thing ends with exactly the certificate the device now uses; the old one is gone.
    principals = iot.list_thing_principals_v2(thingName=THING)["thingPrincipalObjects"]
    assert [p["principal"].rsplit("/", 1)[1] for p in principals] == [device.principal]
    assert old_id not in iot_backends[ACCOUNT][REGION].certificates


def unrelated_job_events(counter: CallCounter, iot: Any, events: int = 3) -> list[int]:
    """API calls for each terminal event of a job that is not a rotation (the terminal rule sees every
    job's executions): the first asks for the job's document, the later ones should not."""
    thing_arns = []
    for i in range(events):
        thing_arns.append(iot.create_thing(thingName=f"other-device-{i}")["thingArn"])
    iot.create_job(
        jobId="firmware-update", targets=thing_arns, document=json.dumps({"operation": "FIRMWARE"})
    )
    calls = []
    for i in range(events):
        counter.calls.clear()
        counter.phase = "unrelated"
        event = protocol.JobExecutionEvent(
            f"other-device-{i}", "firmware-update", protocol.JobExecutionStatus.SUCCEEDED, {}
        )
        outcome = lambdas.job_execution_terminal(
            event.to_event(f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/"), Context()
        )
        counter.phase = "bench"
        assert outcome["outcome"] == "ignored", outcome
        calls.append(sum(n for (phase, _), n in counter.calls.items() if phase == "unrelated"))
    return calls


def main() -> None:
    make_force_delete_faithful()
    with moto.mock_aws(config={"iot": {"use_valid_cert": True}}):
        counter, jobs, ca = CallCounter(), JobsService(), BenchCa()
        session = boto3.session.Session()
        # Clients copy the session's handlers when created, so every client the Lambdas make counts.
        session.events.register("provide-client-params.*.*", counter)
        clients = Clients(REGION, session=session)
        use_clients(clients)
        lambdas.reset_container()
        # (botocore-stubs types handlers as returning None; a before-call handler may return a response)
        session.events.register(
            "before-call.iot-jobs-data.DescribeJobExecution",
            jobs.describe,  # type: ignore[arg-type]
        )
        session.events.register(
            "before-call.iot.CreateCertificateFromCsr",
            ca.create_from_csr,  # type: ignore[arg-type]
        )

        iot = clients.iot
        iot.create_thing(thingName=THING)
        iot.create_policy(policyName=POLICY, policyDocument='{"Version":"2012-10-17","Statement":[]}')
        clients.sns.create_topic(Name="AWSLabsCertificateRotatorNotification")
        # What the stack provides: a generated secret, the HMAC key for the rotation state in the shadow.
        key_secret = clients.secretsmanager.create_secret(
            Name="AWSLabsCertificateRotatorStateKey", SecretString=secrets.token_urlsafe(48)
        )
        os.environ["STATE_KEY_SECRET_ARN"] = key_secret["ARN"]
        first = iot.create_keys_and_certificate(setAsActive=True)
        iot.attach_thing_principal(
            thingName=THING, principal=first["certificateArn"], thingPrincipalType="EXCLUSIVE_THING"
        )
        iot.attach_policy(policyName=POLICY, target=first["certificateArn"])
        key = load_pem_private_key(first["keyPair"]["PrivateKey"].encode(), None)
        assert isinstance(key, crypto.PrivateKey)
        device = Device(key, first["certificatePem"])

        rotate(device, jobs, counter, "rotation-1", iot)
        cold = {k: v for k, v in counter.calls.items() if k[0] in ("create", "commit", "terminal")}
        counter.calls.clear()
        rotate(device, jobs, counter, "rotation-2", iot)
        warm = {k: v for k, v in counter.calls.items() if k[0] in ("create", "commit", "terminal")}
        unrelated = unrelated_job_events(counter, iot)

    print("AWS API calls, first rotation (cold container):", sum(cold.values()))
    for (phase, operation), n in sorted(cold.items()):
        if operation == "iot.DescribeEndpoint":
            print(f"  {phase:8} {operation:40} {n}  (endpoint look-up, once per container)")
        elif operation == "secrets-manager.GetSecretValue":
            print(f"  {phase:8} {operation:40} {n}  (rotation-state key, once per container)")
    print("  (iot:Data-ATS is set by IOT_DATA_ENDPOINT here: moto serves only the default data host)")
    print()
    print("AWS API calls, second rotation (warm container)")
    for phase in ("create", "commit", "terminal"):
        calls = {op: n for (p, op), n in warm.items() if p == phase}
        print(f"  {phase}: {sum(calls.values())}")
        for operation, n in sorted(calls.items()):
            print(f"    {operation:40} {n}")
    print("per operation:")
    per_operation: Counter[str] = Counter()
    for (_, operation), n in warm.items():
        per_operation[operation] += n
    for operation, n in sorted(per_operation.items()):
        print(f"  {operation:42} {n}")
    print(
        "terminal events of an unrelated job (warm container), API calls each: "
        + ", ".join(str(n) for n in unrelated)
        + " (the first asks for the job's document; the container remembers the answer)"
    )
    total = sum(warm.values())
    print(f"total: {total}")
    print(f"unrelated_job_event_calls={'/'.join(str(n) for n in unrelated)}")
    print(f"api_calls_per_rotation={total}")


if __name__ == "__main__":
    main()
