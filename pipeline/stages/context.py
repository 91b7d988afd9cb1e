"""What every stage is built from: one object instead of a constructor parameter each."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.contracts import Contracts
from pipeline.rendering import TemplateCatalog
from pipeline.settings import Settings
from pipeline.times import Clock
from pipeline.topology import Catalog, Topology
from pipeline.topology.limits import Limits
from pipeline.views import Cancellations


@dataclass(frozen=True, slots=True)
class StageContext:
    """The settings and the loaded catalogs a stage decides with."""

    settings: Settings
    """The validated settings."""
    contracts: Contracts
    """Avro codecs of every record Herald reads or writes."""
    catalog: Catalog
    """The notification type catalog (topologies/catalog.yaml)."""
    topology: Topology
    """Declared topics and retry tiers (topologies/topics.yaml)."""
    templates: TemplateCatalog
    """Mail and push templates."""
    clock: Clock
    """Herald's notion of now (shiftable for drills)."""
    limits: Limits
    """Rate limits (topologies/limits.yaml)."""
    cancellations: Cancellations
    """Cancelled notifications (the worker follows the topic; unfollowed, it is empty)."""

    @classmethod
    def load(cls, settings: Settings) -> StageContext:
        """Everything loaded from the folders ``settings`` names."""
        topology = Topology.load(settings)
        limits = Limits.load(settings)
        limits.check(tuple(topology.channels))
        return cls(
            settings=settings,
            contracts=Contracts(settings),
            catalog=Catalog.load(settings, tuple(topology.channels)),
            topology=topology,
            templates=TemplateCatalog(settings.templates_dir),
            clock=Clock(settings.clock_offset_ms),
            limits=limits,
            cancellations=Cancellations(settings),
        )
