"""Properties of the device side over hostile replies (issue 13): the pure state machine and the file
key store. End to end with real agents: tests/e2e/test_hostile_replies.py.

- The machine asks to install a certificate only for its own thing's create/accepted, only while it
  is creating a certificate for a job and has no backup, only with the PEM that reply carried; any
  message at all, in any state, never makes it raise; every FAILED update carries a reason.
- The file key store takes a certificate only for the key it prepared for that very job; everything
  else is refused with the files untouched.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from certrotator import crypto
from certrotator.algorithms import KeyAlgorithm, SigningAlgorithm
from certrotator.device import machine as m
from certrotator.device.keystores.base import KeyStoreError
from certrotator.device.keystores.files import FileKeyStore
from certrotator.protocol import (
    FAILURE_REASON_KEY,
    STATUS_DETAILS_KEY,
    JobExecutionStatus,
    ProtocolError,
    Topics,
    certificate_accepted,
    encode,
    parse_certificate_accepted,
)

from .strategies import JOB_ID_RE, hostile_payloads, json_values, mostly, topics

THING, OTHER, JOB = "thing-1", "thing-2", "job-1"
SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, THING)])
_CA_KEY = ec.generate_private_key(ec.SECP256R1())
_CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "property CA")])


def certificate(public_key: Any, *, days: int = 30, start: dt.timedelta = dt.timedelta(0)) -> str:
    now = dt.datetime.now(dt.timezone.utc) + start
    cert = (
        x509.CertificateBuilder()
        .subject_name(SUBJECT)
        .issuer_name(_CA_NAME)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(_CA_KEY, crypto.SigningAlgorithm.ECDSA_WITH_SHA256.hash())
    )
    return crypto.certificate_pem(cert)


def _fresh_public_key() -> Any:
    return crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P256).public_key()


# ------------------------------------------------------------------------------------------ machine

states = st.builds(
    lambda phase, job, backup, committed, epoch: m.State(
        THING,
        KeyAlgorithm.ECDSA_P256,
        SigningAlgorithm.ECDSA_WITH_SHA256,
        3.0,
        phase=phase,
        job_id=None if phase in (m.Phase.IDLE, m.Phase.GETTING_JOB) else job,
        has_backup=backup,
        committed_job=committed,
        epoch=epoch,
    ),
    mostly(st.just(m.Phase.CREATING_CERTIFICATE), st.sampled_from(list(m.Phase))),
    mostly(st.just(JOB), st.from_regex(JOB_ID_RE, fullmatch=True)),
    st.booleans(),
    st.one_of(st.none(), st.just(JOB)),
    st.integers(0, 5),
)

_OWN_AND_OTHERS = [
    topic
    for thing in (THING, OTHER)
    for base in (
        Topics.create(thing),
        Topics.commit(thing),
        Topics.next_get(thing),
        Topics.job_update(thing, JOB),
        Topics.job_get(thing, JOB),
    )
    for topic in (base, Topics.accepted(base), Topics.rejected(base))
] + [Topics.notify_next(THING), Topics.notify_next(OTHER)]

_GOOD_PEM = certificate(_fresh_public_key())
_good_replies = st.one_of(
    st.just(encode(certificate_accepted(_GOOD_PEM))),
    st.builds(
        lambda extra: encode({**extra, "certificatePem": _GOOD_PEM}),
        st.dictionaries(st.text(max_size=5), json_values, max_size=2),
    ),
)
_bad_replies = st.one_of(
    hostile_payloads,
    json_values.map(lambda v: json.dumps({"certificatePem": v}).encode()),
    st.sampled_from(
        [
            encode(certificate_accepted("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")),
            encode({"errorMsg": "no", "execution": {"jobId": JOB, "status": "IN_PROGRESS"}}),
            encode(
                {
                    "execution": {
                        "jobId": JOB,
                        "status": "QUEUED",
                        "jobDocument": {"operation": "ROTATE_CERTIFICATE"},
                    }
                }
            ),
        ]
    ),
)
# The reply that installs, on every topic it might come on; and everything else.
_create_replies = [Topics.accepted(Topics.create(t)) for t in (THING, OTHER, "thing-10", "Thing-1")]
messages = st.builds(
    m.Message,
    mostly(st.sampled_from(_create_replies), st.sampled_from(_OWN_AND_OTHERS), topics),
    mostly(_good_replies, _bad_replies),
)


def _pem_of(payload: bytes) -> str | None:
    try:
        return parse_certificate_accepted(payload)
    except ProtocolError:
        return None


@settings(max_examples=300)
@given(states, messages)
def test_the_machine_installs_only_its_own_create_reply_while_creating(
    state: m.State, message: m.Message
) -> None:
    new_state, actions = m.transition(state, message)  # never raises

    installs = [a for a in actions if isinstance(a, m.InstallCertificate)]
    if installs:
        assert state.phase is m.Phase.CREATING_CERTIFICATE and not state.has_backup
        assert message.topic == Topics.accepted(Topics.create(THING))
        assert [(a.job_id, a.certificate_pem) for a in installs] == [(state.job_id, _pem_of(message.payload))]
        assert new_state.has_backup
    for action in actions:
        if isinstance(action, m.Publish):
            assert action.topic.split("/")[2] == THING  # a device speaks only on its own topics
            if action.message.get("status") == JobExecutionStatus.FAILED.value:
                details = action.message["statusDetails"]
                assert details[STATUS_DETAILS_KEY] and details[FAILURE_REASON_KEY]


def test_the_machine_does_install_a_good_reply_while_creating() -> None:
    """The counterpart that lets the property above fail."""
    state = m.State(
        THING,
        KeyAlgorithm.ECDSA_P256,
        SigningAlgorithm.ECDSA_WITH_SHA256,
        3.0,
        m.Phase.CREATING_CERTIFICATE,
        JOB,
    )
    _, actions = m.transition(
        state, m.Message(Topics.accepted(Topics.create(THING)), encode(certificate_accepted(_GOOD_PEM)))
    )
    assert m.InstallCertificate(JOB, _GOOD_PEM) in actions


# --------------------------------------------------------------------------------------- key store


def _store(root: Path) -> tuple[FileKeyStore, crypto.PrivateKey]:
    cert, key = root / "device.pem.crt", root / "device.pem.key"
    first = crypto.generate_private_key(crypto.KeyAlgorithm.ECDSA_P256)
    cert.write_text(certificate(first.public_key()))
    key.write_bytes(crypto.private_key_pem(first))
    key.chmod(0o600)
    return FileKeyStore(cert, key, root / "journal.json"), first


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


@settings(max_examples=40)
@given(
    st.sampled_from(
        ["prepared key", "another key", "the current key", "garbage", "hostile", "two certificates"]
    ),
    st.sampled_from([JOB, "job-2"]),
    hostile_payloads,
)
def test_the_file_store_takes_only_a_certificate_for_the_key_it_prepared_for_that_job(
    what: str, job_id: str, junk: bytes
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        store, first = _store(root)
        csr = store.prepare(JOB, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
        prepared = crypto.inspect_csr(csr).public_key
        pem = {
            "prepared key": lambda: certificate(prepared),
            "another key": lambda: certificate(_fresh_public_key()),
            "the current key": lambda: certificate(first.public_key()),
            "garbage": lambda: "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n",
            "hostile": lambda: junk.decode("utf-8", "replace"),
            "two certificates": lambda: certificate(_fresh_public_key()) + certificate(prepared),
        }[what]()
        before = _files(root)
        try:
            store.install(job_id, pem)
        except KeyStoreError:
            assert _files(root) == before and not store.has_backup()
            assert not (what == "prepared key" and job_id == JOB), "a good certificate was refused"
            return
        assert what == "prepared key" and job_id == JOB, f"installed {what!r} for {job_id}"
        assert store.has_backup() and store.pair_matches()
