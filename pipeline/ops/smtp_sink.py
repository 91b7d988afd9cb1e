"""`herald smtp-sink`: a local SMTP server that accepts every mail, prints one line
per message and keeps each as an .eml file (local runs and demos; never production)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from email import message_from_bytes
from email.policy import default
from pathlib import Path
from typing import Any


class SinkHandler:
    """aiosmtpd handler: accept, print, save."""

    def __init__(self, save_dir: Path | None, echo: Callable[[str], None]) -> None:
        self._save_dir = save_dir
        self._echo = echo
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        data: bytes = envelope.original_content or envelope.content
        message = message_from_bytes(data, policy=default)
        self.count += 1
        self._echo(
            f"mail {self.count}: {envelope.mail_from} -> {', '.join(envelope.rcpt_tos)} "
            f"subject={str(message['Subject'])!r} id={message['Message-ID']}"
        )
        if self._save_dir is not None:
            self._save_dir.mkdir(parents=True, exist_ok=True)
            (self._save_dir / f"{time.time_ns()}.eml").write_bytes(data)
        return "250 2.0.0 Ok: queued by herald smtp-sink"


def run_sink(host: str, port: int, save_dir: Path | None, echo: Callable[[str], None]) -> None:
    """Serve until interrupted (blocking)."""
    from aiosmtpd.controller import Controller

    controller = Controller(SinkHandler(save_dir, echo), hostname=host, port=port)
    controller.start()
    echo(f"SMTP sink listening on {host}:{port}" + (f", saving to {save_dir}" if save_dir else ""))
    try:
        asyncio.run(asyncio.Event().wait())
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()
