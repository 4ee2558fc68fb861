"""JSON over HTTP for marketplace APIs: retries, per-endpoint spacing, errors in our tree.

Every wait (backoff, spacing) goes through the injected `Clock`, so tests run retries in
virtual time. Only the per-request timeout is real time: it bounds a socket, not a plan.
The API key goes into one header and nowhere else: not into errors, not into logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote_plus

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)
from yarl import URL

from broker.clock import Clock
from broker.config import RunpodProvider, VastProvider
from broker.errors import (
    ProviderAuthError,
    ProviderError,
    ProviderNotFound,
    ProviderRejected,
    ProviderUnavailable,
)

log = logging.getLogger(__name__)

Query = Sequence[tuple[str, object]]

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


def provider_api(
    platform: str,
    config: VastProvider | RunpodProvider,
    clock: Clock,
    api_key: str | None,
    retry_attempts: int | None,
) -> JsonApi:
    """The authenticated client for a provider section: key, spacing, timeout and retries."""
    key = api_key if api_key is not None else config.api_key()
    if not key:
        raise ProviderError("provider.api_key: no api_key_env or api_key_file is set")
    return JsonApi(
        platform=platform,
        base_url=config.base_url,
        api_key=key,
        key_source=key_source(config),
        clock=clock,
        spacing=config.request_spacing.total_seconds(),
        timeout=config.request_timeout.total_seconds(),
        attempts=retry_attempts or config.retry_attempts,
    )


def key_source(config: VastProvider | RunpodProvider) -> str:
    """Where the key came from, for an error a user can act on. Never the key itself."""
    if config.api_key_file is not None:
        return f"the file {config.api_key_file} (provider.api_key_file)"
    return f"the environment variable {config.api_key_env} (provider.api_key_env)"


class Spacer:
    """At most one call per `spacing` seconds on each endpoint, measured on the Clock.

    Platforms rate-limit per endpoint; waiting our turn is cheaper than a 429 and its
    backoff. Calls to one endpoint queue behind a lock in the order they came.
    """

    def __init__(self, clock: Clock, spacing: float) -> None:
        self._clock = clock
        self._spacing = spacing
        self._next: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def wait(self, endpoint: str, *, urgent: bool = False) -> None:
        """Wait this endpoint's turn. An urgent call (a local request waits on it) goes at
        once, and the background calls after it keep their spacing from it."""
        if self._spacing <= 0:
            return
        if urgent:
            self._next[endpoint] = self._clock.monotonic() + self._spacing
            return
        lock = self._locks.setdefault(endpoint, asyncio.Lock())
        async with lock:
            due = self._next.get(endpoint)
            if due is not None and due > self._clock.monotonic():
                await self._clock.sleep_until(due)
            self._next[endpoint] = self._clock.monotonic() + self._spacing


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
    ) -> None:
        self.platform = platform
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        self._key_source = key_source
        self._clock = clock
        self._spacer = Spacer(clock, spacing)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._attempts = attempts
        self._max_backoff = max_backoff
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never show the key
        return f"JsonApi({self.platform!r}, {self._base!r})"

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

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
        """
        bucket = endpoint or f"{method} {path}"
        backoff = (
            wait_exponential_jitter(multiplier=0.1, max=URGENT_MAX_BACKOFF, jitter=0.1)
            if urgent
            else wait_exponential_jitter(initial=1, max=self._max_backoff, jitter=1)
        )
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=backoff,
            retry=retry_if_exception_type(ProviderUnavailable),
            sleep=self._clock.sleep,
            before_sleep=self._note_retry,
            reraise=True,
        )
        result: Any = None
        async for attempt in retrying:
            with attempt:
                await self._spacer.wait(bucket, urgent=urgent)
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
        headers = {"Authorization": f"Bearer {self._api_key}", "User-Agent": self._user_agent}
        data: bytes | None = None
        # The official client sends a JSON body with every write, `{}` when empty.
        if method != "GET" or body is not None:
            data = json.dumps({} if body is None else body).encode()
            headers["Content-Type"] = "application/json"
        what = f"{method} {path}"
        try:
            async with self._session.request(
                method, URL(url, encoded=True), data=data, headers=headers
            ) as response:
                status = response.status
                text = (await response.read()).decode("utf-8", errors="replace")
        except TimeoutError:
            raise ProviderUnavailable(
                f"{self.platform}: {what} timed out after {self._timeout.total:g}s"
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
            return json.loads(text)
        except ValueError:
            # Seen from proxies in front of an API during incidents: temporary.
            raise ProviderUnavailable(
                f"{self.platform}: {what} answered {status} with something that is not "
                f"JSON: {text[:80]!r}"
            ) from None
