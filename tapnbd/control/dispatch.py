"""The control socket's protocol: one request line in, one reply line out.

Each connection's peer is checked first (``auth``); then every line is decoded into a
typed request (``messages``) and handed to the handler registered for its type. Errors
a handler raises become ``ErrorReply`` lines, so one bad request never ends the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from tapnbd.control.auth import allowed, peer_uid
from tapnbd.control.messages import (
    ErrorReply,
    MessageError,
    Reply,
    Request,
    ShutdownRequest,
    StatusRequest,
    decode,
    encode,
    message_type,
)
from tapnbd.errors import TapnbdError

log = logging.getLogger("tapnbd.control")

Handler = Callable[[Any], Awaitable[Reply]]


class Dispatcher:
    """Routes control requests to handlers; ``after_shutdown`` runs once its reply is out."""

    def __init__(
        self,
        handlers: dict[type[Request], Handler],
        is_stopping: Callable[[], bool],
        after_shutdown: Callable[[], None],
    ) -> None:
        self.handlers = handlers
        self.is_stopping = is_stopping
        self.after_shutdown = after_shutdown

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pid, uid = peer_uid(writer.get_extra_info("socket"))
            if not allowed(uid):
                log.warning("refused control connection from pid %d, uid %d", pid, uid)
                # Take its request first, so that it reads the refusal, not EPIPE.
                with contextlib.suppress(TimeoutError, ValueError, asyncio.LimitOverrunError):
                    await asyncio.wait_for(reader.readline(), timeout=2)
                writer.write(
                    encode(ErrorReply(f"permission denied: uid {uid} does not own this daemon"))
                )
                await writer.drain()
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(encode(ErrorReply("message too long")))
                    return
                if not line:
                    return
                reply, after = await self.dispatch(line)
                writer.write(encode(reply))
                await writer.drain()
                if after is not None:
                    after()
        except (ConnectionError, OSError) as e:
            log.debug("control client: %s", e)
        finally:
            writer.close()

    async def dispatch(self, line: bytes) -> tuple[Reply, Callable[[], None] | None]:
        try:
            req = decode(line)
        except MessageError as e:
            return ErrorReply(f"bad request: {e}"), None
        handler = self.handlers.get(type(req)) if isinstance(req, Request) else None
        if handler is None:
            return ErrorReply(f"{message_type(req)!r} is not a request"), None
        if self.is_stopping() and not isinstance(req, StatusRequest):
            return ErrorReply("the daemon is stopping"), None
        try:
            reply = await handler(req)
        except (TapnbdError, OSError) as e:
            text = (
                str(e)
                if isinstance(e, TapnbdError)
                else f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
            )
            return ErrorReply(text), None
        except Exception as e:
            log.exception("handling %s", message_type(req))
            return ErrorReply(f"internal error: {type(e).__name__}: {e}"), None
        after = self.after_shutdown if isinstance(req, ShutdownRequest) else None
        return reply, after
