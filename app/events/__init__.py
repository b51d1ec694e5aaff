"""Live order events over a WebSocket: ``GET /orders/events`` and ``GET /live``.

Protocol (server -> client, JSON text frames; the client sends nothing):

* an order event, straight from its partition's events stream (``e{P}``)::

    {"type": "order.placed"|"order.completed"|"order.cancelled",
     "id": "<partition>.<stream id>",
     "order_id": ..., "customer_id": ..., "status": ..., "request_id": ..., "at": <ms>}

* ``{"type": "resync", "reason": "trimmed"|"unknown_id"|"replay_limit", "partition": P,
  "last_id": "<P>.<id>", "first_id": ..., "detail": ...}``: events of partition P after
  ``last_id`` may be gone (or the id is not from its stream, or it is further back than one replay reads:
  ``EventsConfig.replay_max_entries``). Reload state with ``GET /orders``; what
  follows is what the stream still holds, or for ``replay_limit`` live events.
* ``{"type": "live", "last_id": "<resume point>", "replayed": N}``: the replay is
  over, live events follow. ``last_id`` is where to resume if nothing else arrives.

Resume with ``?last_id=<resume point>``: the newest id received of each partition,
``<P>.<ms>-<seq>`` joined by commas (a partition not named: from its start), or one
plain ``<ms>-<seq>`` for every partition the socket sees (app/events/stream.py).
Every event after it, then live, no gap, no duplicate (see app/events/sockets.py for
the handover).

Auth: ``Authorization: Bearer <token>``, or for browsers the subprotocols
``["bearer", "<token>"]`` (the server answers ``bearer``). A customer gets their
own orders' events, the admin everyone's. Refused before the upgrade: 401
(no or bad token), 422 (bad last_id), 426 (not an upgrade), 503 (overloaded or
Redis unreadable).

Close codes: 1001 server shutdown, 1013 Redis failed during the replay,
1011 internal error, 4008 slow consumer (more than ``client_buffer`` events
behind). After any of them, reconnect with the last id received.
"""
