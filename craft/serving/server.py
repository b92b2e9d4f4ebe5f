"""Start the server: load the checkpoint, bind the socket, run uvicorn until interrupted."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from craft.errors import ConfigError

log = logging.getLogger("craft.serving")

DEFAULT_MAX_TOKENS = 256


def _uvicorn() -> Any:
    """uvicorn, once the serve extra is known to be installed (torch is not imported yet)."""
    try:
        import starlette  # noqa: F401
        import uvicorn
        from jinja2 import sandbox  # noqa: F401
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"craft serve needs the 'serve' extra ({e.name} is not installed): "
            "pip install 'craft-lm[serve]'"
        ) from None
    return uvicorn


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); errors are one-line ConfigErrors."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, proto, _, addr = infos[0]
    # proto must say TCP: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that
    # do, and with it on, a streamed token waits for the client's delayed ACK (up to 40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_threads(device_type: str, requested: int | None = None) -> int | None:
    """Torch threads for the model's forward: `requested`, else on the CPU all usable cores but
    one unless OMP_NUM_THREADS says otherwise; None leaves torch's default.

    The event loop (HTTP, tokenizing, streaming) runs while the model computes. With as many
    threads as cores, every parallel op waits for whichever of its threads the event loop (or
    any other process) has preempted; one core left free avoids that (bench/serve_load.py
    compares the two with `--variant`).
    """
    if requested is not None:
        return requested
    if device_type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def read_api_key(var: str | None) -> str | None:
    if var is None:
        return None
    key = os.environ.get(var, "")
    if not key.strip():
        raise ConfigError(f"--api-key-env {var}: the environment variable is not set or empty")
    return key.strip()


def serve(
    checkpoint: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    dtype: str = "float32",
    max_batch_size: int = 8,
    max_queue: int = 64,
    max_tokens_limit: int = 4096,
    api_key_env: str | None = None,
    model_name: str | None = None,
    chat_template: Path | None = None,
    log_level: str = "info",
    threads: int | None = None,
) -> None:
    """Serve `checkpoint` until interrupted (Ctrl-C / SIGTERM).

    Argument errors (a taken port, a missing key variable, a bad template) are reported before
    torch is imported and the checkpoint loaded, so they come back at once.
    """
    uvicorn = _uvicorn()
    if max_batch_size < 1 or max_queue < 1 or max_tokens_limit < 1:
        raise ConfigError("--max-batch-size, --max-queue and --max-tokens-limit must be >= 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: expected >= 1")
    api_key = read_api_key(api_key_env)
    template = None
    if chat_template is not None:
        from craft.serving.chat import compile_template

        try:
            source = chat_template.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--chat-template {chat_template}: cannot read it ({e})") from None
        try:
            template = compile_template(source)
        except ValueError as e:
            raise ConfigError(f"--chat-template {chat_template}: {e}") from None
    sock = bind(host, port)  # before the slow load: a taken port fails at once
    from craft.serving.engine_process import EngineProcess

    # the engine process imports torch and loads the model while this one checks the
    # checkpoint from its files' headers and sets up HTTP; a load error is raised by wait_ready
    worker = EngineProcess(
        str(checkpoint),
        device=device,
        dtype=dtype,
        threads=threads,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
    )
    try:
        worker.spawn()
        from craft.serving import app as app_mod
        from craft.serving.chat import compile_template
        from craft.serving.trace import from_env as trace_from_env
        from craft.training.checkpoint import inspect_model

        tokenizer, cfg = inspect_model(checkpoint)  # only the engine process loads the weights
        if template is None and getattr(tokenizer, "chat_template", None):
            try:
                template = compile_template(tokenizer.chat_template)
            except ValueError as e:
                raise ConfigError(f"{checkpoint}: the tokenizer's {e}") from None
        name = model_name or cfg.run.name
        worker.wait_ready()
        state = app_mod.ServerState(
            worker=worker,
            tokenizer=tokenizer,
            model_name=name,
            context=worker.block_size,
            max_tokens_limit=max_tokens_limit,
            default_max_tokens=min(DEFAULT_MAX_TOKENS, max_tokens_limit),
            api_key=api_key,
            chat_template=template,
            tracer=trace_from_env(),
        )
        application = app_mod.build_app(state)
        if not is_loopback(host) and api_key is None:
            log.warning(
                "listening on %s without an API key: anyone who can reach it may use it", host
            )
        bound = sock.getsockname()
        sys.stdout.write(
            f"serving {name!r} on http://{host}:{bound[1]} (batch {max_batch_size}, "
            f"device {worker.device_type}, threads {worker.threads or 'default'}, "
            f"{'API key required' if api_key else 'no API key'})\n"
        )
        sys.stdout.flush()
        config = uvicorn.Config(
            application,
            log_level=log_level,
            access_log=log_level == "debug",
            lifespan="off",
            timeout_graceful_shutdown=5,  # open streams are cut after 5 s on Ctrl-C / SIGTERM
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        worker.stop()
        sock.close()
