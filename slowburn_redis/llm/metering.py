"""One metered LLM call: reserve the estimate, keep the lease alive, settle exactly once.

How a call settles:

- success: commit the actual usage and cost (a lower actual frees capacity at once);
- a timeout (``litellm.Timeout``, ``TimeoutError``): commit at the estimate,
  outcome ``timeout`` (the provider may have billed);
- cancelled while the provider was working: commit at the estimate, outcome ``cancelled``;
- any other provider error: release (refund), outcome ``error``, unless the
  provider reported usage or tokens were already produced, which are then
  committed with outcome ``error``.

With ``headroom`` (`CallOptions`), a call that costs something is not
committed where it was admitted: its cost is charged anew, at settle time,
by an advisory acquire committed at once, and the admitted reservation is
then released (no ledger entry). The cost then sits in the window from
admission (as the estimate) until W after the call returned, so any window
of length W on the provider's own clock (which saw the call between the
two) holds only calls that were all in the budget's window when the last of
them was admitted: the provider-side window holds the limit too, whatever
the delay between admission and the provider. It costs one more script call
per call.

Settling is shielded from cancellation, so a cancelled caller still settles.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import structlog
from litellm.exceptions import Timeout as ProviderTimeout

from slowburn_redis.budget import Budget, Mode
from slowburn_redis.llm.estimate import CallEstimate
from slowburn_redis.llm.options import CallOptions
from slowburn_redis.llm.pricing import Price
from slowburn_redis.reservation import Reservation, Settlement

log = structlog.get_logger("slowburn_redis")


@dataclass(frozen=True)
class Usage:
    """Tokens a call consumed and what they cost; `reported` is False when they were counted locally."""

    input_tokens: int
    output_tokens: int
    usd: float
    reported: bool = True


def is_timeout(exc: BaseException) -> bool:
    """True for a provider or client timeout (not for a budget wait that ran out)."""
    return isinstance(exc, (TimeoutError, ProviderTimeout))


def reported_usage(source: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a litellm Usage, a dict, or an object carrying ``.usage``."""
    usage = getattr(source, "usage", source)
    if usage is None:
        return None
    prompt, completion = _field(usage, "prompt_tokens"), _field(usage, "completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    if prompt == 0 and completion == 0:
        return None
    return prompt, completion


def _field(source: Any, name: str) -> Any:
    return source.get(name) if isinstance(source, dict) else getattr(source, name, None)


class MeteredCall:
    """An admitted call: its reservation, estimate and price. Settle it with `succeed` or `fail`."""

    def __init__(
        self,
        reservation: Reservation,
        estimate: CallEstimate,
        price: Price,
        metadata: dict[str, Any],
        *,
        budget: Budget | None = None,
        headroom: bool = False,
    ):
        self.reservation = reservation
        self.estimate = estimate
        self.price = price
        self.metadata = metadata
        self.budget = budget
        self.headroom = headroom and budget is not None
        self._loop = asyncio.get_running_loop()
        self.started = self._loop.time()
        self._keeper: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def settled(self) -> bool:
        return self.reservation.settled

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop this call was admitted on: settle it there (`slowburn_redis.llm.bridge.run_on`)."""
        return self._loop

    def keep_lease(self, ttl: float, *, horizon: float = 3600.0) -> None:
        """Extend the lease every ttl/3 seconds until the call settles, for at most `horizon` seconds.

        A call longer than its lease keeps its slot; a call that is never
        settled (a lost callback) still lets its lease expire after `horizon`.
        """

        async def keeper() -> None:
            deadline = self._loop.time() + horizon
            while self._loop.time() < deadline:
                await asyncio.sleep(ttl / 3)
                try:
                    if not await self.reservation.extend(ttl):
                        return
                except Exception as exc:  # the next tick retries; a dead worker's lease simply expires
                    log.warning("lease.extend_failed", reservation=self.reservation.id, error=str(exc))

        self._keeper = asyncio.ensure_future(keeper())

    def _meta(self, extra: dict[str, Any] | None) -> dict[str, Any]:
        meta = {
            "admitted_ms": self.reservation.admitted_at_ms,
            "est_input_tokens": self.estimate.input_tokens,
            "est_output_tokens": self.estimate.output_tokens,
            "latency_ms": round((self._loop.time() - self.started) * 1000),
        }
        meta.update(self.metadata)
        if extra:
            meta.update(extra)
        return meta

    async def succeed(
        self, usage: Usage, *, outcome: str | None = None, extra: dict[str, Any] | None = None
    ) -> Settlement:
        """Commit the actual usage and cost (outcome ``ok``, or ``overrun`` when it exceeded the estimate)."""
        if not usage.reported:
            extra = {**(extra or {}), "usage": "counted"}
        if self.headroom:
            return await self._settle(self._moved(usage, outcome, self._meta(extra)))
        return await self._settle(
            self.reservation.commit(
                usd=usage.usd,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                model=self.estimate.model,
                outcome=outcome,
                metadata=self._meta(extra),
            )
        )

    async def fail(
        self, exc: BaseException, *, produced: Usage | None = None, extra: dict[str, Any] | None = None
    ) -> Settlement:
        """Settle a call that raised `exc` (see the module docstring for the rules)."""
        extra = {**(extra or {}), "error": type(exc).__name__}
        if is_timeout(exc) or isinstance(exc, asyncio.CancelledError):
            outcome = "timeout" if is_timeout(exc) else "cancelled"
            meta = self._meta(extra)
            if self.headroom:
                return await self._settle(self._moved(None, outcome, meta))
            return await self._settle(
                self.reservation.commit(model=self.estimate.model, outcome=outcome, metadata=meta)
            )
        if produced is None:
            tokens = reported_usage(exc)
            if tokens is not None:
                produced = Usage(tokens[0], tokens[1], self.price.cost(*tokens))
        if produced is not None:
            return await self.succeed(produced, outcome="error", extra=extra)
        # A release writes no model field: name the model in the metadata for the report.
        meta = {**self._meta(extra), "model": self.estimate.model}
        return await self._settle(self.reservation.release(outcome="error", metadata=meta))

    async def _moved(self, usage: Usage | None, outcome: str | None, meta: dict[str, Any]) -> Settlement:
        """Charge the cost now (advisory acquire, committed at once), then release the admission."""
        assert self.budget is not None
        est = self.estimate
        if usage is None:
            usage = Usage(est.input_tokens, est.output_tokens, est.usd)
        r = self.reservation
        moved = await self.budget.acquire(
            r.tenant,
            r.agent,
            usd=usage.usd,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            tokens=usage.input_tokens + usage.output_tokens,
            requests=1,
            mode="advisory",
            model=est.model,
        )
        settlement = await moved.commit(
            usd=usage.usd,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            model=est.model,
            outcome=outcome,
            metadata={**meta, "headroom": True, "admitted_as": r.id},
        )
        await r.release()
        return settlement

    async def _settle(self, settle: Any) -> Settlement:
        """Run a commit or release to the end even if the caller is cancelled meanwhile.

        A settlement that fails (Redis unreachable) is logged, not raised: the
        call's own result or error matters more, and the lease expiry keeps
        the estimate charged.
        """
        if self._keeper is not None:
            self._keeper.cancel()
        task: asyncio.Task[Settlement] = asyncio.ensure_future(settle)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await task  # cancelled while settling: finish the settlement, then let the cancel through
            raise
        except Exception as exc:
            log.warning("llm.settle_failed", reservation=self.reservation.id, error=str(exc))
            return Settlement(False, "unsettled")


async def open_call(
    budget: Budget,
    tenant: str,
    agent: str | None,
    estimate: CallEstimate,
    price: Price,
    *,
    options: CallOptions | None = None,
    metadata: dict[str, Any],
    wait_timeout: float | None = None,
    priority: int = 0,
    mode: Mode = "wait",
) -> MeteredCall:
    """Acquire the estimate (usd, tokens, input/output tokens, one request, one concurrency slot).

    `options` (else the loose `wait_timeout`, `priority`, `mode`) say how to
    wait; the acquire runs on the running loop, which must own `budget`.
    """
    if options is None:
        options = CallOptions(mode=mode, wait_timeout=wait_timeout, priority=priority)
    reservation = await budget.acquire(
        tenant,
        agent,
        usd=estimate.usd,
        input_tokens=estimate.input_tokens,
        output_tokens=estimate.output_tokens,
        tokens=estimate.tokens,
        requests=1,
        timeout=options.wait_timeout,
        priority=options.priority,
        mode=options.mode,
        model=estimate.model,
    )
    return MeteredCall(reservation, estimate, price, metadata, budget=budget, headroom=options.headroom)
