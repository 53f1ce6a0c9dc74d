"""Assemble model, engine and app from a :class:`~peftlab.config.ServeConfig`, and run uvicorn on a socket.

The socket is bound before uvicorn starts, so ``port=0`` picks a free port that :attr:`Server.url`
then reports (tests run servers side by side that way), and a busy port is a one-line error.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import uvicorn

from peftlab.config import ServeConfig
from peftlab.data.encode import uses_chat_template
from peftlab.errors import UserError
from peftlab.models import load_model
from peftlab.progress import ProgressFactory, silent
from peftlab.serve.adapters import parse_adapter_specs
from peftlab.serve.app import Limits, create_app
from peftlab.serve.engine import Engine


def api_key(config: ServeConfig) -> str | None:
    if config.api_key_env is None:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise UserError(f"--api-key-env {config.api_key_env}: that environment variable is unset or empty; "
                        f"export {config.api_key_env}=YOUR_KEY first")
    return key


def check(config: ServeConfig) -> tuple[dict[str, Path], str | None, Path | None]:
    """The adapters by name, the API key and the adapter root: every flag checked before anything loads or binds."""
    named = parse_adapter_specs(config.adapter)
    if config.max_adapters < len(named):
        raise UserError(f"--max-adapters {config.max_adapters} is less than the {len(named)} adapters given: raise it")
    if (config.name or config.model) in named:
        raise UserError(f"the base model's name {config.name or config.model!r} is also an adapter's: "
                        "rename one (--name or --adapter)")
    root = None
    if config.adapter_root is not None:
        root = Path(config.adapter_root)
        if not root.is_dir():
            raise UserError(f"--adapter-root {root} is not a folder")
    return named, api_key(config), root


def build(config: ServeConfig, progress: ProgressFactory = silent):
    """The started :class:`Engine` and its FastAPI app."""
    named, key, root = check(config)
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, progress=progress)
    engine = Engine(loaded, named, max_adapters=config.max_adapters, max_batch=config.max_batch,
                    max_queue=config.max_queue, max_lora_rank=config.max_lora_rank, adapter_root=root,
                    trust_pickle=config.trust_pickle)
    chat = uses_chat_template(loaded.tokenizer, config.chat_template)
    app = create_app(engine, base_name=config.name or config.model, chat=chat, api_key=key,
                     allow_admin=config.allow_admin,
                     limits=Limits(max_tokens=config.max_tokens, max_prompt_tokens=config.max_prompt_tokens))
    engine.start()
    return engine, app


class Server:
    """A socket bound to ``host:port`` (``port=0``: a free one), then uvicorn serving an app on it:
    :meth:`run` in this thread, or :meth:`start` in another."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as e:
            self.socket.close()
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host") from None
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.server.run(sockets=[self.socket])

    def start(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="peftlab-http",
                                        daemon=True)
        self._thread.start()
        while not self.server.started and self._thread.is_alive():
            threading.Event().wait(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join()
