"""Topics and catalog, declared in topologies/ and checked against the broker."""

from pipeline.topology.catalog import Catalog, TypeSpec, payload_type_error
from pipeline.topology.model import RetryPolicy, TopicSpec, Topology

__all__ = ["Catalog", "RetryPolicy", "TopicSpec", "Topology", "TypeSpec", "payload_type_error"]
