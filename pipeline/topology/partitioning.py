"""Key-to-partition mapping shared by every Herald producer and agent.

Herald uses the Java client's murmur2 partitioner everywhere (aiokafka's default,
and confluent-kafka with ``partitioner=murmur2_random``), so a key lands on the same
partition whichever client wrote it.
"""

from __future__ import annotations

from aiokafka.partitioner import murmur2

#: The librdkafka setting that matches the Java (and aiokafka) partitioner.
CONFLUENT_PARTITIONER = "murmur2_random"


def partition_for(key: bytes, partitions: int) -> int:
    """The partition the Java default partitioner picks for ``key``."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions
