"""``GET /metrics``: Prometheus text, summed over every worker of this instance.

Who may read it: a client on loopback, or anyone with the admin token.
With BEHIND_PROXY the client is the address nginx forwards
(``X-Forwarded-For``, which nginx overwrites with the peer it saw), so

* ``curl 127.0.0.1:8080/metrics`` (through nginx) and
  ``curl 127.0.0.1:8001/metrics`` (one instance, direct) work on the box;
* from anywhere else, through nginx or straight to an instance, it takes
  ``Authorization: Bearer $ADMIN_TOKEN`` (401 without a token, 403 with a
  customer's).

BEHIND_PROXY trusts X-Forwarded-For as it trusts X-Request-ID: the app's port
must be reachable only by nginx and trusted hosts (make run binds 127.0.0.1; in
compose only the internal network reaches it).

Through nginx a scrape reaches one instance, whichever nginx picks: Prometheus
scrapes each instance's port instead (app/admin/prometheus.yml).
"""

from __future__ import annotations

from aiohttp import web

from app import metrics
from app.auth import require_admin
from app.observe import client_address, is_loopback


async def get_metrics(request: web.Request) -> web.Response:
    if not is_loopback(client_address(request)):
        await require_admin(request)
    body, content_type = await metrics.scrape(request.headers.get("Accept"))
    return web.Response(
        body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"}
    )
