"""The failure policy: what happens when an actor of each role dies, in one place.

    role          kind       who heals it   how
    interpreter   stateless  Ray            restarted in place (max_restarts); a call lost with it, or
                                            one that met a crashed zygote, is retried on another pool
    scorer        stateless  Ray            the same; a verdict lost to a crashed math-verify worker
                                            is retried (a genuine deadline stays a TIMEOUT verdict)
    generator     generator  the driver     its in-flight groups are released and their prompts
                                            re-admitted; restarted under the same name, sent the
                                            current {version, weights, budget}, admitted again only
                                            once it echoes the publication's fingerprint
    learner rank  stateful   the driver     the run's actors are restarted and the run resumes from
    buffer                                  the latest consistent checkpoint, up to
    scheduler                               recovery.max_recoveries times

An infrastructure fault never becomes training data: when retries are exhausted the adapters raise
`InfraFault`, and the trajectory it hit is dropped with reason `infra` (counted, never scored).

This module holds the table (`RAY_RESTARTS`, `restart_options`), the test for "this exception is
the infrastructure's, not the model's" (`is_infra_error`) and the two retrying adapters a rollout
worker talks through (`ReplicatedInterpreter`, `ReplicatedScorer`). The driver's side (generator
healing, automatic resume, the conservation check, the watchdog) is in control/trainer.py.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from enum import StrEnum
from typing import Any

from cir_actors.config import Config
from cir_actors.types import ExecResult, InfraFault, Verdict

log = logging.getLogger(__name__)

INTERPRETER_CRASHED = "InterpreterCrashed"
"""The `ExecResult.error` of a call whose zygote died under it (an infrastructure fault)."""


class Kind(StrEnum):
    STATELESS = "stateless"
    GENERATOR = "generator"
    STATEFUL = "stateful"


ROLE_KIND: dict[str, Kind] = {
    "interpreter": Kind.STATELESS,
    "scorer": Kind.STATELESS,
    "generator": Kind.GENERATOR,
    "learner": Kind.STATEFUL,
    "buffer": Kind.STATEFUL,
    "scheduler": Kind.STATEFUL,
}


def restart_options(role: str, cfg: Config) -> dict[str, int]:
    """Ray's max_restarts / max_task_retries for an actor of `role`.

    Stateless roles are restarted by Ray and their calls retried by Ray on the new incarnation
    (interpreter calls only without sessions: a session's variables die with its pool, so such a call
    must fail and be judged by `ReplicatedInterpreter`). A generator is not restarted by Ray: the
    driver must first release its in-flight groups, then it restarts it. Stateful roles are never
    restarted alone: the driver resumes the whole run from a consistent checkpoint.
    """
    kind = ROLE_KIND[str(role)]
    if kind is Kind.STATELESS:
        retries = 0 if (str(role) == "interpreter" and cfg.interpreter.sessions) else cfg.recovery.call_retries
        return {"max_restarts": cfg.recovery.stateless_max_restarts, "max_task_retries": retries}
    return {"max_restarts": 0, "max_task_retries": 0}


def is_infra_error(e: BaseException) -> bool:
    """True for failures of the system (an actor or object gone), not of what the model wrote."""
    import ray.exceptions as rex

    return isinstance(
        e,
        InfraFault
        | rex.RayActorError
        | rex.ActorUnavailableError
        | rex.ObjectLostError
        | rex.OwnerDiedError
        | rex.WorkerCrashedError
        | rex.GetTimeoutError
        | TimeoutError,
    )


async def _health(handle: Any) -> str:
    """A pool's `health()` answer for a warning, or why there is none (within 5 s)."""
    try:
        return str(await asyncio.wait_for(_invoke(handle, "health"), 5.0))
    except Exception as e:  # noqa: BLE001 - a diagnostic: any failure is the answer
        return f"no answer ({type(e).__name__})"


class ReplicatedInterpreter:
    """The Interpreter protocol over several interpreter pool actors (the preferred one first), or
    over local InterpreterPool objects (an evaluation without Ray): the same deadline and retries.

    A call that fails for infrastructure reasons (the pool actor died or is restarting, or the
    zygote crashed under the call) is retried on the next pool, up to `retries` times with a short
    back-off; then `InfraFault` is raised. Calls in a session stay on the session's pool, and a
    session whose pool failed cannot be retried anywhere (its variables are gone): InfraFault.
    `faults` counts the infrastructure faults met (retried or not).
    """

    def __init__(self, handles: list[Any], *, retries: int = 2, timeout_s: float = 300.0) -> None:
        if not handles:
            raise ValueError("ReplicatedInterpreter needs at least one interpreter pool")
        self._handles = list(handles)
        self._retries = retries
        self._timeout_s = timeout_s
        self._sessions: dict[str, int] = {}
        self._next = itertools.count()
        self.faults = 0

    def replace(self, handles: list[Any]) -> None:
        """Call these pools from now on (a resume restarted them); sessions on the old ones are gone."""
        self._handles, self._sessions = list(handles), {}

    async def run_async(self, code: str, *, timeout_s: float | None = None, session: str | None = None) -> ExecResult:
        deadline = self._timeout_s if timeout_s is None else timeout_s + self._timeout_s
        first = self._sessions.setdefault(session, next(self._next)) if session else next(self._next)
        last: str = ""
        for attempt in range(self._retries + 1):
            handle = self._handles[(first + attempt) % len(self._handles)]
            try:
                result = await asyncio.wait_for(
                    _invoke(handle, "run_async", code, timeout_s=timeout_s, session=session), deadline
                )
            except Exception as e:
                if not is_infra_error(e):
                    raise
                last = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if isinstance(e, TimeoutError):
                    last = (f"no answer in {deadline:.3g} s (timeout + recovery.interpreter_call_s); "
                            f"the pool's health then: {await _health(handle)}")
            else:
                if result.error != INTERPRETER_CRASHED:
                    return result
                last = INTERPRETER_CRASHED
            self.faults += 1
            log.warning("interpreter call failed for an infrastructure reason (attempt %d of %d): %s",
                        attempt + 1, self._retries + 1, last)
            if session is not None:
                raise InfraFault(f"interpreter session {session} lost its pool ({last}); its state cannot be rebuilt")
            await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
        raise InfraFault(f"interpreter call failed {self._retries + 1} times for infrastructure reasons ({last})")

    async def close_session_async(self, session: str) -> None:
        index = self._sessions.pop(session, None)
        if index is None:
            return
        try:
            await asyncio.wait_for(
                _invoke(self._handles[index % len(self._handles)], "close_session_async", session), 30.0
            )
        except Exception as e:
            if not is_infra_error(e):
                raise


class ReplicatedScorer:
    """Verdicts from several scorer actors, round-robin; a verdict lost to a dead actor or a crashed
    checker (the scorer raises InfraFault) is retried on the next one, then InfraFault is raised."""

    def __init__(self, handles: list[Any], *, retries: int = 2, timeout_s: float = 120.0) -> None:
        if not handles:
            raise ValueError("ReplicatedScorer needs at least one scorer")
        self._handles = list(handles)
        self._retries = retries
        self._timeout_s = timeout_s
        self._next = itertools.count()
        self.faults = 0

    def replace(self, handles: list[Any]) -> None:
        """Call these scorers from now on (a resume restarted them)."""
        self._handles = list(handles)

    async def score(self, response: str, gold: str) -> Verdict:
        first = next(self._next)
        last = ""
        for attempt in range(self._retries + 1):
            handle = self._handles[(first + attempt) % len(self._handles)]
            try:
                return await asyncio.wait_for(_invoke(handle, "score_async", response, gold), self._timeout_s)
            except Exception as e:
                if not is_infra_error(e):
                    raise
                last = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.faults += 1
            await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
        raise InfraFault(f"no verdict after {self._retries + 1} attempts ({last})")


async def _invoke(target: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """`target.method(*args, **kwargs)`'s result, whether `target` is a Ray actor handle or a local
    object (an in-process InterpreterPool: an evaluation without Ray), so one adapter puts the same
    deadline and retries on both."""
    fn = getattr(target, method)
    if hasattr(fn, "remote"):
        return await fn.remote(*args, **kwargs)
    result = fn(*args, **kwargs)
    return await result if inspect.isawaitable(result) else result
