"""The checked-in ``openapi.yaml`` is the app's OpenAPI document, and that document
tells clients what they need: the bearer scheme, problem responses, stable ids."""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any

import pytest

from app.cli import render_openapi_yaml
from app.config import Settings
from app.main import create_app

CHECKED_IN = Path(__file__).resolve().parents[2] / "openapi.yaml"
PUBLIC = {"/healthz", "/readyz"}
METHODS = {"get", "post", "put", "patch", "delete"}


@functools.cache
def spec() -> dict[str, Any]:
    document: dict[str, Any] = create_app(Settings()).openapi()
    return document


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in spec()["paths"].items()
        for method, op in item.items() if method in METHODS
    ]


def test_checked_in_openapi_is_current() -> None:
    generated = render_openapi_yaml(spec())
    current = CHECKED_IN.read_text() if CHECKED_IN.exists() else ""
    if generated != current:
        diff = "".join(list(difflib.unified_diff(
            current.splitlines(keepends=True), generated.splitlines(keepends=True),
            "openapi.yaml (checked in)", "openapi.yaml (generated)", n=1,
        ))[:60])
        pytest.fail(
            "openapi.yaml is out of date: regenerate with `vmigrate openapi > openapi.yaml`"
            f" and commit it.\n{diff}",
            pytrace=False,
        )


def test_bearer_scheme_declared_on_every_protected_operation() -> None:
    schemes = spec()["components"]["securitySchemes"]
    assert schemes["HTTPBearer"] == {
        **schemes["HTTPBearer"], "type": "http", "scheme": "bearer"
    }
    for path, method, op in operations():
        if path in PUBLIC:
            assert not op.get("security"), (method, path)
        else:
            assert {"HTTPBearer": []} in op.get("security", []), (method, path)
            assert {"401", "403"} <= op["responses"].keys(), (method, path)


def test_operation_ids_are_unique() -> None:
    ids = [op["operationId"] for _, _, op in operations()]
    assert len(ids) == len(set(ids))


def test_clouds_operations() -> None:
    expected = {
        ("/v1/clouds", "post"): "create_cloud",
        ("/v1/clouds", "get"): "list_clouds",
        ("/v1/clouds/kinds", "get"): "list_cloud_kinds",
        ("/v1/clouds/{cloud_id}", "get"): "get_cloud",
        ("/v1/clouds/{cloud_id}", "patch"): "update_cloud",
        ("/v1/clouds/{cloud_id}", "delete"): "delete_cloud",
    }
    found = {(p, m): op["operationId"] for p, m, op in operations() if p.startswith("/v1/clouds")}
    assert found == expected
    for path, _method, op in operations():
        if not path.startswith("/v1/clouds"):
            continue
        for status, response in op["responses"].items():
            if int(status) >= 400:
                media = response["content"]["application/problem+json"]
                assert media["schema"] == {"$ref": "#/components/schemas/Problem"}
    create = spec()["paths"]["/v1/clouds"]["post"]
    assert "Idempotency-Key" in {p["name"] for p in create["parameters"]}
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["propertyName"] == "kind"
    assert "library" not in body["discriminator"]["mapping"]
    # Derived from the registered driver specs: only kinds with a driver are accepted.
    assert set(body["discriminator"]["mapping"]) == {"vmware", "esxi", "linux"}
    placement = spec()["components"]["schemas"]["CloudKindOut"]["properties"]["placement"]
    assert {"$ref": "#/components/schemas/VspherePlacement"} in placement["anyOf"]


def test_credentials_are_write_only_in_the_schema() -> None:
    schemas = spec()["components"]["schemas"]
    assert "credentials" not in schemas["CloudOut"]["properties"]
    assert schemas["PasswordCredentials"]["properties"]["password"]["writeOnly"] is True
