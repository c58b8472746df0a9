"""``run_server``: ``gptlab serve``'s start-up: uvicorn on the app, and one line once the model answers.

The app answers (503) from the start while the model loads in a thread, so the URL is printed only once
``/health`` would answer 200; a load error is printed instead and stops the server. ``_Server`` checks
for that in ``on_tick``, the hook uvicorn's main loop already calls every 0.1 s: no thread to wait on
the load, and nothing of uvicorn's patched.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Sequence

import uvicorn

from ..errors import UserError
from .app import Loader, create_app
from .web import WebData
from .state import ServeState

__all__ = ["run_server"]


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServeState, model_name: str):
        super().__init__(config)
        self.state, self.model_name, self.announced = state, model_name, False

    async def on_tick(self, counter: int) -> bool:
        if not self.announced and self.state.ready.is_set():
            self.announced = True
            if self.state.load_error:
                print(f"gptlab serve: error: {self.state.load_error}", file=sys.stderr, flush=True)
                return True
            host = self.config.host
            host = f"[{host}]" if ":" in host else host
            port = self.servers[0].sockets[0].getsockname()[1]
            print(f"gptlab serve: model '{self.model_name}' at http://{host}:{port}/v1 (web chat: "
                  f"http://{host}:{port}/; Ctrl-C stops)", flush=True)
        return await super().on_tick(counter)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def run_server(load: Loader, *, model_name: str, host: str, port: int, api_key: str | None, max_body_bytes: int,
               max_queue: int, max_batch: int, data: WebData, allow_hosts: Sequence[str] = ()) -> int:
    """Serve until Ctrl-C (0), or until the model fails to load (2).

    Bound to this machine, the server answers only requests addressed to its own names (and ``allow_hosts``):
    the DNS-rebinding defence of local servers. Bound to a network address, it takes any ``Host`` unless
    ``allow_hosts`` lists them (loopback names stay allowed: no other site's page can send them), and warns
    when no API key guards it.
    """
    loopback = is_loopback(host)
    allowed = (*LOOPBACK_NAMES, *allow_hosts) if loopback else (
        (*LOOPBACK_NAMES, host, *allow_hosts) if allow_hosts else None)
    app = create_app(load=load, model_name=model_name, api_key=api_key, max_body_bytes=max_body_bytes,
                     max_queue=max_queue, max_batch=max_batch, data=data, allowed_hosts=allowed)
    state: ServeState = app.state.serve
    sock = listen(host, port)  # before the model loads: a port in use is a one-line error, not a crash
    if not loopback and api_key is None:
        print(f"gptlab serve: warning: listening on {host} without --api-key: anyone who can reach this machine "
              f"can use the model{' and write to ' + str(data.directory) if data.directory else ''}; "
              "pass --api-key KEY", file=sys.stderr, flush=True)
    _Server(uvicorn.Config(app, host=host, port=port, log_level="warning"), state, model_name).run(sockets=[sock])
    return 2 if state.load_error else 0


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``; a ``UserError`` naming the address and the fix if it cannot be."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, OverflowError) as e:
        raise UserError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}): pass an address "
                        "of this machine as --host and a port in 0-65535 as --port") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}): choose another "
                        "--port (0 picks a free one) or --host") from None
    return sock
