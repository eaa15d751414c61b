"""Which jobs are certificate-rotation jobs, remembered per Lambda container (or engine process).

The terminal rule forwards the end of *every* job execution in the account (it can no longer filter on
what the device wrote), so most events the terminal handler sees are other applications' jobs. A job's
document never changes, so one look at it per job and container is enough: later events of the same
job cost no API call at all (docs/reliability.md, "What an unrelated job's events cost").

Answers are kept for a while only (`ttl_s`): AWS IoT lets a deleted job's id be used again, by a job
that may be of the other kind.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from certrotator.protocol import is_rotation_document

DocumentLookup = Callable[[str, str], object | None]
"""(thing, job id) -> the job's document, or None if it cannot be found (job or execution deleted)."""

DEFAULT_TTL_S: Final = 600.0
DEFAULT_CAPACITY: Final = 4096  # job ids; a few hundred KB at most


class RotationJobs:
    """job id -> is it a rotation job, looked up through `lookup` and kept for `ttl_s` seconds."""

    def __init__(
        self,
        lookup: DocumentLookup,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._capacity = capacity
        self._clock = clock
        self._known: OrderedDict[str, tuple[bool, float]] = OrderedDict()
        self.lookups = 0  # how many times `lookup` was called (what the cache did not save)

    def cached(self, job_id: str) -> bool | None:
        """The remembered answer, without any lookup; None if there is none (or it expired)."""
        entry = self._known.get(job_id)
        if entry is None:
            return None
        answer, expires = entry
        if self._clock() >= expires:
            del self._known[job_id]
            return None
        self._known.move_to_end(job_id)
        return answer

    def is_rotation(self, thing: str, job_id: str) -> bool | None:
        """Whether the job is a rotation job; None if its document cannot be found (not remembered)."""
        answer = self.cached(job_id)
        if answer is not None:
            return answer
        self.lookups += 1
        document = self._lookup(thing, job_id)
        if document is None:
            return None
        answer = is_rotation_document(document)
        self._known[job_id] = (answer, self._clock() + self._ttl_s)
        self._known.move_to_end(job_id)
        while len(self._known) > self._capacity:
            self._known.popitem(last=False)
        return answer
