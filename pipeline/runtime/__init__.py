"""The runtime: the one place that knows Faust and the Kafka clients.

- ``records``: RawRecord and Out, what stages read and write (no framework).
- ``sink``: acknowledged writes (acks=all) of a batch's outputs.
- ``tables``: table views whose writes land once a batch is acknowledged.
- ``batches``: the loops that run a stage over its topics and ack only handled offsets.
- ``continuity``: guards against records a Faust stream skips around rebalances.
- ``faust``: the Faust app and every Faust internal Herald relies on, checked at start-up.
- ``watchdog``, ``health``: stall detection, /healthz, /readyz and /metrics.
- ``app``: :class:`~pipeline.runtime.app.Runtime`, which ties them together.

Importing this package imports nothing: ``records`` is cheap for web/ and views.
"""
