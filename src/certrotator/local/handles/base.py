"""The one interface to a running local IoT Core from ordinary (non-async) code: what the simulated
fleet, the demo and the benchmarks use, whether the engine runs on a thread of this process
(`handles.thread.EngineThread`) or in its own process (`handles.process.RemoteEngine`).

Named operations, typed results: a driver provisions devices, creates jobs, reads executions, the
registry and the live connections, and waits for a condition; it never sees the engine's database,
stores or event loop. How each handle gets there is its own business (the thread handle runs the read
on the engine's loop; the process handle reads the shared database and calls the admin endpoint).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from certrotator.local.ca import LocalCa
from certrotator.local.jobs import Execution, JobStore
from certrotator.local.operations import JobRequest
from certrotator.local.policy import Connection
from certrotator.local.provision import Provisioned, ProvisionRequest, provision
from certrotator.local.registry import LocalRegistry

T = TypeVar("T")


class EngineRefused(RuntimeError):
    """The engine refused an operation (a job that exists, a target that does not...); the text says
    why. The same exception from either handle, whatever the engine's own error type or transport."""


@dataclass(frozen=True, slots=True)
class Stores:
    """The engine's durable state, as a handle reaches it (never handed out of local/)."""

    registry: LocalRegistry
    jobs: JobStore
    ca: LocalCa


class EngineHandle(ABC):
    """A running local IoT Core. Every method may be called from any thread, one call at a time per
    caller; reads are consistent per call (not across calls)."""

    # ------------------------------------------------------------------- what each handle provides

    @property
    @abstractmethod
    def host(self) -> str:
        """The broker's address, as devices should dial it."""

    @property
    @abstractmethod
    def port(self) -> int:
        """The broker's MQTT (mutual TLS) port."""

    @property
    @abstractmethod
    def data_dir(self) -> Path:
        """The engine's data directory (a fault plan's log is there: local.fault_hooks)."""

    @abstractmethod
    def fault_released(self, thing: str) -> None:
        """Tell the engine's fault plan that the device it asked to be killed is dead."""

    @abstractmethod
    def create_job(self, request: JobRequest) -> None:
        """Create a rotation job; EngineRefused if the engine will not (e.g. the job id is taken)."""

    @abstractmethod
    def connections(self) -> list[Connection]:
        """The broker's live connections: client id, the certificate it authenticated with, its thing."""

    @abstractmethod
    def wait_for(self, condition: Callable[[], bool], timeout_s: float, tick_s: float | None = None) -> bool:
        """Wait until `condition()` (which may call this handle) holds: re-checked when an execution
        changes where the handle can tell, and at least every `tick_s` (or the handle's poll interval).
        False if it still does not hold after `timeout_s`."""

    @abstractmethod
    def _with_stores(self, fn: Callable[[Stores], T]) -> T:
        """Run `fn` against the engine's stores, serialised with the engine's own use of them."""

    # ------------------------------------------------------------------------ built on the above

    def root_ca(self) -> Path:
        """The root CA file devices trust for the broker (the one provisioning copies)."""
        return self._with_stores(lambda s: s.ca.files.root_ca)

    def provision(self, request: ProvisionRequest) -> Provisioned:
        """Provision a thing as `certrotator local provision` does, pointed at this engine's broker."""
        host, port = self.host, self.port
        return self._with_stores(lambda s: provision(s.registry, s.ca, request, host, port))

    def executions(self, job_id: str) -> list[Execution]:
        """The job's released executions (targets the rollout has not reached yet are not here)."""
        return self._with_stores(lambda s: s.jobs.executions(job_id))

    def status_counts(self, job_id: str) -> dict[str, int]:
        """Executions of the job by status, targets not yet rolled out counted as PENDING_ROLLOUT."""
        return self._with_stores(lambda s: s.jobs.status_counts(job_id))

    def job_created_at(self, job_id: str) -> float | None:
        """When the job was created (epoch seconds), None if there is no such job."""

        def read(s: Stores) -> float | None:
            job = s.jobs.job(job_id)
            return None if job is None else float(job["created"])

        return self._with_stores(read)

    def attached_certificates(self, things: Collection[str]) -> dict[str, list[str]]:
        """The ids of the certificates attached to each of `things`."""
        return self._with_stores(lambda s: {t: s.registry.thing_principals(t) for t in things})

    def certificate_ids(self) -> list[str]:
        """The id of every certificate in the registry, whatever its status or attachment."""
        return self._with_stores(lambda s: [c.certificate_id for c in s.registry.certificates()])

    def unattached_certificates(self) -> dict[str, str]:
        """Certificates (id -> PEM) that no thing has attached, whatever their status: orphans unless
        something is about to attach them."""

        def read(s: Stores) -> dict[str, str]:
            attached = {p for thing in s.registry.things() for p in s.registry.thing_principals(thing)}
            return {
                c.certificate_id: c.pem for c in s.registry.certificates() if c.certificate_id not in attached
            }

        return self._with_stores(read)

    def notifications(self, job_id: str | None = None) -> list[dict[str, Any]]:
        """Notifications sent (oldest first), only those about `job_id` if given."""
        notes = self._with_stores(lambda s: s.registry.notifications())
        return [n for n in notes if job_id is None or n.get("jobId") == job_id]
