"""Herald's stages, framework-free: each takes a RawRecord and a table view and
returns the records to write. In flow order:

1. ``intake``: decode, validate, drop duplicates, one record per recipient.
2. ``users``: the user directory (compacted users topic as a table).
3. ``route``: join recipient and user, decide per channel.
4. ``email`` and ``push`` (with ``deliveries``, what the channels share): deliver,
   retry, dead-letter; push also keeps the gateway's dead device tokens.
5. ``delay``: the delay tiers every retry and wait goes through.

``context`` is what every stage is built from; ``outputs`` builds status events and
malformed-input records. pipeline.worker wires the stages into the runtime.
"""
