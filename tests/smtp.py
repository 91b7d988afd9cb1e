"""A real SMTP server for tests (aiosmtpd in a thread) whose answers are scripted per
recipient, and which records exactly the mails it accepted."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from typing import Any

from aiosmtpd.controller import Controller

#: What the server does with one attempt to one recipient.
#:   accept: 250 at DATA (after ``delay_s``), the mail is recorded
#:   defer:  421 at DATA;  reject: 550 at RCPT
#:   stall:  no answer at DATA for ``stall_s``, then 451 (the mail is not recorded)
STEPS = ("accept", "defer", "reject", "stall")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ScriptedSmtp:
    """``script`` maps an address to its steps, one per attempt (the last repeats);
    addresses not in it are accepted."""

    def __init__(
        self,
        script: dict[str, list[str]] | None = None,
        *,
        delay_s: float = 0.0,
        stall_s: float = 30.0,
        port: int | None = None,
    ) -> None:
        self.script = {k.lower(): v for k, v in (script or {}).items()}
        self.delay_s = delay_s
        self.stall_s = stall_s
        self.port = port or free_port()
        self.received: list[tuple[str, EmailMessage]] = []
        #: When each of ``received`` was accepted (time.monotonic()).
        self.accepted_at: list[float] = []
        self.attempts: Counter[str] = Counter()
        self.hold_at: int | None = None
        """Block the n-th RCPT (1-based, all recipients) until ``release`` is set."""
        self.held = threading.Event()
        self.held_peer: tuple[str, int] | None = None
        """The client (host, port) whose transaction is held."""
        self.release = threading.Event()
        self._rcpts = 0
        self._lock = threading.Lock()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> ScriptedSmtp:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._controller.stop()

    # --- aiosmtpd handler hooks ---------------------------------------------------

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        with self._lock:
            self._rcpts += 1
            hold = self.hold_at == self._rcpts
            steps = self.script.get(address.lower(), ["accept"])
            step = steps[min(self.attempts[address.lower()], len(steps) - 1)]
            self.attempts[address.lower()] += 1
        if hold:
            self.held_peer = tuple(session.peer[:2])
            self.held.set()
            await asyncio.to_thread(self.release.wait)
            return "451 4.3.0 held by the test"
        if step == "reject":
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        envelope.step = step
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        step = getattr(envelope, "step", "accept")
        if step == "defer":
            return "421 4.3.0 try again later"
        if step == "stall":
            await asyncio.sleep(self.stall_s)
            return "451 4.4.2 too late"
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        message = message_from_bytes(envelope.original_content, policy=default)
        with self._lock:
            for rcpt in envelope.rcpt_tos:
                self.received.append((rcpt, message))
                self.accepted_at.append(time.monotonic())
        return "250 2.0.0 Ok: queued"

    # --- for assertions -------------------------------------------------------------

    def mails_to(self, address: str) -> list[EmailMessage]:
        with self._lock:
            return [m for rcpt, m in self.received if rcpt.lower() == address.lower()]

    def message_ids(self) -> list[str]:
        with self._lock:
            return [str(m["Message-ID"]) for _, m in self.received]

    def wait_for(
        self, count: int, timeout_s: float = 60.0, to: str | None = None
    ) -> list[tuple[str, EmailMessage]]:
        """Wait until at least ``count`` mails (to ``to``, if given) were accepted;
        AssertionError on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                matching = [m for m in self.received if to is None or m[0] == to]
                if len(matching) >= count:
                    return list(self.received)
            time.sleep(0.05)
        raise AssertionError(f"SMTP server got {len(self.received)} mails, expected {count}")


class DownSmtp:
    """A server that is down: it takes each TCP connection and drops it at once
    (counted), which an SMTP client sees as the server hanging up before its greeting."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(64)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> DownSmtp:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed: the outage is over
            self.connections += 1
            conn.close()


def smtp_server(
    script: dict[str, list[str]] | None = None, **options: Any
) -> Iterator[ScriptedSmtp]:
    """A started server for a fixture (stopped afterwards)."""
    with ScriptedSmtp(script, **options) as server:
        yield server
