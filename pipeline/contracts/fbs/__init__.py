"""Generated FlatBuffers bindings of schemas/notification.fbs (`make fbs`; do not edit).

Use them through :mod:`pipeline.contracts.push`, which gives them types.
"""
