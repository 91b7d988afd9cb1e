"""The user directory: the compacted users topic materialised as a table by user_id.

A profile is checked at the door (:func:`check_profile`): the producer API and `herald
users put` refuse a bad one with the reason, and the directory keeps a bad profile from
another producer out of the table (the user's previous profile stays) and writes it to
``notification.malformed`` with its reason, so no route is built on it later.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pipeline.contracts.records import UserProfile
from pipeline.errors import DecodeError, InvalidAddressError, ValidationError
from pipeline.providers.mime import checked_address
from pipeline.providers.sms import e164
from pipeline.runtime.records import Out, RawRecord
from pipeline.stages.context import StageContext
from pipeline.stages.outputs import malformed
from pipeline.topology.partitioning import partition_for

_HHMM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
#: Caps on what a profile may carry (a route and its dead letter must fit a record).
MAX_USER_ID = 200
MAX_TOKEN = 4096
MAX_DEVICES = 50
#: Contacts (sms, webhook, slack, ...) per profile, and the longest one (a URL).
MAX_CONTACTS = 16
MAX_CONTACT = 2048
MAX_LIST = 200
MAX_TEXT = 200


def check_profile(profile: UserProfile) -> None:
    """Raise ValidationError (with a machine-readable reason) unless ``profile`` is one
    Herald can route on: a plain mailbox, HH:MM quiet hours, a known timezone, bounded
    sizes."""
    if not profile.user_id or len(profile.user_id) > MAX_USER_ID:
        raise ValidationError(
            f"user_id must have 1 to {MAX_USER_ID} characters", reason="invalid_user_id"
        )
    if profile.email is not None:
        try:
            checked_address(profile.email)
        except InvalidAddressError as exc:
            raise ValidationError(exc.detail[:300], reason="invalid_email") from exc
    quiet = profile.quiet_hours
    if quiet is not None and not (_HHMM.fullmatch(quiet.start) and _HHMM.fullmatch(quiet.end)):
        raise ValidationError(
            f"quiet hours must be HH:MM-HH:MM (00:00 to 23:59): {quiet.start[:20]!r}-"
            f"{quiet.end[:20]!r}",
            reason="invalid_quiet_hours",
        )
    if profile.timezone is not None:
        try:
            ZoneInfo(profile.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValidationError(
                f"unknown IANA timezone {profile.timezone[:60]!r}", reason="unknown_timezone"
            ) from exc
    if len(profile.push_devices) > MAX_DEVICES or any(
        not d.token or len(d.token) > MAX_TOKEN for d in profile.push_devices
    ):
        raise ValidationError(
            f"at most {MAX_DEVICES} push devices, each with a token of 1 to {MAX_TOKEN} characters",
            reason="invalid_push_devices",
        )
    texts = [profile.preferred_language, profile.tenant_id, *profile.channels_disabled]
    if (
        len(profile.opt_outs) > MAX_LIST
        or len(profile.channels_disabled) > MAX_LIST
        or any(len(t) > MAX_TEXT for t in [*texts, *profile.opt_outs] if t)
    ):
        raise ValidationError(
            f"at most {MAX_LIST} opt-outs and disabled channels, texts of at most "
            f"{MAX_TEXT} characters",
            reason="profile_too_large",
        )
    _check_contacts(profile.contacts)


def _check_contacts(contacts: Mapping[str, str]) -> None:
    if len(contacts) > MAX_CONTACTS or any(
        not 0 < len(k) <= MAX_TEXT or len(v) > MAX_CONTACT for k, v in contacts.items()
    ):
        raise ValidationError(
            f"at most {MAX_CONTACTS} contacts, each named and at most {MAX_CONTACT} characters",
            reason="profile_too_large",
        )
    if number := contacts.get("sms"):
        try:
            e164(number)
        except InvalidAddressError as exc:
            raise ValidationError(exc.detail[:300], reason="invalid_phone_number") from exc


class UserDirectory:
    """Keeps the users table: the latest profile (Avro bytes) per user, None-free.

    The table is partitioned like the recipients stream (murmur2 of user_id). A
    profile the user service wrote elsewhere (another partitioner) moves to its home
    partition first, through ``notification.users.keyed``.
    """

    def __init__(self, ctx: StageContext) -> None:
        settings, topology = ctx.settings, ctx.topology
        self._contracts = ctx.contracts
        self.users_topic = settings.topic("notification.users")
        self.keyed_topic = settings.topic("notification.users.keyed")
        self._malformed_topic = settings.topic("notification.malformed")
        self._partitions = topology.spec("notification.users").partitions

    def handle(self, raw: RawRecord, table: MutableMapping[bytes, Any], now_ms: int) -> list[Out]:
        """Apply one profile (or tombstone) to ``table``; outputs only for forwards and errors."""
        if not raw.key:
            return [
                self._malformed(raw, "missing_key", "user records are keyed by user_id", now_ms)
            ]
        home = partition_for(raw.key, self._partitions)
        if raw.topic == self.users_topic and raw.partition != home:
            return [Out(self.keyed_topic, raw.key, raw.value, partition=home)]
        if raw.value is None:
            del table[raw.key]
            return []
        try:
            profile = self._contracts.user.decode(raw.value)
        except DecodeError as exc:
            return [self._malformed(raw, exc.reason, exc.detail, now_ms)]
        if profile.user_id.encode("utf-8") != raw.key:
            detail = f"record key {raw.key!r} differs from user_id {profile.user_id!r}"
            return [self._malformed(raw, "key_mismatch", detail, now_ms)]
        try:
            check_profile(profile)
        except ValidationError as exc:  # the user's previous profile stays
            return [self._malformed(raw, exc.reason, exc.detail, now_ms)]
        table[raw.key] = raw.value
        return []

    def _malformed(self, raw: RawRecord, reason: str, detail: str, now_ms: int) -> Out:
        return malformed(self._contracts, self._malformed_topic, raw, reason, detail, now_ms)
