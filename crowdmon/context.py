"""The request being handled, as seen by code running inside it.

The middleware sets :data:`current_request` for the duration of each HTTP request, so decorators
and tracking calls can label what they record with the route template of the request they serve.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from crowdmon._types import Scope
from crowdmon.routes import handler_label_for


@dataclass
class RequestContext:
    scope: Scope
    entry_root_path: str

    def endpoint(self) -> str:
        """The route template of the request (known once the app's router has matched it)."""
        return handler_label_for(self.scope, self.entry_root_path, 200)


current_request: ContextVar[RequestContext | None] = ContextVar("crowdmon_request", default=None)


def current_endpoint() -> str | None:
    """The route template of the request being handled, or ``None`` outside a request."""
    context = current_request.get()
    return None if context is None else context.endpoint()
