"""The OpenAPI document is valid OpenAPI 3.1 and lists exactly the API's routes."""

from __future__ import annotations

from openapi_spec_validator import validate
from starlette.routing import Route

from relaygate.config import quickstart_config
from relaygate.http.app import create_app
from relaygate.http.openapi import OPERATIONS, document

NOT_DOCUMENTED = {"/api/v1/openapi.json", "/api/v1/docs"}


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = document()
    validate(spec)  # raises with the first problem
    assert spec["openapi"] == "3.1.0"
    assert len({o["operationId"] for p in spec["paths"].values() for o in p.values()}) == len(
        OPERATIONS
    )


def test_every_api_route_is_documented_and_nothing_else() -> None:
    app = create_app(quickstart_config())
    served = {
        (method.lower(), route.path)
        for route in app.routes
        if isinstance(route, Route)
        and route.path.startswith("/api/v1")
        and route.path not in NOT_DOCUMENTED
        for method in (route.methods or set()) - {"HEAD"}
    }
    documented = {(op.method, op.path) for op in OPERATIONS}
    assert served == documented
