"""Several connections to one email server, used at once by one delivery lane."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pipeline.providers import EmailProvider, SendReceipt
from pipeline.providers.mime import Mail


class ProviderPool:
    """An :class:`EmailProvider` over ``providers`` (one connection each): a send takes
    an idle one, so up to ``len(providers)`` messages are in flight at once."""

    def __init__(self, providers: Sequence[EmailProvider]) -> None:
        self._providers = list(providers)
        self._idle: asyncio.Queue[EmailProvider] = asyncio.Queue()
        for provider in self._providers:
            self._idle.put_nowait(provider)

    @property
    def size(self) -> int:
        return len(self._providers)

    async def send(self, mail: Mail) -> SendReceipt:
        provider = await self._idle.get()
        try:
            return await provider.send(mail)
        finally:
            self._idle.put_nowait(provider)

    async def probe(self) -> None:
        provider = await self._idle.get()
        try:
            await provider.probe()
        finally:
            self._idle.put_nowait(provider)

    async def close(self) -> None:
        for provider in self._providers:
            await provider.close()
