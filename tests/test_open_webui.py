"""The real Open WebUI in front of the gate: a chat while the GPUs are local goes through to
(a fake) Ollama, and while they are rented, `refuse_as_message` gives Open WebUI an assistant
message to show, streamed or not, where a plain 503 gives it an error.

Open WebUI is large (it installs from pip, CPU only, in a venv of its own), so this test runs
only where it is installed: `OPEN_WEBUI_BIN=/path/to/venv/bin/open-webui`, or `open-webui` on
PATH. It starts Open WebUI as its own process (no auth, offline), about 30 s on two cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes.ollama import FakeOllama
from fakes.rig import free_port

from broker.clock import FakeClock
from broker.services.control import GateControl
from broker.services.gate import Gate

BIN = os.environ.get("OPEN_WEBUI_BIN") or shutil.which("open-webui")
pytestmark = pytest.mark.skipif(
    BIN is None,
    reason="Open WebUI is not installed: pip install open-webui in a venv of its own, then "
    "OPEN_WEBUI_BIN=/that/venv/bin/open-webui",
)

SENTENCE = (
    "The GPUs of this server are rented out until 13:02 at the latest. Ask an admin to run "
    "`gpu-broker reclaim`, or try again then."
)


class OpenWebUI:
    def __init__(self, url: str, session: aiohttp.ClientSession, token: str) -> None:
        self.url = url
        self.session = session
        self.headers = {"Authorization": f"Bearer {token}"}

    async def chat(self, stream: bool) -> tuple[int, str]:
        """What Open WebUI's chat page asks its backend for, and the assistant's text."""
        body = {"model": "llama3.2:1b", "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        async with self.session.post(
            self.url + "/api/chat/completions", json=body, headers=self.headers
        ) as r:
            text = await r.text()
            if r.status != 200:
                return r.status, text
            if not stream:
                return r.status, (await r.json())["choices"][0]["message"]["content"]
        parts = []
        for line in text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event: Any = json.loads(line[6:])
                for choice in event.get("choices", []):
                    parts.append(choice.get("delta", {}).get("content") or "")
        return 200, "".join(parts)


async def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(240):  # a process starting up: poll, bounded at 120 s
            if proc.poll() is not None:
                raise AssertionError("Open WebUI exited:\n" + _tail(log))
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/health") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise AssertionError("Open WebUI did not start:\n" + _tail(log))


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as fake:
        yield fake


async def _start(tmp_path: Path, gate_url: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    assert BIN is not None
    port = free_port()
    log = tmp_path / "open-webui.log"
    env = {
        **os.environ,
        "DATA_DIR": str(tmp_path / "open-webui"),
        "OLLAMA_BASE_URL": gate_url,  # what the guide tells a user to set
        "WEBUI_AUTH": "False",
        "ENABLE_OPENAI_API": "False",
        "OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "False",
        "ENABLE_VERSION_UPDATE_CHECK": "False",
    }
    proc = _spawn([BIN, "serve", "--host", "127.0.0.1", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_healthy(url, proc, log)
    except BaseException:
        _stop(proc)
        raise
    return proc, url, log


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=log.parent, start_new_session=True)  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def test_open_webui_chats_through_the_gate_and_shows_the_refusal(
    tmp_path: Path, upstream: FakeOllama
) -> None:
    clock = FakeClock(datetime(2026, 11, 25, 12, 0, tzinfo=UTC))
    control = GateControl(clock, name="ollama", max_hold=timedelta(seconds=30), display_tz=UTC)
    gate = Gate(name="ollama", kind="ollama", upstream=upstream.url,
                listen=("127.0.0.1", free_port()), control=control,
                refuse_as_message=True)  # fmt: skip
    await gate.start()
    proc, url, _ = await _start(tmp_path, gate.url)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/api/v1/auths/signin",
                                    json={"email": "admin@localhost", "password": "admin"}) as r:
                token = (await r.json())["token"]  # fmt: skip
            webui = OpenWebUI(url, session, token)
            async with session.get(url + "/api/models?refresh=true",
                                   headers=webui.headers) as r:  # fmt: skip
                models = [m["id"] for m in (await r.json())["data"]]
            assert "llama3.2:1b" in models  # read through the gate (/api/tags)

            # LOCAL: the chat reaches Ollama through the gate.
            assert await webui.chat(stream=False) == (200, "tok0 tok1 tok2 ")
            assert await webui.chat(stream=True) == (200, "tok0 tok1 tok2 ")
            chats = [s for s in upstream.seen if s.path == "/api/chat"]
            assert len(chats) == 2

            # RENTED until 13:02: Open WebUI gets an assistant message to show.
            control.guard()
            control.set_rented_until(datetime(2026, 11, 25, 13, 2, tzinfo=UTC))
            assert await webui.chat(stream=False) == (200, SENTENCE)
            assert await webui.chat(stream=True) == (200, SENTENCE)
            assert len([s for s in upstream.seen if s.path == "/api/chat"]) == 2
            assert control.rejected_total == 2

            # Without the flag, what Open WebUI gets is an error, not a sentence to show.
            gate.refuse_as_message = False
            status, text = await webui.chat(stream=False)
            assert status != 200 or SENTENCE not in text
    finally:
        _stop(proc)
        await gate.aclose()
