"""FileKeyStore: rotation, rollback and commit with real CA-signed certificates, and power loss at every
write (a child process killed at each crash point, DESIGN.md §3)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from certrotator import crypto
from certrotator.crypto import KeyAlgorithm, SigningAlgorithm
from certrotator.device.journal import CRASH_ENV
from certrotator.device.keystores import files
from certrotator.device.keystores.base import NOT_BEFORE_ALLOWANCE, KeyStoreError, validity_problem
from certrotator.device.keystores.files import FileKeyStore

from .crash_child import AFTER_INSTALL, JOB, issue, issue_for_csr, make_ca, provision, rotate, store_at

CHILD = Path(__file__).with_name("crash_child.py")
CRASH_EXIT_CODE = 86  # journal.crash_point's os._exit code
CERT, KEY, CERT_BAK, KEY_BAK, JOURNAL = "cert.pem", "key.pem", "cert.pem.bak", "key.pem.bak", "journal.json"

Ca = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


@dataclass
class Device:
    root: Path
    ca: Ca
    store: FileKeyStore
    old_cert: bytes
    old_key: bytes

    @property
    def directory(self) -> Path:
        return self.store.cert.parent


@pytest.fixture
def device(tmp_path: Path) -> Device:
    ca = make_ca(tmp_path)
    store = provision(tmp_path, ca)
    return Device(tmp_path, ca, store, store.cert.read_bytes(), store.key.read_bytes())


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in the device directory with its content (temp files included)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def key_matches(key_pem: bytes, cert_pem: bytes) -> bool:
    return crypto.certificate_matches_key(crypto.load_certificate(cert_pem), crypto.load_private_key(key_pem))


# ------------------------------------------------------------------------------ rotate in-process

ROTATIONS = [
    pytest.param(KeyAlgorithm.RSA_2048, SigningAlgorithm.SHA256WITHRSA, "commit", id="RSA-2048-commit"),
    pytest.param(KeyAlgorithm.RSA_2048, SigningAlgorithm.SHA256WITHRSA, "rollback", id="RSA-2048-rollback"),
    # RSA-3072 key generation is slow (~0.3 s): once, with PSS.
    pytest.param(
        KeyAlgorithm.RSA_3072, SigningAlgorithm.SHA384WITHRSAANDMGF1, "commit", id="RSA-3072-PSS-commit"
    ),
    *(
        pytest.param(algorithm, signing, ending, id=f"{algorithm.value}-{ending}")
        for algorithm, signing in [
            (KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256),
            (KeyAlgorithm.ECDSA_P384, SigningAlgorithm.ECDSA_WITH_SHA384),
            (KeyAlgorithm.ECDSA_P521, SigningAlgorithm.ECDSA_WITH_SHA512),
        ]
        for ending in ("commit", "rollback")
    ),
]


@pytest.mark.parametrize(("algorithm", "signing", "ending"), ROTATIONS)
def test_rotation_then_commit_or_rollback(
    device: Device, algorithm: KeyAlgorithm, signing: SigningAlgorithm, ending: str
) -> None:
    store, directory = device.store, device.directory
    old_subject = store.current_certificate().subject

    csr = store.prepare("job-7", algorithm, signing)
    info = crypto.inspect_csr(csr)
    assert info.signature_valid
    assert crypto.key_algorithm_of(info.public_key) is algorithm
    assert info.subject == old_subject
    assert snapshot(directory) == {CERT: device.old_cert, KEY: device.old_key}, "prepare writes nothing"

    new_cert = issue_for_csr(device.ca, csr).encode()
    store.install("job-7", new_cert.decode())

    # New pair in place, old pair kept byte for byte, journal says installed.
    new_key = store.key.read_bytes()
    assert store.cert.read_bytes() == new_cert
    assert key_matches(new_key, new_cert)
    assert crypto.same_public_key(crypto.load_private_key(new_key), info.public_key)
    header = b"-----BEGIN RSA PRIVATE KEY-----" if algorithm.family is crypto.Family.RSA else None
    assert new_key.startswith(header or b"-----BEGIN PRIVATE KEY-----")  # RSA: PKCS#1, EC: PKCS#8
    assert mode(store.key) == 0o600
    assert mode(store.key_bak) == 0o600
    assert store.cert_bak.read_bytes() == device.old_cert
    assert store.key_bak.read_bytes() == device.old_key
    assert store.has_backup()
    entry = store.journal.read()
    assert entry is not None
    assert (entry.job_id, entry.phase) == ("job-7", "installed")
    assert set(snapshot(directory)) == {CERT, KEY, CERT_BAK, KEY_BAK, JOURNAL}

    # A restart in between (what the agent does next) changes nothing: the machine decides.
    installed = snapshot(directory)
    fresh = store_at(device.root)
    fresh.recover()
    assert snapshot(directory) == installed
    assert fresh.has_backup()

    if ending == "commit":
        fresh.commit()
        assert snapshot(directory) == {CERT: new_cert, KEY: new_key}
        assert crypto.certificate_id(fresh.current_certificate()) == crypto.certificate_id(new_cert)
    else:
        fresh.rollback()
        assert snapshot(directory) == {CERT: device.old_cert, KEY: device.old_key}
    assert mode(store.key) == 0o600
    assert not fresh.has_backup()
    assert fresh.journal.read() is None
    assert fresh.pair_matches()


def test_a_rotation_costs_12_fsyncs(device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    """Install + commit: each fsync orders one step before the next (see files.py); a new one is a
    deliberate change, made here too."""
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    rotate(device.store, device.ca)
    installed = len(calls)
    device.store.commit()
    assert (installed, len(calls)) == (8, 12)


def test_without_hard_links_the_backup_is_a_durable_copy(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(_source: object, _target: object) -> None:
        raise PermissionError(1, "Operation not permitted")  # what FAT answers

    monkeypatch.setattr(os, "link", no_links)
    new_cert = rotate(device.store, device.ca).encode()
    store = device.store
    assert (store.cert_bak.read_bytes(), store.key_bak.read_bytes()) == (device.old_cert, device.old_key)
    assert not store.key_bak.samefile(store.key)
    assert (mode(store.key_bak), mode(store.cert_bak)) == (0o600, mode(store.cert))
    assert store.cert.read_bytes() == new_cert
    store.rollback()
    assert snapshot(device.directory) == {CERT: device.old_cert, KEY: device.old_key}


def test_a_failed_restore_keeps_the_backup_for_the_next_try(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = device.store
    rotate(store, device.ca)
    real = os.replace

    def disk_full(source: str | Path, target: str | Path) -> None:
        if str(source).endswith(".bak"):  # only moving a backup back fails; the journal is written
            raise OSError(28, "No space left on device")
        real(source, target)

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.rollback()
    assert (store.key_bak.read_bytes(), store.cert_bak.read_bytes()) == (device.old_key, device.old_cert)
    monkeypatch.setattr(os, "replace", real)
    store_at(device.root).recover()  # the journal says rollback: recovery finishes it
    assert snapshot(device.directory) == {CERT: device.old_cert, KEY: device.old_key}


def test_a_lone_backup_without_a_journal_does_not_block_the_next_rotation(device: Device) -> None:
    device.store.key_bak.write_bytes(b"left over")
    rotate(device.store, device.ca)
    assert device.store.key_bak.read_bytes() == device.old_key


def test_key_file_is_0600_even_with_a_permissive_umask(device: Device) -> None:
    previous = os.umask(0)
    try:
        rotate(device.store, device.ca)
    finally:
        os.umask(previous)
    assert mode(device.store.key) == 0o600
    assert mode(device.store.key_bak) == 0o600


# ------------------------------------------------------------------------------ refused installs


def test_install_of_a_certificate_for_another_key_changes_nothing(device: Device) -> None:
    store = device.store
    csr = store.prepare(JOB, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
    stranger = crypto.generate_private_key(KeyAlgorithm.ECDSA_P256)
    wrong = issue(device.ca, stranger.public_key(), store.current_certificate().subject)
    before = snapshot(device.directory)

    with pytest.raises(KeyStoreError, match="not for the key this device generated"):
        store.install(JOB, wrong)
    assert snapshot(device.directory) == before
    assert not store.has_backup()

    # The prepared key is still there: the right certificate installs.
    store.install(JOB, issue_for_csr(device.ca, csr))
    assert store.pair_matches()
    assert store.has_backup()


def dated_for_csr(ca: Ca, csr_pem: str, not_before: dt.datetime, not_after: dt.datetime) -> str:
    """A certificate for the CSR's key and subject, by the device's CA, valid from `not_before` to
    `not_after`: everything right but the dates."""
    info = crypto.inspect_csr(csr_pem)
    ca_key, ca_cert = ca
    certificate = (
        x509.CertificateBuilder()
        .subject_name(info.subject)
        .issuer_name(ca_cert.subject)
        .public_key(info.public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return crypto.certificate_pem(certificate)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


# (notBefore, notAfter) relative to now, and the refusal.
OUTSIDE_VALIDITY = {
    "expired": (-dt.timedelta(days=30), -dt.timedelta(minutes=1), "no longer valid: its notAfter"),
    "not yet valid": (
        NOT_BEFORE_ALLOWANCE + dt.timedelta(minutes=2),
        dt.timedelta(days=30),
        "not valid yet: its notBefore",
    ),
}


@pytest.mark.parametrize("case", list(OUTSIDE_VALIDITY))
def test_install_of_a_certificate_outside_its_validity_changes_nothing(device: Device, case: str) -> None:
    store = device.store
    csr = store.prepare(JOB, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
    start, end, message = OUTSIDE_VALIDITY[case]
    now = utc_now()
    pem = dated_for_csr(device.ca, csr, now + start, now + end)
    before = snapshot(device.directory)

    with pytest.raises(KeyStoreError, match=message) as refused:
        store.install(JOB, pem)
    # The reason names the certificate's date and the device's clock, and promises nothing changed.
    date = (now + (end if "no longer" in message else start)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert date in str(refused.value) and str(refused.value).endswith("; nothing changed")
    assert snapshot(device.directory) == before == {CERT: device.old_cert, KEY: device.old_key}
    assert not store.has_backup()
    assert store.journal.read() is None

    # The prepared key stays: a certificate within its validity for it still installs.
    store.install(JOB, issue_for_csr(device.ca, csr))
    assert store.pair_matches() and store.has_backup()


def test_a_certificate_starting_within_the_clock_skew_allowance_is_installed(device: Device) -> None:
    """A device whose clock runs a little behind the issuer's takes a brand-new certificate."""
    store = device.store
    csr = store.prepare(JOB, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
    now = utc_now()
    pem = dated_for_csr(
        device.ca, csr, now + NOT_BEFORE_ALLOWANCE - dt.timedelta(minutes=2), now + dt.timedelta(days=1)
    )
    store.install(JOB, pem)
    assert store.cert.read_bytes() == pem.encode()
    assert store.pair_matches() and store.has_backup()


def test_validity_boundaries() -> None:
    now = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
    day = dt.timedelta(days=1)
    assert validity_problem(now - day, now + day, now) is None
    assert validity_problem(now, now, now) is None  # both bounds are inclusive (RFC 5280)
    assert validity_problem(now + NOT_BEFORE_ALLOWANCE, now + day, now) is None
    late = validity_problem(now + NOT_BEFORE_ALLOWANCE + dt.timedelta(seconds=1), now + day, now)
    assert late is not None and "not valid yet" in late and "60 min" in late
    assert "2030-06-01T13:00:01Z" in late and "2030-06-01T12:00:00Z" in late
    expired = validity_problem(now - day, now - dt.timedelta(seconds=1), now)
    assert expired == (
        "the new certificate is no longer valid: its notAfter 2030-06-01T11:59:59Z is before this "
        "device's clock 2030-06-01T12:00:00Z"
    )
    # Another timezone on the way in, UTC on the way out.
    plus_two = dt.timezone(dt.timedelta(hours=2))
    expired_elsewhere = validity_problem(now - day, now - dt.timedelta(hours=1), now.astimezone(plus_two))
    assert expired_elsewhere is not None and "11:00:00Z" in expired_elsewhere
    assert validity_problem(now, now + day, now, allowance=dt.timedelta(0)) is None
    assert validity_problem(now + dt.timedelta(seconds=1), now + day, now, allowance=dt.timedelta(0))


def test_install_of_the_old_certificate_is_refused(device: Device) -> None:
    store = device.store
    store.prepare(JOB, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
    with pytest.raises(KeyStoreError, match="not for the key"):
        store.install(JOB, device.old_cert.decode())
    assert snapshot(device.directory) == {CERT: device.old_cert, KEY: device.old_key}


def test_install_without_prepare_is_refused(device: Device) -> None:
    store = device.store
    certificate = issue(
        device.ca,
        crypto.generate_private_key(KeyAlgorithm.ECDSA_P256).public_key(),
        store.current_certificate().subject,
    )
    with pytest.raises(KeyStoreError, match="no key was prepared"):
        store.install(JOB, certificate)
    assert snapshot(device.directory) == {CERT: device.old_cert, KEY: device.old_key}


def test_install_for_another_job_than_prepared_is_refused(device: Device) -> None:
    store = device.store
    csr = store.prepare("job-a", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
    with pytest.raises(KeyStoreError, match="no key was prepared for job 'job-b'"):
        store.install("job-b", issue_for_csr(device.ca, csr))
    assert snapshot(device.directory) == {CERT: device.old_cert, KEY: device.old_key}


def test_install_after_discard_is_refused(device: Device) -> None:
    store = device.store
    csr = store.prepare(JOB, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
    store.discard_prepared()
    with pytest.raises(KeyStoreError, match="no key was prepared"):
        store.install(JOB, issue_for_csr(device.ca, csr))
    assert snapshot(device.directory) == {CERT: device.old_cert, KEY: device.old_key}


def test_install_of_garbage_is_refused(device: Device) -> None:
    store = device.store
    store.prepare(JOB, KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
    with pytest.raises(KeyStoreError, match="unusable"):
        store.install(JOB, "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert snapshot(device.directory) == {CERT: device.old_cert, KEY: device.old_key}


def test_install_while_a_backup_is_pending_is_refused(device: Device) -> None:
    store = device.store
    rotate(store, device.ca)
    installed = snapshot(device.directory)
    csr = store.prepare("job-2", KeyAlgorithm.ECDSA_P256, SigningAlgorithm.ECDSA_WITH_SHA256)
    with pytest.raises(KeyStoreError, match="pending"):
        store.install("job-2", issue_for_csr(device.ca, csr))
    assert snapshot(device.directory) == installed
    # The pending rotation still ends properly.
    store.rollback()
    assert snapshot(device.directory) == {CERT: device.old_cert, KEY: device.old_key}


def test_prepare_refuses_mixed_families(device: Device) -> None:
    with pytest.raises(crypto.CryptoError, match="does not match"):
        device.store.prepare(JOB, KeyAlgorithm.RSA_2048, SigningAlgorithm.ECDSA_WITH_SHA256)


def test_rollback_and_commit_without_a_backup_do_nothing(device: Device) -> None:
    device.store.rollback()
    device.store.commit()
    device.store.recover()
    assert snapshot(device.directory) == {CERT: device.old_cert, KEY: device.old_key}


# ------------------------------------------------------------------------------ the journal itself


@pytest.mark.parametrize(
    "garbage",
    [b"", b"{not json", b"\xff\xfe\x00", b"[]", b'"installed"', b'{"phase": "install"}', b'{"jobId": "j"}'],
    ids=["empty", "bad-json", "binary", "list", "string", "no-job-id", "no-phase"],
)
def test_a_garbage_journal_is_a_clear_error_and_touches_nothing(device: Device, garbage: bytes) -> None:
    rotate(device.store, device.ca)
    device.store.journal.path.write_bytes(garbage)
    before = snapshot(device.directory)
    with pytest.raises(RuntimeError, match=r"rotation journal .*journal\.json is unreadable"):
        store_at(device.root).recover()
    assert snapshot(device.directory) == before


def test_a_journal_with_an_unknown_phase_is_kept_for_inspection(device: Device) -> None:
    rotate(device.store, device.ca)
    device.store.journal.write(JOB, "half-way")
    before = snapshot(device.directory)
    with pytest.raises(KeyStoreError, match="unknown phase 'half-way'"):
        store_at(device.root).recover()
    assert snapshot(device.directory) == before


def test_recover_of_an_installed_rotation_is_idempotent(device: Device) -> None:
    rotate(device.store, device.ca)
    installed = snapshot(device.directory)
    for _ in range(2):
        store_at(device.root).recover()
        assert snapshot(device.directory) == installed


# ------------------------------------------------------------------------------ power loss

# What the disk holds when the child dies at a crash point, and after recover().
OLD, NEW, MISMATCH = "old pair", "new pair", "mismatched pair"


@dataclass(frozen=True)
class Crash:
    step: str  # what the child does: install, rollback or commit
    journal: str  # the journal's phase at the crash
    backups: frozenset[str]  # the .bak files at the crash
    at_crash: str  # the cert/key in place at the crash
    recovered: str  # the cert/key in place after recover()
    on_trial: bool = False  # after recover(): journal 'installed' and backups kept (else both are gone)
    staged: frozenset[str] = frozenset()  # files with a staged (temporary) new version at the crash


BOTH = frozenset({CERT_BAK, KEY_BAK})

# Every crash point of the file store. Must equal files.CRASH_POINTS: a new write needs a row here.
CRASHES: dict[str, Crash] = {
    # install: until the journal says 'installed', recover() undoes it -> the old pair.
    "files.install.journaled": Crash("install", "install", frozenset(), OLD, OLD),
    "files.install.key_backed_up": Crash("install", "install", frozenset({KEY_BAK}), OLD, OLD),
    "files.install.backed_up": Crash("install", "install", BOTH, OLD, OLD),
    "files.install.staged": Crash("install", "install", BOTH, OLD, OLD, staged=frozenset({CERT, KEY})),
    "files.install.key_written": Crash("install", "install", BOTH, MISMATCH, OLD, staged=frozenset({CERT})),
    "files.install.cert_written": Crash("install", "install", BOTH, NEW, OLD),
    # ... from then on the new pair is on trial: the machine decides (commit or roll back).
    "files.install.installed": Crash("install", "installed", BOTH, NEW, NEW, on_trial=True),
    # rollback: recover() finishes it -> the old pair.
    "files.rollback.journaled": Crash("rollback", "rollback", BOTH, NEW, OLD),
    "files.rollback.key_restored": Crash("rollback", "rollback", frozenset({CERT_BAK}), MISMATCH, OLD),
    "files.rollback.cert_restored": Crash("rollback", "rollback", frozenset(), OLD, OLD),
    # commit: recover() finishes it -> the new pair.
    "files.commit.journaled": Crash("commit", "commit", BOTH, NEW, NEW),
    "files.commit.key_backup_deleted": Crash("commit", "commit", frozenset({CERT_BAK}), NEW, NEW),
    "files.commit.cert_backup_deleted": Crash("commit", "commit", frozenset(), NEW, NEW),
}


def test_every_crash_point_has_a_crash_test() -> None:
    assert len(set(files.CRASH_POINTS)) == len(files.CRASH_POINTS)
    assert set(CRASHES) == set(files.CRASH_POINTS)


def run_child(root: Path, step: str, crash_at: str) -> None:
    env = {**os.environ, CRASH_ENV: crash_at}
    done = subprocess.run(
        [sys.executable, str(CHILD), str(root), step],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == CRASH_EXIT_CODE, (
        f"child {step} did not die at {crash_at} (exit {done.returncode}): {done.stderr}"
    )


def in_place(store: FileKeyStore, old: tuple[bytes, bytes], new_cert: bytes) -> str:
    """Which pair the device would connect with: OLD, NEW or MISMATCH (never anything else)."""
    cert, key = store.cert.read_bytes(), store.key.read_bytes()
    if not key_matches(key, cert):
        assert cert in (old[0], new_cert), "a certificate that is neither the old nor the new one"
        return MISMATCH
    if (cert, key) == old:
        return OLD
    assert cert == new_cert, "a matching pair that is neither the old nor the new one"
    assert key != old[1]
    return NEW


@pytest.mark.parametrize("point", list(CRASHES))
def test_power_loss_at_each_crash_point(device: Device, point: str) -> None:
    crash = CRASHES[point]
    old = (device.old_cert, device.old_key)
    if crash.step == "install":
        run_child(device.root, "install", point)
        new_cert = (device.root / "issued.pem").read_bytes()
    else:
        new_cert = rotate(device.store, device.ca).encode()  # the installed state the child starts from
        run_child(device.root, crash.step, point)
    assert new_cert != device.old_cert

    # The disk as the kill left it: proves where the child died.
    store = store_at(device.root)
    entry = store.journal.read()
    assert entry is not None
    assert (entry.job_id, entry.phase) == (JOB, crash.journal)
    names = set(snapshot(device.directory))
    temps = {name for name in names if name.startswith(".") and name.endswith(".tmp")}
    assert names - temps == {CERT, KEY, JOURNAL} | crash.backups
    assert {name[1:].removesuffix(".tmp").rsplit(".", 1)[0] for name in temps} == crash.staged
    assert len(temps) == len(crash.staged)
    assert in_place(store, old, new_cert) == crash.at_crash
    if crash.step == "install" and crash.backups == BOTH and crash.at_crash == OLD:
        # The backup is the old pair itself under a second name, not a copy.
        assert store.key_bak.samefile(store.key) and store.cert_bak.samefile(store.cert)

    # Start-up: recover() completes or undoes the step; twice is the same as once.
    store.recover()
    recovered = snapshot(device.directory)
    store_at(device.root).recover()
    assert snapshot(device.directory) == recovered
    assert in_place(store, old, new_cert) == crash.recovered
    assert store.pair_matches()
    assert mode(store.key) == 0o600
    if crash.on_trial:
        check_on_trial(device, new_cert, recovered)
    else:
        check_settled(device, recovered)


def check_settled(device: Device, recovered: dict[str, bytes]) -> None:
    """No journal, no backup: the machine sees no backup; neither a rollback nor a commit changes
    anything, and the device can rotate again from the pair it kept."""
    store = store_at(device.root)
    assert set(recovered) == {CERT, KEY}, "no journal, no backup, no temp file is left"
    assert not store.has_backup()
    store.rollback()
    store.commit()
    assert snapshot(device.directory) == recovered
    rotate(store, device.ca)
    assert store.pair_matches()
    assert store.cert_bak.read_bytes() == recovered[CERT]
    assert store.key_bak.read_bytes() == recovered[KEY]


def check_on_trial(device: Device, new_cert: bytes, recovered: dict[str, bytes]) -> None:
    """Journal 'installed' with the old pair as backup: the machine's rollback restores the old pair
    byte for byte, its commit keeps the new one (each tried on a copy of the device)."""
    store = store_at(device.root)
    assert set(recovered) == {CERT, KEY, CERT_BAK, KEY_BAK, JOURNAL}
    assert (recovered[CERT_BAK], recovered[KEY_BAK]) == (device.old_cert, device.old_key)
    entry = store.journal.read()
    assert entry is not None
    assert (entry.job_id, entry.phase) == (JOB, "installed")
    assert store.has_backup()
    copy = device.root.with_name(device.root.name + "-copy")
    shutil.copytree(device.root, copy)
    store_at(copy).rollback()
    assert snapshot(copy / "device") == {CERT: device.old_cert, KEY: device.old_key}
    store.commit()
    assert snapshot(device.directory) == {CERT: new_cert, KEY: recovered[KEY]}


def test_power_loss_right_after_install_returned(device: Device) -> None:
    """Killed by the child itself once install() returned: the same as the last install crash point."""
    run_child(device.root, "install", AFTER_INSTALL)
    new_cert = (device.root / "issued.pem").read_bytes()
    store = store_at(device.root)
    store.recover()
    assert in_place(store, (device.old_cert, device.old_key), new_cert) == NEW
    check_on_trial(device, new_cert, snapshot(device.directory))


@pytest.mark.parametrize("step", ["rollback", "commit"])
def test_power_loss_during_a_step_after_an_install_crash_is_recovered_too(device: Device, step: str) -> None:
    """Two crashes in a row: killed right after install, then killed in the middle of the next step."""
    run_child(device.root, "install", AFTER_INSTALL)
    new_cert = (device.root / "issued.pem").read_bytes()
    middle = f"files.{step}.key_{'restored' if step == 'rollback' else 'backup_deleted'}"
    run_child(device.root, step, middle)
    store = store_at(device.root)
    store.recover()
    expected = OLD if step == "rollback" else NEW
    assert in_place(store, (device.old_cert, device.old_key), new_cert) == expected
    assert set(snapshot(device.directory)) == {CERT, KEY}


def test_the_child_runs_to_the_end_without_a_crash_point(device: Device) -> None:
    """Guards the crash tests: a child that is not told to crash does not exit with 86."""
    done = subprocess.run(
        [sys.executable, str(CHILD), str(device.root), "install"],
        env={k: v for k, v in os.environ.items() if k != CRASH_ENV},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert store_at(device.root).has_backup()
