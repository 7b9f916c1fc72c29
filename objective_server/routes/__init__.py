"""Thin route modules: parse the request, call the service layer, shape the response.

`PUBLIC` routers are open; `PROTECTED` ones need the API token when one is configured.
"""

from objective_server.routes import batch, catalog, docs, health, losses, metrics, mixture, runs

PUBLIC = (health.router,)
PROTECTED = (batch.router, losses.router, mixture.router, runs.router, catalog.router, metrics.router, docs.router)

__all__ = ["PROTECTED", "PUBLIC"]
