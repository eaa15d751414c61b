"""Operations shared by the running engine and the CLI working on a stopped engine's database."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from certrotator.local.jobs import DEFAULT_CONFIG, DEFAULT_TEMPLATE, JobConfig, JobError, JobStore
from certrotator.local.registry import LocalRegistry, RegistryError
from certrotator.protocol import is_rotation_document


@dataclass(frozen=True, slots=True)
class JobRequest:
    """Everything that creates a rotation job on the local IoT Core: the one record the engine, its admin
    endpoint, the CLI and the engine handles pass around (its JSON form crosses the admin endpoint)."""

    job_id: str
    things: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    template: str = DEFAULT_TEMPLATE
    max_per_minute: int | None = None
    in_progress_timeout_minutes: float | None = None
    unlimited_rollout: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "things": list(self.things), "groups": list(self.groups)}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> JobRequest:
        """Parse the admin endpoint's form; a wrong type is a JobError naming the field."""

        def names(key: str) -> tuple[str, ...]:
            value = body.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise JobError("InvalidRequest", f"create_job: {key!r} must be a list of names")
            return tuple(value)

        job_id, template = body.get("job_id"), body.get("template", DEFAULT_TEMPLATE)
        rate, timeout = body.get("max_per_minute"), body.get("in_progress_timeout_minutes")
        if not isinstance(job_id, str) or not isinstance(template, str):
            raise JobError("InvalidRequest", "create_job: 'job_id' and 'template' must be strings")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int)):
            raise JobError("InvalidRequest", "create_job: 'max_per_minute' must be an integer")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
            raise JobError("InvalidRequest", "create_job: 'in_progress_timeout_minutes' must be a number")
        return cls(
            job_id,
            names("things"),
            names("groups"),
            template,
            rate,
            timeout,
            bool(body.get("unlimited_rollout")),
        )


def resolve_targets(registry: LocalRegistry, things: Sequence[str], groups: Sequence[str]) -> list[str]:
    """Snapshot targets: named things plus the current members of named groups, each once."""
    resolved: list[str] = []
    for thing in things:
        if not registry.thing_exists(thing):
            raise RegistryError(f"thing {thing!r} does not exist")
        resolved.append(thing)
    for group in groups:
        resolved.extend(registry.group_members(group))
    return list(dict.fromkeys(resolved))


def job_config(base: JobConfig, request: JobRequest) -> JobConfig:
    """A template's configuration with a job's overrides (a flat rate replaces the exponential one)."""
    config = base
    if request.unlimited_rollout:
        config = replace(config, max_per_minute=None, base_rate_per_minute=None)
    elif request.max_per_minute is not None:
        config = replace(config, max_per_minute=request.max_per_minute, base_rate_per_minute=None)
    if request.in_progress_timeout_minutes is not None:
        config = replace(config, in_progress_timeout_s=request.in_progress_timeout_minutes * 60.0)
    return config


def create_job(registry: LocalRegistry, store: JobStore, request: JobRequest) -> None:
    """Create the job in the database; a running engine then schedules its rollout (`LocalIoTCore.create_job`),
    a stopped one does on start."""
    found = store.template(request.template)
    if found is None:
        raise JobError("ResourceNotFound", f"job template {request.template!r} does not exist")
    document, base = found
    targets = [f"thing/{t}" for t in request.things] + [f"thinggroup/{g}" for g in request.groups]
    things = resolve_targets(registry, request.things, request.groups)
    config = job_config(base, request)
    if config.in_progress_timeout_s is None and is_rotation_document(document):
        # An IN_PROGRESS rotation that nobody finishes would stay the thing's head execution, and block
        # its later jobs, for ever: every rotation job ends by a timeout (the default template's).
        config = replace(config, in_progress_timeout_s=default_in_progress_timeout_s(store))
    store.create_job(request.job_id, document, things, config, targets)


def default_in_progress_timeout_s(store: JobStore) -> float:
    """The default template's in-progress timeout, or the seed's (5 minutes) if that template has none."""
    template = store.template(DEFAULT_TEMPLATE)
    timeout_s = template[1].in_progress_timeout_s if template is not None else None
    return timeout_s if timeout_s is not None else float(DEFAULT_CONFIG.in_progress_timeout_s or 300.0)
