"""OpenAPI 3 document of a scoring server, from the entry script's samples or the model signature."""

from __future__ import annotations

from typing import Any

from .host import LoadedModel

_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "request_id": {"type": "string"}},
}


def build_openapi(model: LoadedModel, *, auth: bool) -> dict[str, Any]:
    """The document served at /swagger.json (valid per openapi-spec-validator)."""
    sig = model.signature
    request_schema: dict[str, Any] = sig.input_schema or {"type": "object"}
    response_schema: dict[str, Any] = sig.output_schema or {}
    if model.runtime.raw:
        request_content: dict[str, Any] = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    else:
        request_content = {
            "application/json": {"schema": request_schema},
            "application/msgpack": {"schema": request_schema},
        }
    error = {"description": "", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}

    def err(description: str) -> dict[str, Any]:
        return {**error, "description": description}

    score: dict[str, Any] = {
        "operationId": "score",
        "summary": f"Score with {model.name} version {model.version}",
        "requestBody": {"required": True, "content": request_content},
        "responses": {
            "200": {
                "description": "Scores",
                "content": {"application/json": {"schema": response_schema}},
            },
            "400": err("Malformed body or input not matching the schema"),
            "401": err("Missing or invalid key"),
            "413": err("Body too large"),
            "500": err("run() failed"),
            "503": err("Busy (retry after Retry-After seconds) or no model loaded"),
            "504": err("Scoring timed out"),
        },
    }
    if auth:
        score["security"] = [{"bearer": []}]
    plain = {"200": {"description": "OK"}, "503": {"description": "Not ready"}}
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": f"{model.name} scoring API",
            "version": model.version,
            "description": f"modelfleet scoring server; runtime {model.runtime.platform}",
        },
        "paths": {
            "/score": {"post": score},
            "/": {"get": {"operationId": "root", "summary": "200 once ready", "responses": plain}},
            "/v2/health/live": {"get": {"operationId": "live", "responses": {"200": {"description": "Live"}}}},
            "/v2/health/ready": {"get": {"operationId": "ready", "responses": plain}},
            "/v2/models/{name}": {
                "get": {
                    "operationId": "modelMetadata",
                    "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "Model metadata (Open Inference Protocol v2)"}, "404": err("Unknown model")},
                }
            },
            "/metrics": {"get": {"operationId": "metrics", "responses": {"200": {"description": "Prometheus text"}}}},
            "/v2/models/{name}/infer": {
                "post": {
                    "operationId": "infer",
                    "summary": "Open Inference Protocol v2 inference (models with a tensor signature)",
                    "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                    "responses": {"200": {"description": "Outputs"}, "400": err("Bad input"), "404": err("Unknown model")},
                }
            },
        },
        "components": {"schemas": {"Error": _ERROR}},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
