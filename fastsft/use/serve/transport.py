"""The transport guards of `fastsft serve`: what HTTP itself may do before a request reaches the app.

A connection has `header_timeout` seconds to send a whole request header (uvicorn itself waits forever
for one); the server's connections are a budget shared between remote addresses (`ConnectionBudget`);
a loopback server answers only to loopback Host names (`LoopbackHost`, against DNS rebinding).
`make_server` is the uvicorn server with these guards.
"""

from __future__ import annotations

import ipaddress
import json

from fastsft.use.serve.protocol import APIError, ServeSettings
from fastsft.use.serve.wire import error_response


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is this machine only:
    localhost, 127.0.0.0/8 or ::1."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LoopbackHost:
    """ASGI middleware of a loopback server: a request whose Host header is not a loopback name (any of
    127.0.0.0/8, localhost, [::1]) with an optional numeric port is refused (400), so that a web page
    whose own name is made to resolve to 127.0.0.1 (DNS rebinding) cannot read the API as if it were the
    page. Any port: `ssh -L 9000:127.0.0.1:8000` makes the browser send `Host: localhost:9000`, and a
    loopback name can only come from a page on this machine, which could reach the port anyway."""

    def __init__(self, app):
        self.app = app

    @staticmethod
    def allowed(host: str) -> bool:
        if host.startswith("["):  # [::1]:8000
            name, _, rest = host[1:].partition("]")
            if rest and not rest.startswith(":"):
                return False
            port = rest[1:]
        else:
            name, _, port = host.partition(":")
        if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            return False
        return is_loopback(name)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self.allowed(host):
                response = error_response(
                    APIError(
                        400,
                        f"Invalid host header {host!r}: this server answers to "
                        "loopback names only (127.0.0.1, localhost, [::1]).",
                        code="invalid_host",
                    )
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def exposure_warning(settings: ServeSettings) -> str | None:
    """The startup warning for a server that other machines can reach without a key (none on loopback)."""
    if is_loopback(settings.host) or settings.api_key is not None:
        return None
    return f"listening on {settings.host} without --api-key: anyone who can reach this machine can use the model."


class ConnectionBudget:
    """The server's connections, shared between remote addresses so that no set of addresses can keep
    another one out.

    - `total` connections at most; the last `reserve` of them only for an address that holds fewer than
      `light` (a normal client holds one or two), so that heavy addresses share `total - reserve`;
    - a heavy address holds at most its share of that pool, `(total - reserve) // addresses` (the
      addresses holding connections, this one included; never below `light`, nor above `per_client`);
    - when there is no room for an address, the oldest connection that is waiting for a request header
      (half-open, or idle between requests) of the heaviest address is closed to make room, if that
      address holds more than this one would: a flood of half-open connections, from any number of
      addresses, gives way to a client that holds fewer. Connections in the middle of a request are
      never closed; those are bounded by the queue's share per address.

    An API key cannot help here: a half-open connection has not sent its key yet.
    Touched on the event loop only."""

    def __init__(self, total: int, *, per_client: int, reserve: int | None = None, light: int = 4):
        self.total = total
        self.reserve = max(1, total // 4) if reserve is None else reserve
        self.light = light
        self.per_client = per_client
        self.held: dict[str, list] = {}  # address -> its connections, oldest first
        self.count = 0

    def share(self, client: str) -> int:
        clients = len(self.held) + (client not in self.held)
        return min(self.per_client, max(self.light, (self.total - self.reserve) // clients))

    def admit(self, client: str, conn) -> bool:
        """Whether `conn` from `client` may open (it is then counted until `release`); may close another
        address's waiting connection to make room."""
        mine = len(self.held.get(client, ()))
        heavy = mine >= self.light
        if heavy and mine >= self.share(client):
            return False
        room = self.total - self.reserve if heavy else self.total
        if self.count >= room and not self.evict(more_than=mine + 1):
            return False
        self.held.setdefault(client, []).append(conn)
        self.count += 1
        return True

    def evict(self, *, more_than: int) -> bool:
        """Close the oldest waiting connection of the heaviest address, if it holds more than
        `more_than`; whether one was closed."""
        for client, conns in sorted(self.held.items(), key=lambda kv: -len(kv[1])):
            if len(conns) <= more_than:
                return False
            for conn in conns:
                if conn.waiting():
                    self.release(client, conn)
                    conn.evict()
                    return True
        return False

    def release(self, client: str, conn) -> None:
        conns = self.held.get(client)
        if conns is None or conn not in conns:
            return
        conns.remove(conn)
        self.count -= 1
        if not conns:
            del self.held[client]


def make_server(app, settings: ServeSettings):
    """The uvicorn server for `app`, with the HTTP limits of `settings` (see the module's docstring)."""
    import uvicorn

    protocol = _guarded_protocol(settings)
    app.state.connection_budget = protocol.budget
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        http=protocol,
        # No bound of uvicorn's own (a plain 503 to every request once the connections it counts reach
        # it, the half-open ones included): the budget of _guarded_protocol bounds the connections.
        limit_concurrency=None,
        timeout_keep_alive=settings.keep_alive,
    )
    return uvicorn.Server(config)


def _guarded_protocol(settings: ServeSettings):
    """uvicorn's h11 protocol with a header deadline and the server's ConnectionBudget."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.utils import get_remote_addr

    busy = json.dumps(
        APIError(
            503,
            "Too many connections: your address holds its share of the server's connections, or the "
            "server is full; close some and retry.",
            type="server_error",
            code="too_many_connections",
        ).body()
    ).encode()
    refusal = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        b"connection: close\r\ncontent-length: " + str(len(busy)).encode() + b"\r\n\r\n" + busy
    )
    budget = ConnectionBudget(settings.max_connections, per_client=settings.client_connections)

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            peer = get_remote_addr(transport)
            self.peer = peer[0] if peer else None
            self.header_deadline = None
            self.refused = not budget.admit(self.peer, self)
            if self.refused:  # never handed to uvicorn: answered and closed at once
                transport.write(refusal)
                transport.close()
                return
            super().connection_made(transport)
            self.watch_header()

        def connection_lost(self, exc):
            if self.refused:
                return
            budget.release(self.peer, self)
            self.stop_watch()
            super().connection_lost(exc)

        def data_received(self, data):
            if self.refused:
                return
            super().data_received(data)
            self.watch_header()

        def waiting(self) -> bool:
            """Waiting for a request header (none yet, half of one, or idle between requests): what the
            budget may close to make room."""
            return self.awaiting_header() and not self.transport.is_closing()

        def evict(self):
            self.stop_watch()
            self.transport.close()

        def awaiting_header(self) -> bool:
            return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

        def watch_header(self):
            """Arm the deadline when a request header is awaited (a new connection, or the first bytes of
            the next request on a kept-alive one); disarm it once the header is in."""
            if not self.awaiting_header():
                self.stop_watch()
            elif self.header_deadline is None and (self.cycle is None or self.conn.trailing_data[0]):
                self.header_deadline = self.loop.call_later(settings.header_timeout, self.header_late)

        def stop_watch(self):
            if self.header_deadline is not None:
                self.header_deadline.cancel()
                self.header_deadline = None

        def header_late(self):
            self.header_deadline = None
            if self.awaiting_header() and not self.transport.is_closing():
                self.transport.close()

    GuardedH11Protocol.budget = budget
    return GuardedH11Protocol
