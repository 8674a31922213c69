"""Reading what gateways POST to the API: a bounded body, validated as one typed contract (state/)."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

Wire = TypeVar("Wire", bound=BaseModel)


async def read_wire(request: Request, model: type[Wire], limit: int, what: str) -> Wire | Response:
    """The body as ``model``, or the answer that says why not (413 over ``limit`` bytes, 400 with the
    first invalid field). ``what``: the contract's name in the message, e.g. "a demand report"."""
    body = await request.body()
    if len(body) > limit:
        return JSONResponse({"error": f"{what} is at most {limit} bytes"}, status_code=413)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return JSONResponse({"error": f"not {what}: {where}: {first['msg']}"}, status_code=400)
