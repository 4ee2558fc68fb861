"""JSON over HTTP for marketplace APIs: retries, per-endpoint spacing, errors in our tree.

Every wait (backoff, spacing) goes through the injected `Clock`, so tests run retries in
virtual time. Only the per-request timeout is real time: it bounds a socket, not a plan.
The API key goes into one header and nowhere else: not into errors, not into logs.

Two kinds of call. Background calls (polls) wait their endpoint's turn (`Spacer`) and back
off 1..60 s. Urgent calls (a local request waits on them) skip the spacing wait and retry
a 429 or a failure within a second. A `deadline` (the scheduler's stop) makes every call
urgent and bounds them all: no try starts after it, none waits past it, and each request's
timeout is cut to what is left.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Protocol
from urllib.parse import quote_plus

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_exponential_jitter,
    wait_random,
)
from tenacity.stop import stop_base
from yarl import URL

from broker.clock import Clock
from broker.errors import (
    ProviderAuthError,
    ProviderError,
    ProviderNotFound,
    ProviderRejected,
    ProviderUnavailable,
)

log = logging.getLogger(__name__)

Query = Sequence[tuple[str, object]]
# Checks a decoded 200 answer inside the retry loop: raises `ProviderUnavailable` to retry it
# (an API that answers errors as 200 with a code in the body), another `ProviderError` to
# fail. Takes the answer and "METHOD path".
AnswerCheck = Callable[[Any, str], None]

# The longest pause between two tries of an urgent call: a held request is waiting.
URGENT_MAX_BACKOFF = 1.0


def encode_query(query: Query) -> str:
    """Vast's own client: strings as they are, everything else JSON-encoded, then
    `quote_plus` (so `machid=null`, `machine_ids=%5B123%5D`)."""
    return "&".join(
        f"{key}={quote_plus(value if isinstance(value, str) else json.dumps(value))}"
        for key, value in query
    )


def platform_message(text: str) -> str:
    """The platform's own words from an error body: JSON `msg`/`error`, else the text."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("msg", "message", "error", "detail"):
            value = data.get(key)
            if isinstance(value, str) and value:
                return value
    text = " ".join(text.split())
    return text[:300] if text else "(no message)"


class ApiSection(Protocol):
    """What `provider_api` reads from a marketplace section (`sections.ProviderKey` and
    the HTTP settings every HTTP marketplace declares)."""

    @property
    def base_url(self) -> str: ...
    @property
    def request_spacing(self) -> timedelta: ...
    @property
    def request_timeout(self) -> timedelta: ...
    @property
    def retry_attempts(self) -> int: ...
    def api_key(self) -> str | None: ...
    def key_source(self) -> str: ...


def provider_api(
    platform: str,
    config: ApiSection,
    clock: Clock,
    api_key: str | None,
    retry_attempts: int | None,
    *,
    auth_header: str = "Authorization",
    auth_scheme: str = "Bearer ",
    check_answer: AnswerCheck | None = None,
    spacing_floor: float = 0.0,
) -> JsonApi:
    """The authenticated client for a provider section: key, spacing, timeout and retries.
    `auth_header` and `auth_scheme` say how the key is sent (Clore.ai: `auth: KEY`);
    `spacing_floor` is the gap even an urgent call leaves (see `Spacer`)."""
    key = api_key if api_key is not None else config.api_key()
    if not key:
        raise ProviderError("provider.api_key: no api_key_env or api_key_file is set")
    return JsonApi(
        platform=platform,
        base_url=config.base_url,
        api_key=key,
        key_source=config.key_source(),
        clock=clock,
        spacing=config.request_spacing.total_seconds(),
        timeout=config.request_timeout.total_seconds(),
        attempts=retry_attempts or config.retry_attempts,
        auth_header=auth_header,
        auth_scheme=auth_scheme,
        check_answer=check_answer,
        spacing_floor=spacing_floor,
    )


class _StopAtDeadline(stop_base):
    """Stop retrying when the next try would start past the deadline."""

    def __init__(self, past: Callable[[RetryCallState], bool]) -> None:
        self._past = past

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._past(retry_state)


class Spacer:
    """At most one call per `spacing` seconds on each endpoint, measured on the Clock.

    Platforms rate-limit per endpoint; waiting our turn is cheaper than a 429 and its
    backoff. Calls to one endpoint queue behind a lock in the order they came.
    """

    def __init__(self, clock: Clock, spacing: float, floor: float = 0.0) -> None:
        self._clock = clock
        self._spacing = spacing
        # The gap the platform refuses to go under even for an urgent call (Clore.ai: one
        # request a second per key, answered "over the limit" otherwise). 0 = none.
        self._floor = floor
        self._next: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def last_call(self, endpoint: str) -> float | None:
        """When this endpoint was last called (Clock monotonic seconds); None = never."""
        return self._last.get(endpoint)

    async def wait(
        self, endpoint: str, *, urgent: bool = False, deadline: float | None = None
    ) -> bool:
        """Wait this endpoint's turn; False (without waiting) when the turn comes after
        `deadline`. An urgent call (a local request waits on it) goes at once, or once the
        platform's floor has passed, and the background calls after it keep their spacing
        from it."""
        if self._spacing <= 0 or urgent:
            last = self._last.get(endpoint)
            if self._floor > 0 and last is not None:
                turn = last + self._floor
                if deadline is not None and turn > deadline:
                    return False
                if turn > self._clock.monotonic():
                    await self._clock.sleep_until(turn)
            now = self._clock.monotonic()
            self._last[endpoint] = now
            self._next[endpoint] = now + self._spacing
            return True
        lock = self._locks.setdefault(endpoint, asyncio.Lock())
        async with lock:
            due = self._next.get(endpoint)
            if due is not None and due > self._clock.monotonic():
                await self._clock.sleep_until(due)
            now = self._clock.monotonic()
            self._last[endpoint] = now
            self._next[endpoint] = now + self._spacing
        return True


class JsonApi:
    """One platform's HTTP API. `start()` before use, `close()` after."""

    def __init__(
        self,
        *,
        platform: str,
        base_url: str,
        api_key: str,
        key_source: str,
        clock: Clock,
        spacing: float,
        timeout: float,
        attempts: int,
        max_backoff: float = 60.0,
        user_agent: str = "gpu-broker",
        auth_header: str = "Authorization",
        auth_scheme: str = "Bearer ",
        check_answer: AnswerCheck | None = None,
        spacing_floor: float = 0.0,
    ) -> None:
        self.platform = platform
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        self._key_source = key_source
        self._clock = clock
        self._spacer = Spacer(clock, spacing, spacing_floor)
        self._timeout = timeout
        self._attempts = attempts
        self._max_backoff = max_backoff
        self._user_agent = user_agent
        self._auth_header = auth_header
        self._auth_scheme = auth_scheme
        self._check_answer = check_answer
        self._session: aiohttp.ClientSession | None = None
        # Clock monotonic seconds bounding every call (the scheduler's stop); None = none.
        self.deadline: float | None = None

    def __repr__(self) -> str:  # never show the key
        return f"JsonApi({self.platform!r}, {self._base!r})"

    async def start(self) -> None:
        if self._session is None:
            # No cap per host: a background read that stalls at the platform must not
            # hold a connection an urgent unlist needs (each call gets its own).
            connector = aiohttp.TCPConnector(limit=100, limit_per_host=0)
            self._session = aiohttp.ClientSession(connector=connector)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def last_call(self, endpoint: str) -> float | None:
        """When this rate-limit bucket was last called; None = never (see `Spacer`)."""
        return self._spacer.last_call(endpoint)

    def _left(self) -> float | None:
        """Seconds until the deadline (None: no deadline)."""
        if self.deadline is None:
            return None
        return self.deadline - self._clock.monotonic()

    def _past_deadline(self, state: RetryCallState) -> bool:
        left = self._left()
        return left is not None and left <= state.upcoming_sleep

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Query = (),
        body: object = None,
        endpoint: str | None = None,
        urgent: bool = False,
    ) -> Any:
        """One call, retried while temporary; returns the decoded JSON answer.

        `endpoint` names the rate-limit bucket (default: method and path without query).
        `urgent`: a local request waits on this call: no spacing wait, and a 429 or a
        failure is retried within a second or so rather than with the background backoff.
        With a `deadline` set every call is urgent, and none retries or waits past it.
        """
        bucket = endpoint or f"{method} {path}"
        urgent = urgent or self.deadline is not None
        backoff = (
            # 0.1, 0.2, 0.4 ... s, plus up to 0.1 s so two held requests do not collide.
            wait_exponential(multiplier=0.1, max=URGENT_MAX_BACKOFF) + wait_random(0, 0.1)
            if urgent
            else wait_exponential_jitter(initial=1, max=self._max_backoff, jitter=1)
        )
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts) | _StopAtDeadline(self._past_deadline),
            wait=backoff,
            retry=retry_if_exception_type(ProviderUnavailable),
            sleep=self._clock.sleep,
            before_sleep=self._note_retry,
            reraise=True,
        )
        result: Any = None
        async for attempt in retrying:
            with attempt:
                if not await self._spacer.wait(bucket, urgent=urgent, deadline=self.deadline):
                    raise ProviderUnavailable(
                        f"{self.platform}: {method} {path} not sent: the platform's rate "
                        "limit allows it only after the stop deadline"
                    )
                result = await self._once(method, path, query, body)
        return result

    def _note_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.info(
            "%s: attempt %d failed (%s); retrying in %.1fs",
            self.platform, state.attempt_number, error, wait,
        )  # fmt: skip

    async def _once(self, method: str, path: str, query: Query, body: object) -> Any:
        if self._session is None:
            raise ProviderError(f"{self.platform}: client used before start()")
        url = self._base + path + (f"?{encode_query(query)}" if query else "")
        headers = {
            self._auth_header: f"{self._auth_scheme}{self._api_key}",
            "User-Agent": self._user_agent,
        }
        data: bytes | None = None
        # The official client sends a JSON body with every write, `{}` when empty.
        if method != "GET" or body is not None:
            data = json.dumps({} if body is None else body).encode()
            headers["Content-Type"] = "application/json"
        what = f"{method} {path}"
        timeout = self._timeout
        left = self._left()
        if left is not None:
            if left <= 0:
                raise ProviderUnavailable(
                    f"{self.platform}: {what} not sent: the stop deadline has passed"
                )
            timeout = min(timeout, left)
        try:
            async with self._session.request(
                method,
                URL(url, encoded=True),
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                status = response.status
                text = (await response.read()).decode("utf-8", errors="replace")
        except TimeoutError:
            raise ProviderUnavailable(
                f"{self.platform}: {what} timed out after {timeout:g}s"
            ) from None
        except aiohttp.ClientError as error:
            raise ProviderUnavailable(
                f"{self.platform}: {what} failed: {type(error).__name__}: {error}"
            ) from None
        if status == 429:
            raise ProviderUnavailable(
                f"{self.platform}: {what} rate limited (429): {platform_message(text)}"
            )
        if status >= 500:
            raise ProviderUnavailable(
                f"{self.platform}: {what} answered {status}: {platform_message(text)}"
            )
        if status in (401, 403):
            raise ProviderAuthError(
                f"{self.platform} refused the API key from {self._key_source} "
                f"({status}: {platform_message(text)})"
            )
        if status == 404:
            # Its own class: a delete answered 404 means the thing is already gone.
            raise ProviderNotFound(
                f"{self.platform} rejected {what} ({status}): {platform_message(text)}"
            )
        if status >= 400:
            raise ProviderRejected(
                f"{self.platform} rejected {what} ({status}): {platform_message(text)}"
            )
        try:
            answer = json.loads(text)
        except ValueError:
            # Seen from proxies in front of an API during incidents: temporary.
            raise ProviderUnavailable(
                f"{self.platform}: {what} answered {status} with something that is not "
                f"JSON: {text[:80]!r}"
            ) from None
        if self._check_answer is not None:
            self._check_answer(answer, what)
        return answer
