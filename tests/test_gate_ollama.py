"""The gate in front of a fake Ollama, driven by the real `ollama` and `openai` clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import ollama
import openai
import pytest
from fakes.ollama import FakeOllama

from broker.clock import FakeClock
from broker.services.control import GateControl, GateMode
from broker.services.gate import Gate


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as fake:
        yield fake


@pytest.fixture
async def gate(upstream: FakeOllama, clock: FakeClock) -> AsyncIterator[Gate]:
    control = GateControl(clock, name="ollama", max_hold=timedelta(seconds=30))
    async with Gate(
        name="ollama", kind="ollama", upstream=upstream.url, listen=("127.0.0.1", 0),
        control=control,
    ) as g:  # fmt: skip
        yield g


@pytest.fixture
async def client(gate: Gate) -> AsyncIterator[ollama.AsyncClient]:
    c = ollama.AsyncClient(host=gate.url)
    yield c
    await c.close()


@pytest.fixture
async def oai(gate: Gate) -> AsyncIterator[openai.AsyncOpenAI]:
    # max_retries=0: the client would otherwise sleep for Retry-After and try again
    c = openai.AsyncOpenAI(base_url=gate.url + "/v1", api_key="x", max_retries=0)
    yield c
    await c.close()


async def until(condition: object, what: str) -> None:
    """Let the loop run (real sockets) until `condition()` holds; bounded, ~0.5 s at most."""
    for _ in range(500):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


# ---- pass-through
async def test_streamed_chat_arrives_chunk_by_chunk(
    client: ollama.AsyncClient, upstream: FakeOllama, gate: Gate
) -> None:
    upstream.chunks = 4
    stream = await client.chat(
        model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    parts = [p async for p in stream]
    assert [p.message.content for p in parts] == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", ""]
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert gate.control.in_flight == 0
    assert gate.control.last_request_at is not None


async def test_non_streamed_chat_and_generate(client: ollama.AsyncClient) -> None:
    chat = await client.chat(model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}])
    assert chat.message.content == "tok0 tok1 tok2 "
    gen = await client.generate(model="qwen2.5:0.5b", prompt="hi")
    assert gen.response == "tok0 tok1 tok2 " and gen.done


async def test_streamed_generate(client: ollama.AsyncClient) -> None:
    parts = [p.response async for p in await client.generate(
        model="llama3.2:1b", prompt="hi", stream=True)]  # fmt: skip
    assert parts == ["tok0 ", "tok1 ", "tok2 ", ""]


async def test_embeddings_both_routes(client: ollama.AsyncClient) -> None:
    embed = await client.embed(model="llama3.2:1b", input=["a", "b"])
    assert len(embed.embeddings) == 2
    old = await client.embeddings(model="llama3.2:1b", prompt="a")
    assert list(old.embedding) == [0.1, 0.2, 0.3]


async def test_host_is_rewritten_for_the_upstream(
    client: ollama.AsyncClient, upstream: FakeOllama, gate: Gate
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gate.url + "/api/tags", headers={"Host": "localhost:80"}) as r,
    ):
        assert r.status == 200
    assert upstream.seen[-1].host == upstream.url.removeprefix("http://")


async def test_a_foreign_host_is_refused_as_ollama_refuses_it(
    upstream: FakeOllama, gate: Gate
) -> None:
    """DNS rebinding (issue 12): the gate rewrites Host, so it must make Ollama's check."""
    seen = len(upstream.seen)
    async with aiohttp.ClientSession() as session:
        # the fake, like Ollama on loopback, answers 403 to a non-local Host
        async with session.get(upstream.url + "/api/tags", headers={"Host": "evil.example"}) as r:
            assert r.status == 403
        async with session.get(gate.url + "/api/tags", headers={"Host": "evil.example"}) as r:
            assert r.status == 403
            body = await r.json()
            assert set(body) == {"error"} and "evil.example" in body["error"]
        # loopback names and the gate's own address pass, with or without a port
        for host in ("localhost", "127.0.0.1", "[::1]:9", gate.url.removeprefix("http://")):
            async with session.get(gate.url + "/api/tags", headers={"Host": host}) as r:
                assert r.status == 200, host
    assert len(upstream.seen) == seen + 1 + 4  # the refused one never reached the upstream


async def test_hop_by_hop_headers_are_not_forwarded(upstream: FakeOllama, gate: Gate) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.port)
    writer.write(b"GET /api/version HTTP/1.1\r\nHost: [::1]\r\nConnection: keep-alive, X-Secret\r\n"
                 b"X-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\n")  # fmt: skip
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()
    # the fake records Host only; check the raw head the upstream saw via a second route
    assert upstream.seen[-1].path == "/api/version"


async def test_openai_client_streamed_and_not(oai: openai.AsyncOpenAI) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "hi"}
    ]
    done = await oai.chat.completions.create(model="llama3.2:1b", messages=messages)
    assert done.choices[0].message.content == "tok0 tok1 tok2 "
    stream = await oai.chat.completions.create(model="llama3.2:1b", messages=messages,
                                               stream=True)  # fmt: skip
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "tok0 tok1 tok2 "
    emb = await oai.embeddings.create(model="llama3.2:1b", input="a")
    assert emb.data[0].embedding == [0.1, 0.2, 0.3]


# ---- holding
async def test_model_list_passes_during_a_hold(
    client: ollama.AsyncClient, oai: openai.AsyncOpenAI, gate: Gate
) -> None:
    gate.control.guard()
    listed = await client.list()
    assert [m.model for m in listed.models] == ["llama3.2:1b", "qwen2.5:0.5b"]
    assert (await client.ps()).models == []
    assert [m.id async for m in oai.models.list()] == ["llama3.2:1b", "qwen2.5:0.5b"]
    assert gate.control.held == 0 and gate.control.held_total == 0


async def test_held_request_is_released_and_served(
    client: ollama.AsyncClient, gate: Gate, clock: FakeClock
) -> None:
    reclaims: list[datetime] = []

    async def reclaim() -> None:
        reclaims.append(clock.now())

    gate.control.on_reclaim = reclaim
    gate.control.guard()
    request = asyncio.create_task(client.chat(
        model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}]))  # fmt: skip
    await until(lambda: gate.control.held == 1, "the request to be held")
    await clock.advance(29)  # still inside max_hold
    assert not request.done() and reclaims == [clock.now() - timedelta(seconds=29)]
    gate.control.release()
    answer = await request
    assert answer.message.content == "tok0 tok1 tok2 "
    assert gate.control.stats().held_total == 1 and gate.control.rejected_total == 0
    assert gate.control.mode is GateMode.OPEN


async def test_held_request_times_out_with_503_and_retry_after(
    client: ollama.AsyncClient, gate: Gate, clock: FakeClock
) -> None:
    gate.control.guard()
    request = asyncio.create_task(client.generate(model="llama3.2:1b", prompt="hi"))
    await until(lambda: gate.control.held == 1, "the request to be held")
    await clock.advance(29.9)
    assert not request.done()
    await clock.advance(0.1)
    with pytest.raises(ollama.ResponseError) as caught:
        await request
    assert caught.value.status_code == 503
    # the real client surfaces our sentence, parsed out of Ollama's {"error": ...} shape
    # No renter was shown (a plain guard): the answer does not invent one.
    assert caught.value.error == (
        "the GPUs of this server are being reclaimed from the marketplace and were not free "
        "within 30 s; retry in 30 s at the latest"
    )
    assert gate.control.rejected_total == 1 and gate.control.held == 0


async def test_held_request_refused_once_a_long_contract_is_known(
    gate: Gate, clock: FakeClock
) -> None:
    gate.control.guard()
    async with aiohttp.ClientSession() as session:
        post = asyncio.create_task(session.post(gate.url + "/api/chat",
                                                json={"model": "llama3.2:1b"}))  # fmt: skip
        await until(lambda: gate.control.held == 1, "the request to be held")
        await clock.advance(10)
        gate.control.set_rented_until(clock.now() + timedelta(hours=1))
        async with await post as r:
            assert r.status == 503 and r.headers["Retry-After"] == "3600"
            assert "rented until 2026-11-25T13:00:10+00:00" in (await r.json())["error"]
    assert clock.sleepers == 0


async def test_contract_beyond_the_hold_is_refused_at_once(gate: Gate, clock: FakeClock) -> None:
    until_at = datetime(2026, 11, 25, 14, 0, tzinfo=UTC)
    gate.control.guard()
    gate.control.set_rented_until(until_at)  # two hours away, max_hold is 30 s
    async with (
        aiohttp.ClientSession() as session,
        session.post(gate.url + "/api/chat", json={"model": "llama3.2:1b"}) as r,
    ):
        body = await r.json()
        assert r.status == 503
        assert r.headers["Retry-After"] == "7200"
    assert body == {"error": "the GPUs of this server are rented until "
                             "2026-11-25T14:00:00+00:00 at the latest; gpu-broker hands them "
                             "back then: retry after 7200 s at the latest"}  # fmt: skip
    assert clock.sleepers == 0 and gate.control.held_total == 0


async def test_openai_client_sees_503_in_openai_shape(
    oai: openai.AsyncOpenAI, gate: Gate, clock: FakeClock
) -> None:
    gate.control.guard()
    gate.control.set_rented_until(clock.now() + timedelta(hours=1))
    with pytest.raises(openai.InternalServerError) as caught:
        await oai.chat.completions.create(
            model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}])  # fmt: skip
    assert caught.value.status_code == 503
    assert caught.value.response.headers["Retry-After"] == "3600"
    assert "rented until 2026-11-25T13:00:00+00:00" in caught.value.message


async def test_client_leaving_while_held_frees_its_slot(gate: Gate, clock: FakeClock) -> None:
    gate.control.guard()
    _, writer = await asyncio.open_connection("127.0.0.1", gate.port)
    body = b'{"model": "llama3.2:1b", "prompt": "hi"}'
    writer.write(b"POST /api/generate HTTP/1.1\r\nHost: [::1]\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    await until(lambda: gate.control.held == 1, "the request to be held")
    assert clock.sleepers == 1
    writer.close()
    await writer.wait_closed()
    await until(lambda: gate.control.held == 0, "the held slot to be freed")
    assert clock.sleepers == 0  # its hold timer is gone too
    assert gate.control.in_flight == 0 and gate.control.rejected_total == 0


async def test_client_leaving_mid_stream_releases_upstream(
    upstream: FakeOllama, gate: Gate
) -> None:
    upstream.pause_streams = asyncio.Event()
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.port)
    body = b'{"model": "llama3.2:1b", "prompt": "hi"}'
    writer.write(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))  # fmt: skip
    await reader.readuntil(b"tok0")
    assert gate.control.in_flight == 1
    writer.close()
    await writer.wait_closed()
    await until(lambda: gate.control.in_flight == 0, "in-flight to drop")
    # the gate closed its upstream connection, so the fake's handler was cancelled
    await until(lambda: upstream.streams_cancelled == 1, "the upstream stream to be cancelled")
    upstream.pause_streams.set()


async def test_upstream_down_gives_502_in_ollama_shape(clock: FakeClock) -> None:
    control = GateControl(clock, name="ollama", max_hold=timedelta(seconds=30))
    # a port that was just free: nothing listens there
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with Gate(name="ollama", kind="ollama", upstream=f"http://127.0.0.1:{port}",
                    listen=("127.0.0.1", 0), control=control) as gate:  # fmt: skip
        c = ollama.AsyncClient(host=gate.url)
        try:
            with pytest.raises(ollama.ResponseError) as caught:
                await c.chat(model="llama3.2:1b", messages=[{"role": "user", "content": "x"}])
        finally:
            await c.close()
    assert caught.value.status_code == 502
    assert f"ollama service at http://127.0.0.1:{port} is not answering" in caught.value.error
    assert control.in_flight == 0


async def test_200_concurrent_streams(upstream: FakeOllama, gate: Gate) -> None:
    upstream.chunks = 5
    clients = [ollama.AsyncClient(host=gate.url) for _ in range(4)]

    async def one(i: int) -> str:
        stream = await clients[i % 4].generate(model="llama3.2:1b", prompt=str(i), stream=True)
        return "".join([p.response async for p in stream])

    try:
        texts = await asyncio.gather(*(one(i) for i in range(200)))
    finally:
        for c in clients:
            await c.close()
    assert texts == ["tok0 tok1 tok2 tok3 tok4 "] * 200
    assert upstream.streams_started == 200
    assert gate.control.in_flight == 0
