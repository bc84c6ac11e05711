"""Interactive API docs that work without internet: ``/docs`` (Swagger UI) and
``/redoc`` (ReDoc), their JavaScript, CSS and icon served by the app itself.

FastAPI's own pages load those assets from a CDN, so they are blank on a machine that
cannot reach it. The files come from the ``fastapi-offline`` package (which ships
Swagger UI's ``swagger-ui-bundle.js`` and ``swagger-ui.css``, ReDoc's
``redoc.standalone.js`` and a favicon); only those four names are served, from
``/docs/assets/``. ReDoc's Google Fonts link is left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS = "/docs/assets"

Asset = Literal["swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"]

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    app = request.app
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
        swagger_ui_parameters=app.swagger_ui_parameters,
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    app = request.app
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS}/favicon.png", with_google_fonts=False,
    )


@router.get(ASSETS + "/{name}")
async def asset(name: Asset) -> FileResponse:
    """One of the four shipped files (the Literal refuses any other name with a 422)."""
    return FileResponse(ASSETS_DIR / name, headers={"Cache-Control": "public, max-age=86400"})


def install(app: FastAPI) -> None:
    """Serve the docs pages; build the app with ``docs_url=None, redoc_url=None``."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("create the app with docs_url=None and redoc_url=None")
    app.include_router(router)
