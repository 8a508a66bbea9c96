"""The OpenAPI paths and schemas of deferred jobs and of the files and batches API (see
:mod:`skinflint.server.batches_api`), joined into the document by
:mod:`skinflint.server.openapi`."""

from __future__ import annotations

from typing import Any

from skinflint.interfaces import FINISHED
from skinflint.pipeline.defer import PRIORITY_HEADER

__all__ = ["PRIORITY_PARAMETER", "batch_paths", "batch_schemas"]

JSON = dict[str, Any]

PRIORITY_PARAMETER: JSON = {
    "name": PRIORITY_HEADER, "in": "header", "required": False,
    "schema": {"enum": ["batch", "realtime"]},
    "description": "batch: answer 202 with a job, sent through the provider's batch API at "
    "its discount (as for a feature configured deferrable); realtime: never defer",
}

_STATES = ["queued", "submitted", *sorted(FINISHED)]


def _ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: JSON) -> JSON:
    return {"application/json": {"schema": schema}}


def batch_schemas() -> JSON:
    return {
        "Job": {
            "type": "object",
            "required": ["id", "object", "status", "model", "created_at"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "skinflint.job"},
                "status": {"enum": _STATES},
                "model": {"type": "string"},
                "created_at": {"type": "integer"},
                "finished_at": {"type": "integer"},
                "request_id": {"type": "string"},
                "response": {"type": "object", "description": "the chat.completion, once "
                             "completed"},
                "error": {"type": "object", "properties": {
                    "code": {"type": "string"}, "message": {"type": "string"}},
                    "description": "why it failed or was cancelled"},
            },
        },
        "BatchRequest": {
            "type": "object",
            "required": ["input_file_id", "endpoint"],
            "properties": {
                "input_file_id": {"type": "string"},
                "endpoint": {"const": "/v1/chat/completions"},
                "completion_window": {"const": "24h"},
                "metadata": {"type": ["object", "null"]},
            },
        },
    }


def _op(summary: str, schema: JSON, content: JSON | None = None) -> JSON:
    return {"summary": summary, "security": [{"gatewayKey": []}],
            "responses": {"200": {"description": summary,
                                  "content": content or _json(schema)}}}


def _with_id(op: JSON, what: str) -> JSON:
    return {**op, "parameters": [{"name": "id", "in": "path", "required": True,
                                  "schema": {"type": "string"}, "description": what}]}


def batch_paths(errors: JSON) -> JSON:
    """The paths; ``errors``: the error responses every operation may give."""
    obj = _ref("Object")
    upload = _op("Upload a batch input file (multipart: file, purpose=batch)", obj)
    upload["requestBody"] = {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file", "purpose"], "properties": {
            "file": {"type": "string", "format": "binary"}, "purpose": {"const": "batch"}}}}}}
    create = _op("Create a batch from an uploaded file; its lines are sent at once", obj)
    create["requestBody"] = {"required": True, "content": _json(_ref("BatchRequest"))}
    paths = {
        "/v1/skinflint/jobs/{id}": {"get": _with_id(_op(
            "A deferred request's job: its status and, once completed, its answer",
            _ref("Job")), "the job id the 202 answered")},
        "/v1/files": {"post": upload, "get": {**_op(
            "The tenant's uploaded files, newest first", obj), "parameters": [
                {"name": "purpose", "in": "query", "required": False,
                 "schema": {"type": "string"}, "description": "only files of this purpose"},
                {"name": "after", "in": "query", "required": False,
                 "schema": {"type": "string"}, "description": "list from after this file id"},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 10_000,
                            "default": 10_000}},
                {"name": "order", "in": "query", "required": False,
                 "schema": {"enum": ["asc", "desc"], "default": "desc"}}]}},
        "/v1/files/{id}": {
            "get": _with_id(_op("A file's object", obj), "a file id"),
            "delete": _with_id(_op(
                "Delete an uploaded file (refused while a batch made from it runs)", obj),
                "a file id")},
        "/v1/files/{id}/content": {"get": _with_id(_op(
            "A file's content: an uploaded file, or a batch's output or error file (JSONL)",
            obj, {"application/octet-stream": {}}), "a file id")},
        "/v1/batches": {"post": create, "get": {**_op(
            "The tenant's batches, newest first", obj), "parameters": [
                {"name": "after", "in": "query", "required": False,
                 "schema": {"type": "string"}, "description": "list from after this batch id"},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}}]}},
        "/v1/batches/{id}": {"get": _with_id(_op(
            "A batch: its status and counts aggregate its lines'", obj), "a batch id")},
        "/v1/batches/{id}/cancel": {"post": _with_id(_op(
            "Cancel a batch: lines not answered yet are cancelled", obj), "a batch id")},
    }
    for ops in paths.values():
        for op in ops.values():
            op["responses"].update(errors)
    return paths
