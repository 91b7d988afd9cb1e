"""Rate limits, declared as data in topologies/limits.yaml (docs/limits.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.errors import ConfigurationError
from pipeline.settings import Settings

#: The producers entry every producer without its own entry gets.
ANY_PRODUCER = "*"


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket's shape: ``per_second`` on average, at most ``burst`` at once."""

    per_second: float
    """Sustained rate."""
    burst: int
    """Largest number taken at once after a quiet spell (the bucket's size)."""

    @classmethod
    def parse(cls, entry: Any, where: str) -> Rate:
        """The rate an entry such as ``{per_second: 100, burst: 200}`` declares."""
        if not isinstance(entry, Mapping) or set(entry) - {"per_second", "burst"}:
            raise ConfigurationError(f"{where}: expected {{per_second: N, burst: N}}")
        try:
            per_second = float(entry["per_second"])
            burst = int(entry.get("burst", max(1, math.ceil(per_second))))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"{where}: per_second must be a number ({exc})") from exc
        if not per_second > 0 or burst < 1:
            raise ConfigurationError(f"{where}: per_second must be > 0 and burst >= 1")
        return cls(per_second, burst)


@dataclass(frozen=True, slots=True)
class Limits:
    """Every limit of topologies/limits.yaml."""

    producers: dict[str, Rate] = field(default_factory=dict)
    """Intents a producer may send through the HTTP intake, by producer id
    (``*``: every producer without its own entry)."""

    def producer(self, name: str) -> Rate | None:
        """The limit of producer ``name``, or None when it has none."""
        return self.producers.get(name) or self.producers.get(ANY_PRODUCER)

    @classmethod
    def load(cls, settings: Settings) -> Limits:
        """The limits of ``settings``' topologies/ (none when the file is absent)."""
        path = settings.topology_dir / "limits.yaml"
        if not path.exists():
            return cls()
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"cannot read limits {path}: {exc}") from exc
        return cls.from_dict(doc, source=str(path))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str = "limits") -> Limits:
        """The limits in ``doc``."""
        if not isinstance(doc, Mapping):
            raise ConfigurationError(f"{source}: expected a mapping of sections")
        if unknown := set(doc) - {"producers"}:
            raise ConfigurationError(f"{source}: unknown sections {sorted(unknown)}")
        producers = {
            str(name): Rate.parse(entry, f"{source}: producers.{name}")
            for name, entry in (doc.get("producers") or {}).items()
        }
        return cls(producers=producers)
