"""How the agent starts: which start-up failures are worth another try, and how long to wait between
tries. Pure: the agent (certrotator.device.agent) sleeps and counts, this module decides.

At start-up the agent recovers its key store (journal) and checks the credentials before it connects.
Some failures there pass by themselves -- a PKCS#11 token busy with another process (on a Greengrass
device the nucleus opens the same token as the component), or not plugged in yet -- and are retried
with capped exponential back-off and jitter, so that processes which failed together do not retry in
step. Anything else, and a transient failure that outlasts the tries, ends the agent process with a
non-zero status and the reason: systemd or the Greengrass nucleus restarts it, and a persistent fault
becomes visible as a unit or component that keeps failing, instead of a process that waits forever.
"""

from __future__ import annotations

from dataclasses import dataclass

from certrotator.device.keystores.base import TransientKeyStoreError

# Process exit statuses of a failed agent (sysexits.h), distinct from the Greengrass restart request (75).
STARTUP_FAILED_EXIT_CODE = 69  # EX_UNAVAILABLE: the credentials could not be made ready at start-up
AGENT_FAILED_EXIT_CODE = (
    70  # EX_SOFTWARE: an unexpected error while running; the journal makes a restart safe
)


@dataclass(frozen=True, slots=True)
class StartupRetry:
    """Tries of the start-up step (the first one included) and the back-off between them.

    Defaults: 8 tries, waits of 0.5, 1, 2, 4, 8, 10, 10 s before jitter (each wait is drawn from
    [w/2, w]): at most 35.5 s of waiting before the process gives up."""

    attempts: int = 8
    first_delay_s: float = 0.5
    max_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("start-up attempts must be at least 1")
        if not 0 < self.first_delay_s <= self.max_delay_s:
            raise ValueError("start-up delays must satisfy 0 < first_delay_s <= max_delay_s")

    def worst_case_wait_s(self) -> float:
        """The longest the waits between tries can add up to."""
        return sum(self._cap(failures) for failures in range(1, self.attempts))

    def _cap(self, failures: int) -> float:
        return float(min(self.first_delay_s * 2 ** (failures - 1), self.max_delay_s))


def is_transient(error: BaseException) -> bool:
    """Whether a start-up failure may pass by itself. Only what the key store says may pass, and the
    operating system's "try again" kinds; a configuration, journal or credential problem does not."""
    return isinstance(error, TransientKeyStoreError | BlockingIOError | InterruptedError | TimeoutError)


def retry_delay(policy: StartupRetry, failures: int, error: BaseException, jitter: float) -> float | None:
    """Seconds to wait before the next try, after `failures` failed tries (the last with `error`);
    None: give up. `jitter` in [0, 1] picks the wait within [cap/2, cap] (the caller draws it)."""
    if failures >= policy.attempts or not is_transient(error):
        return None
    cap = policy._cap(failures)
    return cap / 2 + cap / 2 * min(max(jitter, 0.0), 1.0)
