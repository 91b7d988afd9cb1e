"""What every stage is built from: one object instead of a constructor parameter each."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.contracts import Contracts
from pipeline.contracts.records import ChannelRequest
from pipeline.rendering import TemplateCatalog
from pipeline.settings import Settings
from pipeline.times import Clock
from pipeline.topology import Catalog, Topology
from pipeline.topology.limits import Limits
from pipeline.views import Cancellations, TemplateArchive


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
    template_archive: TemplateArchive
    """Every template version ever rendered (the worker follows and fills it)."""

    def templates_for(self, template_id: str, version: str | None) -> TemplateCatalog:
        """What renders ``template_id`` at ``version`` (a route's template_version): the
        deployed templates for None or the deployed version, else the archived one
        (pipeline.views.TemplateArchive.catalog: its errors)."""
        if version is None or version == self.templates.version(template_id):
            return self.templates
        return self.template_archive.catalog(template_id, version)

    def template_version(self, request: ChannelRequest) -> str | None:
        """The template version ``request`` renders (None: it renders none)."""
        if request.payload_mode != "template":
            return None
        return request.template_version or self.templates.version(request.template_id)

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
            template_archive=TemplateArchive(settings),
        )
