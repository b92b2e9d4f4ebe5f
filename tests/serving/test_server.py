"""`craft serve` end to end: the real server in a subprocess, the `openai` client and raw HTTP.

One server (batch 8, queue 32, an API key, a chat template) serves the whole module.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from craft.config import from_dict, to_toml
from craft.data.tokenizers import CharTokenizer
from craft.generation import encode_prompt, generate
from craft.training.builders import build_model
from craft.training.checkpoint import load_model, write_export

openai = pytest.importorskip("openai")

KEY = "test-key-123"
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(20))
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
TEMPLATE += "{% if add_generation_prompt %}assistant:{% endif %}"
BATCH, QUEUE = 8, 32
LONG = 1_000_000  # tokens: a request that runs until it is cancelled


def write_tiny_export(out: Path) -> Path:
    """A 2-layer GPT with a character tokenizer, exported to `out` (the model named "tiny")."""
    tok = CharTokenizer(sorted(set(TEXT)))
    gpt = {"type": "gpt", "n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 32}
    cfg = from_dict(
        {
            "run": {"name": "tiny"},
            "model": gpt,
            "data": {"type": "random"},
            "tokenizer": {"type": "char"},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    write_export(
        out, model_state=model.state_dict(), config_toml=to_toml(cfg), tokenizer=tok, step=1
    )
    return out


class Server:
    def __init__(self, root: Path) -> None:
        self.export = write_tiny_export(root / "export")
        (root / "chat.jinja").write_text(TEMPLATE, encoding="utf-8")
        self.model, self.tok, _ = load_model(self.export)
        env = {**os.environ, "CRAFT_TEST_KEY": KEY, "OMP_NUM_THREADS": "1", "CRAFT_DEBUG": "0"}
        args = ["serve", "--checkpoint", str(self.export), "--port", "0"]
        args += ["--max-batch-size", str(BATCH), "--max-queue", str(QUEUE)]
        args += ["--max-tokens-limit", str(LONG), "--log-level", "warning"]
        args += ["--api-key-env", "CRAFT_TEST_KEY", "--chat-template", str(root / "chat.jinja")]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "craft", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self._first_line(timeout=120)
        self.port = int(line.rsplit(":", 1)[1].split()[0])
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120
        )

    def _first_line(self, timeout: float) -> str:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()))
        reader.start()
        reader.join(timeout)
        if not box or not box[0].startswith("serving"):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {box} {self.proc.stderr.read()}")
        return box[0].strip()

    def http(
        self, method: str, path: str, body: bytes | str | dict | None = None, key: str | None = KEY
    ) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        if isinstance(body, dict):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, json.loads(data) if data else {}

    def generate(self, prompt: str, **kw) -> list[str]:
        return generate(self.model, self.tok, prompt, **kw)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("serve"))
    try:
        yield s
    finally:
        s.close()


def test_health_and_models(server: Server) -> None:
    status, body = server.http("GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok"
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completions_equal_craft_generate_for_the_same_seed(server: Server) -> None:
    r = server.client.completions.create(
        model="tiny", prompt="line 1", max_tokens=40, seed=3, n=2, extra_body={"top_k": 5}
    )
    expect = server.generate("line 1", max_new_tokens=40, seed=3, num_samples=2, top_k=5)
    assert [c.text for c in r.choices] == expect
    assert [c.finish_reason for c in r.choices] == ["length", "length"]
    assert r.usage.prompt_tokens == len(encode_prompt(server.tok, "line 1"))
    assert r.usage.completion_tokens == 80 and r.usage.total_tokens == 80 + r.usage.prompt_tokens
    # the command line itself, with the same settings, prints the same samples
    args = ["generate", "--checkpoint", str(server.export), "--prompt", "line 1", "--no-stream"]
    args += ["--max-new-tokens", "40", "--seed", "3", "--top-k", "5", "--num-samples", "2"]
    cli = subprocess.run(
        [sys.executable, "-m", "craft", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == f"line 1{expect[0]}\n---------------\nline 1{expect[1]}\n"
    greedy = server.client.completions.create(
        model="tiny", prompt="the", max_tokens=25, temperature=0
    )
    assert greedy.choices[0].text == server.generate("the", max_new_tokens=25, temperature=0)[0]


def test_streamed_chunks_concatenate_to_the_text(server: Server) -> None:
    kw = dict(model="tiny", prompt="fox", max_tokens=30, seed=11, top_p=0.9)
    whole = server.client.completions.create(**kw).choices[0].text
    chunks = list(
        server.client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole == server.generate("fox", max_new_tokens=30, seed=11, top_p=0.9)[0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 30


def test_chat_with_the_template(server: Server) -> None:
    messages = [{"role": "user", "content": "the dog"}]
    r = server.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, seed=5
    )
    prompt = "user: the dog\nassistant:"
    expect = server.generate(prompt, max_new_tokens=20, seed=5)[0]
    assert r.choices[0].message.content == expect and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt)
    stream = server.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, seed=5, stream=True
    )
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == expect


def test_stop_sequence_cuts_the_text(server: Server) -> None:
    full = server.generate("line 2", max_new_tokens=30, temperature=0)[0]
    stop = full[10:12]
    r = server.client.completions.create(
        model="tiny", prompt="line 2", max_tokens=30, temperature=0, stop=[stop, "#"]
    )
    assert r.choices[0].text == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = server.client.completions.create(
        model="tiny", prompt="line 2", max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == full[: full.find(stop)]


def test_32_concurrent_requests_each_get_their_own_answer(server: Server) -> None:
    prompts = [f"line {i}" for i in range(32)]

    def ask(i: int) -> str:
        r = server.client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=40, seed=100 + i, temperature=0.9
        )
        return r.choices[0].text

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32)))
    expect = [
        server.generate(p, max_new_tokens=40, seed=100 + i, temperature=0.9)[0]
        for i, p in enumerate(prompts)
    ]
    assert got == expect


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ("{not json", 400, "not valid JSON"),
        ("[1, 2]", 400, "JSON object"),
        ({"model": "tiny", "prompt": "a", "max_tokens": "10"}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": 5}, 400, "prompt"),
        ({"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "a", "max_tokens": LONG + 1}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "prompt": "a", "n": True}, 400, "n"),
        ({"model": "tiny", "prompt": "a", "n": 9}, 400, "batch size"),
        ({"model": "tiny", "prompt": "a", "logprobs": 3}, 400, "not supported"),
        ({"model": "tiny", "prompt": "a", "tempreature": 1}, 400, "unknown field"),
        ({"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "tiny", "prompt": "line 1 " * 10}, 400, "context of 32"),
        ({"model": "tiny", "prompt": "a€"}, 400, "prompt"),
        ({"model": "gpt-4", "prompt": "a"}, 404, "does not exist"),
        ({"prompt": "a"}, 400, "model"),
    ],
)
def test_bad_requests_get_openai_errors(server: Server, body, status: int, needle: str) -> None:
    got, err = server.http("POST", "/v1/completions", body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert needle in err["error"]["message"]


def test_auth_limits_and_routes(server: Server) -> None:
    ok = {"model": "tiny", "prompt": "a", "max_tokens": 1}
    for key in (None, "wrong-key", KEY + "x", ""):
        status, err = server.http("POST", "/v1/completions", ok, key=key)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
    assert server.http("GET", "/v1/models", key=None)[0] == 401
    status, err = server.http("POST", "/v1/completions", "x" * (1 << 21))
    assert status == 413
    assert server.http("GET", "/v1/completions")[0] == 405
    assert server.http("GET", "/v2/anything")[0] == 404
    status, err = server.http("POST", "/v1/chat/completions", {"model": "tiny", "messages": []})
    assert status == 400 and "messages" in err["error"]["message"]
    assert server.http("POST", "/v1/completions", ok)[0] == 200


def _open_stream(port: int) -> socket.socket:
    body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": LONG, "stream": True})
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
    )
    return sock


def _wait_load(server: Server, active: int, queued: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        _, body = server.http("GET", "/health", key=None)
        if (body["active_rows"], body["queued_requests"]) == (active, queued):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"server load {body}, expected {active} active, {queued} queued")
        time.sleep(0.1)


def test_full_queue_is_503_and_disconnects_cancel(server: Server) -> None:
    socks = [_open_stream(server.port) for _ in range(BATCH)]
    try:
        _wait_load(server, BATCH, 0)  # the batch is full...
        socks += [_open_stream(server.port) for _ in range(QUEUE)]
        _wait_load(server, BATCH, QUEUE)  # ...and so is the queue
        status, err = server.http("POST", "/v1/completions", {"model": "tiny", "prompt": "a"})
        assert status == 503 and err["error"]["code"] == "queue_full"
    finally:
        for s in socks:
            s.close()
    _wait_load(server, 0, 0)  # every dropped client's generation was cancelled
    r = server.client.completions.create(model="tiny", prompt="a", max_tokens=3, temperature=0)
    assert r.choices[0].text == server.generate("a", max_new_tokens=3, temperature=0)[0]


def test_taken_port_and_missing_key_variable_are_one_line_errors(server: Server) -> None:
    base = [sys.executable, "-m", "craft", "serve", "--checkpoint", str(server.export)]
    env = {k: v for k, v in os.environ.items() if k != "CRAFT_DEBUG"}
    taken = subprocess.run(
        [*base, "--port", str(server.port)], capture_output=True, text=True, timeout=120, env=env
    )
    assert taken.returncode == 2 and taken.stdout == ""
    assert (
        taken.stderr.startswith("error: cannot listen on 127.0.0.1:")
        and "Traceback" not in taken.stderr
    )
    nokey = subprocess.run(
        [*base, "--port", "0", "--api-key-env", "CRAFT_NO_SUCH_VARIABLE"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert nokey.returncode == 2 and "CRAFT_NO_SUCH_VARIABLE" in nokey.stderr
    assert len(nokey.stderr.strip().splitlines()) == 1


def test_connections_stream_without_nagle_delay() -> None:
    """Accepted connections have TCP_NODELAY: a token written right after the response headers
    must not wait for the client's delayed ACK of them (40 ms on Linux keep-alive connections)."""
    from craft.serving.server import bind

    listener = bind("127.0.0.1", 0)
    try:
        with socket.create_connection(listener.getsockname()[:2], timeout=10):
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                assert conn.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY on it too
    finally:
        listener.close()
