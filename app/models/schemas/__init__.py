"""Pydantic request and response schemas, one module per resource."""
