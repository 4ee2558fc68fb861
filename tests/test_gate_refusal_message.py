"""`refuse_as_message = true`: a refused chat request is answered in-band, as an assistant
message in the API's own shape and framing, read here by the real `ollama` and `openai`
clients through the gate. Without the flag, and on routes that are not chats, the 503 stays."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import ollama
import openai
import pytest
from fakes.ollama import FakeOllama

from broker.clock import FakeClock
from broker.services.control import GateControl
from broker.services.gate import Gate

UNTIL = datetime(2026, 11, 25, 13, 2, tzinfo=UTC)  # the FakeClock starts at 12:00 UTC
SENTENCE = (
    "The GPUs of this server are rented out until 13:02 at the latest. Ask an admin to run "
    "`gpu-broker reclaim`, or try again then."
)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as fake:
        yield fake


async def _gate(upstream: FakeOllama, clock: FakeClock, kind: str, flag: bool) -> Gate:
    control = GateControl(clock, name="chat", max_hold=timedelta(seconds=30), display_tz=UTC)
    gate = Gate(
        name="chat", kind=kind, upstream=upstream.url, listen=("127.0.0.1", 0),  # type: ignore[arg-type]
        control=control, refuse_as_message=flag,
    )  # fmt: skip
    await gate.start()
    control.guard()
    control.set_rented_until(UNTIL)  # beyond max_hold: refused at once
    return gate


@pytest.fixture
async def gate(upstream: FakeOllama, clock: FakeClock) -> AsyncIterator[Gate]:
    g = await _gate(upstream, clock, "ollama", True)
    yield g
    await g.aclose()


@pytest.fixture
async def client(gate: Gate) -> AsyncIterator[ollama.AsyncClient]:
    c = ollama.AsyncClient(host=gate.url)
    yield c
    await c.close()


@pytest.fixture
async def oai(gate: Gate) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=gate.url + "/v1", api_key="x", max_retries=0)
    yield c
    await c.close()


MESSAGES = [{"role": "user", "content": "hi"}]


async def test_ollama_chat_not_streamed(
    client: ollama.AsyncClient, gate: Gate, upstream: FakeOllama
) -> None:
    seen = len(upstream.seen)
    reply = await client.chat(model="llama3.2:1b", messages=MESSAGES)
    assert reply.message.role == "assistant" and reply.message.content == SENTENCE
    assert reply.done and reply.model == "llama3.2:1b"
    assert len(upstream.seen) == seen  # never reached the service
    assert gate.control.rejected_total == 1  # still counted as a refusal


async def test_ollama_chat_streamed_as_ndjson(client: ollama.AsyncClient) -> None:
    parts = [p async for p in await client.chat(model="m", messages=MESSAGES, stream=True)]
    assert "".join(p.message.content or "" for p in parts) == SENTENCE
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert not parts[0].done


async def test_ollama_generate_both_ways(client: ollama.AsyncClient) -> None:
    whole = await client.generate(model="m", prompt="hi")
    assert whole.response == SENTENCE and whole.done
    parts = [p.response async for p in await client.generate(model="m", prompt="hi", stream=True)]
    assert "".join(parts) == SENTENCE


async def test_openai_chat_not_streamed(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.chat.completions.create(model="llama3.2:1b", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == SENTENCE
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"


async def test_openai_chat_streamed_as_sse_with_done(
    oai: openai.AsyncOpenAI, gate: Gate
) -> None:
    stream = await oai.chat.completions.create(
        model="llama3.2:1b", messages=MESSAGES, stream=True  # type: ignore[arg-type]
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == SENTENCE
    assert chunks[-1].choices[0].finish_reason == "stop"
    async with (
        aiohttp.ClientSession() as session,
        session.post(gate.url + "/v1/chat/completions",
                     json={"model": "m", "messages": MESSAGES, "stream": True}) as r,
    ):  # fmt: skip
        raw = await r.read()
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"data: ") == 3


async def test_routes_that_are_not_chats_keep_the_503(
    client: ollama.AsyncClient, gate: Gate
) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        await client.embed(model="m", input=["a"])
    assert caught.value.status_code == 503


async def test_without_the_flag_api_clients_keep_the_503(
    upstream: FakeOllama, clock: FakeClock
) -> None:
    gate = await _gate(upstream, clock, "openai", False)
    c = openai.AsyncOpenAI(base_url=gate.url + "/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            await c.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
        assert caught.value.status_code == 503
    finally:
        await c.close()
        await gate.aclose()


async def test_an_openai_style_server_gets_the_message_too(
    upstream: FakeOllama, clock: FakeClock
) -> None:
    gate = await _gate(upstream, clock, "openai", True)
    c = openai.AsyncOpenAI(base_url=gate.url + "/v1", api_key="x", max_retries=0)
    try:
        reply = await c.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == SENTENCE
    finally:
        await c.close()
        await gate.aclose()
