"""Fleet rotation throughput, latency and CPU against the crypto floor, on the local IoT Core.

Rotates N simulated devices end to end through the path `certrotator demo` uses (SimulatedFleet: real
agents, real key stores with fsync'ed writes, the AWS CRT MQTT client over mutual TLS, the embedded
broker, Jobs and the backend handlers), rollout uncapped, and in the same run measures the FLOOR: the
CPU that one rotation cannot avoid, done in isolation on this machine:

    key generation + CSR signing (device), CSR verification + certificate signing (CA),
    one mutual-TLS handshake with the new certificate (client and server side).

By default the engine runs in its own process (`certrotator local up --port 0 --data-dir ...`), as a
real IoT Core and a real fleet would, and the fleet in this one; `--in-process` runs both in this
process, exactly as `certrotator demo` does. CPU per rotation is the process CPU (user + system, all
threads) of engine + fleet over the rotation window (job created -> last execution terminal), from
/proc/<pid>/stat for the engine and getrusage for this process.

Latency is per execution, notify -> SUCCEEDED: the execution's queuedAt -> lastUpdatedAt (an
execution is queued and its device notified in the same step). The rollout rate is uncapped; the
engine's admission limit (`--max-in-flight`, as `certrotator local up`) releases executions as others
finish, so the bench also prints job created -> SUCCEEDED, which includes the wait for admission.
`--max-in-flight 0` queues every execution at once, and every device then waits for all the others.

Run:
    .venv/bin/python bench/fleet.py                       # N = 1,000
    .venv/bin/python bench/fleet.py --sizes 200,2000      # both, and scaling_ratio = t2000 / t200
    .venv/bin/python bench/fleet.py --devices 200 --profile /tmp/prof   # py-spy raw profiles too

Ends with `rotations_per_s=X overhead_vs_floor=Y` (of the largest size). Loopback only; every wait is
bounded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from certrotator import crypto
from certrotator.device.journal import atomic_write, remove
from certrotator.device.keystores.files import FileKeyStore
from certrotator.local.ca import LocalCa, ensure_local_ca
from certrotator.local.engine import EngineConfig
from certrotator.local.handles.base import EngineHandle
from certrotator.local.handles.process import EngineProcess, RemoteEngine
from certrotator.local.handles.thread import EngineThread
from certrotator.local.jobs import DEFAULT_MAX_IN_FLIGHT
from certrotator.local.serve import relax_gc
from certrotator.protocol import JobExecutionStatus
from certrotator.sim.fleet import SimulatedFleet
from certrotator.sim.report import JobReport, percentile

GROUP = "bench-fleet"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Cpu:
    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.system - other.system)


def process_cpu(pid: int) -> Cpu:
    """User and system CPU seconds of another process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return Cpu(int(fields[11]) / TICK, int(fields[12]) / TICK)  # utime, stime (fields 14 and 15)


def self_cpu() -> Cpu:
    """User and system CPU seconds of this process (all its threads, the AWS CRT's too) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return Cpu(usage.ru_utime, usage.ru_stime)


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field_name} for pid {pid}")


def raise_open_files_limit(needed: int) -> int:
    """Each device holds a TLS connection on both sides (and the fleet a few descriptors more)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    if soft != resource.RLIM_INFINITY and soft < needed:
        print(f"warning: open files limit {soft} < {needed} needed; raise the hard limit (ulimit -Hn)")
    return int(soft)


@contextmanager
def py_spy(
    pid: int, output: Path | None, seconds: int, native: bool = False, gil: bool = False
) -> Iterator[None]:
    """Record a raw (collapsed stacks) py-spy profile of `pid` while the block runs: every running
    (not idle) thread, with `native` also its C frames, with `gil` only the thread holding the GIL
    (Python CPU, without the time threads spend blocked in system calls such as fsync)."""
    spy = Path(sys.executable).with_name("py-spy")
    if output is None or not spy.exists():
        yield
        return
    process = subprocess.Popen(
        [
            str(spy),
            "record",
            "-p",
            str(pid),
            "-r",
            "100",
            "-f",
            "raw",
            *(["--native"] if native else ["--nonblocking"]),  # native frames need the process paused
            *(["--gil"] if gil else []),
            "-d",
            str(seconds),
            "-o",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # attach before the window opens
    try:
        yield
    finally:
        process.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -------------------------------------------------------------------------------------------- floor


@dataclass
class Floor:
    samples: int
    seconds: dict[str, float] = field(default_factory=dict)  # CPU seconds per rotation, by step

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def _cpu_per_call(fn: Callable[[], object], samples: int) -> float:
    fn()  # warm up (first-use initialisation is not per-rotation work)
    start = time.process_time()
    for _ in range(samples):
        fn()
    return (time.process_time() - start) / samples


def _handshake_cpu(
    ca: LocalCa, certificate: x509.Certificate, key: crypto.PrivateKey, work: Path, samples: int
) -> float:
    # The handshake: the broker's server context (same construction as the local broker's) against
    # a client context holding the new key and certificate, over memory BIOs (no sockets: CPU only).
    cert_file, key_file = work / "floor-device.crt", work / "floor-device.key"
    cert_file.write_text(crypto.certificate_pem(certificate))
    key_file.write_bytes(crypto.private_key_pem(key))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(ca.files.server_cert, ca.files.server_key)
    server.load_verify_locations(cafile=ca.files.client_ca_bundle)
    server.verify_mode = ssl.CERT_REQUIRED
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    server.num_tickets = 0
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=ca.files.root_ca)
    client.load_cert_chain(cert_file, key_file)
    expected = certificate.public_bytes(serialization.Encoding.DER)

    def handshake() -> None:
        c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        c = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
        s = server.wrap_bio(s_in, s_out, server_side=True)
        done_c = done_s = False
        for _ in range(20):
            if not done_c:
                try:
                    c.do_handshake()
                    done_c = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            if not done_s:
                try:
                    s.do_handshake()
                    done_s = True
                except ssl.SSLWantReadError:
                    pass
            c_in.write(s_out.read())
            if done_c and done_s:
                break
        if not (done_c and done_s) or s.getpeercert(binary_form=True) != expected:
            raise RuntimeError("floor handshake did not complete with the new certificate")

    return _cpu_per_call(handshake, samples)


def measure_floor(
    key_algorithm: crypto.KeyAlgorithm, signing: crypto.SigningAlgorithm, samples: int, work: Path
) -> Floor:
    """The unavoidable CPU of one rotation, each step in isolation, with the local IoT Core's CAs and
    certificate types: the device's key and CSR, the CA's check and signature, one mutual-TLS
    handshake (TLS 1.3 where both ends offer it, as here) with the newly issued certificate."""
    data_dir = work / "floor-ca"
    ca = ensure_local_ca(data_dir)
    issuer = ca.iot
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "floor-device")])
    floor = Floor(samples)

    floor.seconds["key generation"] = _cpu_per_call(
        lambda: crypto.generate_private_key(key_algorithm), samples
    )
    key = crypto.generate_private_key(key_algorithm)
    floor.seconds["CSR signing"] = _cpu_per_call(lambda: crypto.build_csr(key, signing, subject), samples)
    csr = crypto.build_csr(key, signing, subject)
    # A new CSR every time: the engine memoises a CSR's inspection, and each rotation brings a new one.
    csrs = iter(
        [
            crypto.build_csr(key, signing, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"floor-{i}")]))
            for i in range(samples + 1)
        ]
    )
    floor.seconds["CSR verification + certificate signing (CA)"] = _cpu_per_call(
        lambda: issuer.sign_csr(next(csrs)), samples
    )

    certificate = issuer.sign_csr(csr)
    floor.seconds["mutual-TLS handshake (client + server)"] = _handshake_cpu(
        ca, certificate, key, work, samples
    )
    shutil.rmtree(data_dir, ignore_errors=True)
    return floor


@dataclass
class CredentialIo:
    """The device side's durable credential writes of one rotation, measured alone (not in the floor:
    it is I/O the crash-safety design chooses, and the target does not exempt it)."""

    fsyncs: int
    cpu_s: float  # CPU (user + system) per rotation, one device at a time
    wall_s: float  # wall time per rotation, one device at a time
    parallel_per_s: float  # rotations/s of this I/O alone with `threads` devices at a time
    threads: int


def measure_credential_io(
    key_algorithm: crypto.KeyAlgorithm,
    signing: crypto.SigningAlgorithm,
    work: Path,
    rotations: int,
    threads: int,
) -> CredentialIo:
    """FileKeyStore.install, the commit marker, FileKeyStore.commit and the marker's removal: what the
    agent writes for one rotation (every write durable: temp file + fsync + rename + directory fsync)."""
    ca = ensure_local_ca(work / "io-ca")
    stores = []
    for i in range(rotations):
        directory = work / "io" / f"device-{i}"
        directory.mkdir(parents=True)
        key = crypto.generate_private_key(key_algorithm)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"io-{i}")])
        (directory / "device.pem.crt").write_text(
            crypto.certificate_pem(ca.iot.issue(key.public_key(), subject))
        )
        (directory / "private.pem.key").write_bytes(crypto.private_key_pem(key))
        store = FileKeyStore(
            directory / "device.pem.crt", directory / "private.pem.key", directory / "journal.json"
        )
        certificate = crypto.certificate_pem(ca.iot.sign_csr(store.prepare("io-job", key_algorithm, signing)))
        stores.append((store, certificate, directory / "journal.json.committed"))

    def rotate(item: tuple[FileKeyStore, str, Path]) -> None:
        store, certificate, marker = item
        store.install("io-job", certificate)
        atomic_write(marker, b"io-job", 0o600)
        store.commit()
        remove(marker)

    calls = {"n": 0}
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls["n"] += 1
        real_fsync(fd)

    half = rotations // 2
    os.fsync = counting_fsync  # type: ignore[assignment]
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        for item in stores[:half]:
            rotate(item)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        os.fsync = real_fsync
    fsyncs = calls["n"] // max(half, 1)
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(rotate, stores[half:]))
    parallel = (rotations - half) / (time.perf_counter() - started)
    shutil.rmtree(work / "io", ignore_errors=True)
    return CredentialIo(fsyncs, cpu / max(half, 1), wall / max(half, 1), parallel, threads)


# --------------------------------------------------------------------------------------------- fleet


@dataclass
class Run:
    devices: int
    report: JobReport
    window_s: float  # job created -> last execution terminal, by the engine's clock
    end_to_end_s: list[float]  # job created -> SUCCEEDED per execution (includes waiting for admission)
    cpu_engine: Cpu
    cpu_fleet: Cpu
    engine_rss_idle_mb: float
    engine_rss_connected_mb: float
    engine_rss_peak_mb: float
    connect_s: float
    provision_s: float
    in_process: bool

    @property
    def succeeded(self) -> int:
        return self.report.count(JobExecutionStatus.SUCCEEDED)

    @property
    def rotations_per_s(self) -> float:
        return self.succeeded / self.window_s if self.window_s > 0 else 0.0

    @property
    def cpu_per_rotation(self) -> float:
        return (self.cpu_engine.total + self.cpu_fleet.total) / max(self.succeeded, 1)


def rotate_fleet(args: argparse.Namespace, devices: int, work: Path) -> Run:
    key_algorithm = crypto.parse_key_algorithm(args.key_algorithm)
    signing = crypto.parse_signing_algorithm(args.signing_algorithm)
    data_dir = work / "engine"
    job_id = f"bench-{devices}"
    with _engine(args, data_dir) as (engine, engine_pid), SimulatedFleet(engine, work, args.threads) as fleet:
        started = time.monotonic()
        fleet.provision(devices, GROUP, key_algorithm, signing, state_timeout_s=args.state_timeout)
        provision_s = time.monotonic() - started
        rss_idle = rss_mb(engine_pid)
        started = time.monotonic()
        fleet.start_agents(timeout_s=args.timeout)
        connect_s = time.monotonic() - started
        time.sleep(1.0)  # let connection set-up settle before reading memory and starting the clock
        rss_connected = rss_mb(engine_pid)

        profile = Path(args.profile) if args.profile else None
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
        seconds = int(args.timeout) + 30
        engine_profile = profile / f"engine-{devices}.raw" if profile else None
        fleet_profile = profile / f"fleet-{devices}.raw" if profile else None
        with (
            py_spy(engine_pid, engine_profile, seconds, args.profile_native, args.profile_gil)
            if not args.in_process
            else _nothing(),
            py_spy(os.getpid(), fleet_profile, seconds, args.profile_native, args.profile_gil),
        ):
            engine_before = process_cpu(engine_pid) if not args.in_process else Cpu(0.0, 0.0)
            fleet_before = self_cpu()
            report = fleet.run_job(job_id, GROUP, timeout_s=args.timeout, unlimited_rollout=True)
            cpu_fleet = self_cpu() - fleet_before
            cpu_engine = process_cpu(engine_pid) - engine_before if not args.in_process else Cpu(0.0, 0.0)
        rss_peak = rss_mb(engine_pid, "VmHWM")

        window_s, end_to_end_s = rotation_window(engine, job_id)
        fleet.verify(report)
        fleet.stop_agents()
    return Run(
        devices,
        report,
        window_s,
        end_to_end_s,
        cpu_engine,
        cpu_fleet,
        rss_idle,
        rss_connected,
        rss_peak,
        connect_s,
        provision_s,
        args.in_process,
    )


def rotation_window(engine: EngineHandle, job_id: str) -> tuple[float, list[float]]:
    """(job created -> last execution terminal, job created -> SUCCEEDED of each execution) in seconds."""
    created = engine.job_created_at(job_id)
    executions = engine.executions(job_id)
    if created is None or not executions:
        return 0.0, []
    done = sorted(x.updated_at - created for x in executions if x.status is JobExecutionStatus.SUCCEEDED)
    return max(x.updated_at for x in executions) - created, done


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _engine(args: argparse.Namespace, data_dir: Path) -> Iterator[tuple[EngineHandle, int]]:
    if args.in_process:
        with EngineThread(EngineConfig(data_dir, port=0, max_in_flight=args.max_in_flight or None)) as thread:
            yield thread, os.getpid()
        return
    with EngineProcess(data_dir, ["--max-in-flight", str(args.max_in_flight)]) as process:
        remote = RemoteEngine(data_dir)
        try:
            yield remote, process.pid
        finally:
            remote.close()


# -------------------------------------------------------------------------------------------- report


def print_run(run: Run, floor: Floor) -> dict[str, Any]:
    summary = run.report.summary()
    ratio = run.cpu_per_rotation / floor.total if floor.total else 0.0
    where = (
        "one process (engine thread + fleet)" if run.in_process else "engine and fleet in separate processes"
    )
    print(f"\n== {run.devices} devices, rollout uncapped, {where}")
    print(
        f"provisioned in {run.provision_s:.1f} s; all agents connected over mutual TLS in {run.connect_s:.1f} s"
    )
    print(
        f"succeeded {summary['succeeded']}/{run.devices}, verified {summary['verified']}, "
        f"failed {summary['failed']}, timed out {summary['timed_out']}, other {summary['other']}"
    )
    for problem in run.report.problems[:5]:
        print(f"  problem: {problem.thing}: {problem.what}")
    if len(run.report.problems) > 5:
        print(f"  ... and {len(run.report.problems) - 5} more problems")
    print(f"rotation window           {run.window_s:8.3f} s  (job created -> last execution terminal)")
    print(f"rotations/s               {run.rotations_per_s:8.1f}")
    print(
        f"latency p50 / p99         {run.report.percentile(50):8.3f} / {run.report.percentile(99):.3f} s"
        "  (queuedAt -> SUCCEEDED: notified -> done)"
    )
    print(
        f"job created -> SUCCEEDED    {percentile(run.end_to_end_s, 50):8.3f} / "
        f"{percentile(run.end_to_end_s, 99):.3f} s  (p50 / p99, including the wait for admission)"
    )
    per = 1000 / max(run.succeeded, 1)
    if run.in_process:
        c = run.cpu_fleet
        print(
            f"CPU engine + fleet        {c.total:8.2f} s  (one process; user {c.user:.2f}, system {c.system:.2f})"
        )
    else:
        for name, c in (("engine", run.cpu_engine), ("fleet", run.cpu_fleet)):
            print(
                f"CPU {name:6}                {c.total:8.2f} s  = {c.total * per:6.2f} ms per rotation "
                f"(user {c.user * per:.2f}, system {c.system * per:.2f})"
            )
    print(f"CPU per rotation total    {run.cpu_per_rotation * 1000:8.2f} ms")
    print(f"floor per rotation        {floor.total * 1000:8.2f} ms")
    print(f"overhead vs floor         {ratio:8.2f} x")
    grown = run.engine_rss_connected_mb - run.engine_rss_idle_mb
    label = "process" if run.in_process else "engine"
    print(
        f"{label} RSS idle / connected / peak  {run.engine_rss_idle_mb:.1f} / "
        f"{run.engine_rss_connected_mb:.1f} / {run.engine_rss_peak_mb:.1f} MB"
    )
    print(
        f"{label} RSS per connected device   {grown / run.devices * 1024:.0f} KB (growth idle -> connected)"
    )
    print(
        f"{label} peak RSS per device        {run.engine_rss_peak_mb / run.devices * 1024:.0f} KB "
        f"(peak / devices), {(run.engine_rss_peak_mb - run.engine_rss_idle_mb) / run.devices * 1024:.0f} KB "
        "above idle"
    )
    return {
        "devices": run.devices,
        **{k: summary[k] for k in ("succeeded", "failed", "timed_out", "verified")},
        "problems": len(run.report.problems),
        "window_s": round(run.window_s, 3),
        "rotations_per_s": round(run.rotations_per_s, 2),
        "p50_s": round(run.report.percentile(50), 3),
        "p99_s": round(run.report.percentile(99), 3),
        "end_to_end_p50_s": round(percentile(run.end_to_end_s, 50), 3),
        "end_to_end_p99_s": round(percentile(run.end_to_end_s, 99), 3),
        "cpu_engine_s": round(run.cpu_engine.total, 3),
        "cpu_fleet_s": round(run.cpu_fleet.total, 3),
        "cpu_per_rotation_ms": round(run.cpu_per_rotation * 1000, 3),
        "floor_ms": round(floor.total * 1000, 3),
        "overhead_vs_floor": round(ratio, 2),
        "engine_rss_idle_mb": round(run.engine_rss_idle_mb, 1),
        "engine_rss_connected_mb": round(run.engine_rss_connected_mb, 1),
        "engine_rss_peak_mb": round(run.engine_rss_peak_mb, 1),
        "engine_rss_per_device_kb": round(grown / run.devices * 1024, 1),
        "connect_s": round(run.connect_s, 2),
    }


def median_floor(floors: list[Floor]) -> Floor:
    steps = floors[0].seconds
    return Floor(
        floors[0].samples, {step: statistics.median(f.seconds[step] for f in floors) for step in steps}
    )


def print_floor(floor: Floor, key_algorithm: str, signing: str) -> None:
    print(f"\n== floor: unavoidable CPU per rotation ({key_algorithm}, CSR {signing}; before the fleet)")
    for step, seconds in floor.seconds.items():
        print(f"  {step:46} {seconds * 1000:7.3f} ms")
    print(f"  {'total':46} {floor.total * 1000:7.3f} ms")


def print_totals(results: list[dict[str, Any]]) -> None:
    if len(results) >= 2:
        small, large = min(results, key=lambda r: r["devices"]), max(results, key=lambda r: r["devices"])
        # The host's speed drifts between the two runs (see each floor): also the ratio of the windows
        # measured in floors, i.e. corrected for how fast the machine was during each run.
        normalised = (large["window_s"] / large["floor_ms"]) / (small["window_s"] / small["floor_ms"])
        print(
            f"scaling_ratio={large['window_s'] / small['window_s']:.2f}  "
            f"(t{large['devices']}/t{small['devices']}; linear = {large['devices'] / small['devices']:g}; "
            f"{normalised:.2f} with each window measured in its floors)"
        )
    final = max(results, key=lambda r: r["devices"])
    print(
        f"rotations_per_s={final['rotations_per_s']:.1f} overhead_vs_floor={final['overhead_vs_floor']:.2f}"
    )


def file_creation_cost(directory: Path, samples: int = 300) -> float:
    """CPU seconds to create one (empty) file in `directory`, measured."""
    probe = directory / "create-probe"
    probe.mkdir()
    started = time.process_time()
    for i in range(samples):
        os.close(os.open(probe / str(i), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
    cost = (time.process_time() - started) / samples
    shutil.rmtree(probe)
    return cost


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000, help="fleet size (default 1,000)")
    parser.add_argument("--sizes", help="comma-separated sizes, e.g. 200,2000: also prints scaling_ratio")
    parser.add_argument("--key-algorithm", default="ECDSA-P256")
    parser.add_argument("--signing-algorithm", help="default: ECDSA-WITH-SHA256 / SHA256WITHRSA by family")
    parser.add_argument(
        "--threads", type=int, default=8, help="fleet reactor threads (default 8, as the demo)"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="engine on a thread of this process (the demo)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on connecting and on the job (s)")
    parser.add_argument("--state-timeout", type=float, default=30.0, help="agents' per-state timeout (s)")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=DEFAULT_MAX_IN_FLIGHT,
        help=f"the engine's admission limit (default {DEFAULT_MAX_IN_FLIGHT}; 0 = none, every execution at once)",
    )
    parser.add_argument("--floor-samples", type=int, default=300)
    parser.add_argument(
        "--work-dir", help="where the fleet's devices and the engine's data go (default: the temp directory)"
    )
    parser.add_argument("--profile", help="directory for py-spy raw profiles of engine and fleet")
    parser.add_argument(
        "--profile-gil", action="store_true", help="profile only the thread holding the GIL (Python CPU)"
    )
    parser.add_argument("--profile-native", action="store_true", help="profile all threads with C frames")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per size")
    args = parser.parse_args()
    if args.signing_algorithm is None:
        args.signing_algorithm = (
            "ECDSA-WITH-SHA256" if args.key_algorithm.startswith("ECDSA") else "SHA256WITHRSA"
        )
    return args


def main() -> int:
    args = parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [args.devices]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("certrotator").setLevel(logging.ERROR)  # failures show up in the report
    relax_gc()  # as `certrotator local up` does for the engine: this process runs the fleet
    limit = raise_open_files_limit(4 * max(sizes) + 1024)
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, open files limit {limit}")

    key_algorithm = crypto.parse_key_algorithm(args.key_algorithm)
    signing = crypto.parse_signing_algorithm(args.signing_algorithm)
    crypto.check_family(key_algorithm, signing)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="certrotator-bench-", dir=args.work_dir) as tmp:
        create_us = file_creation_cost(Path(tmp)) * 1e6
        print(
            f"work directory {tmp}: creating a file costs {create_us:.1f} us of CPU "
            "(a rotation's durable writes create 6 files per device; on the development machine this swings "
            "between ~8 and ~360 us with what the file system went through just before)"
        )

        # The machine's speed drifts (shared host): the floor is measured right before and right after
        # each fleet run, and the rotation is compared with the median of those, not a distant one.
        def floors(n: int) -> list[Floor]:
            return [measure_floor(key_algorithm, signing, args.floor_samples, Path(tmp)) for _ in range(n)]

        before = floors(2)
        print_floor(median_floor(before), key_algorithm.value, signing.value)
        io = measure_credential_io(key_algorithm, signing, Path(tmp), 200, args.threads)
        print(
            f"\n== device credential writes per rotation, alone (not in the floor): {io.fsyncs} fsyncs, "
            f"{io.cpu_s * 1000:.2f} ms CPU, {io.wall_s * 1000:.1f} ms wall; "
            f"{io.parallel_per_s:.0f} rotations/s of this I/O with {io.threads} threads"
        )
        for size in sizes:
            work = Path(tmp) / f"fleet-{size}"
            work.mkdir()
            run = rotate_fleet(args, size, work)
            after = floors(2)
            floor = median_floor(before + after)
            print(
                f"\nfloor before / after this run: {median_floor(before).total * 1000:.3f} / "
                f"{median_floor(after).total * 1000:.3f} ms; compared with their median, {floor.total * 1000:.3f} ms"
            )
            before = after
            results.append(print_run(run, floor))
            if args.json:
                print(json.dumps(results[-1]))
            shutil.rmtree(work, ignore_errors=True)
    print()
    print_totals(results)
    return (
        0
        if all(r["succeeded"] == r["verified"] == r["devices"] and not r["problems"] for r in results)
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
