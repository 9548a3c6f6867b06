"""Pagination of list endpoints: ``limit`` and ``cursor`` query parameters.

A list answers a JSON array as always; with ``limit`` it holds at most that many items and,
if more follow, the ``X-Next-Cursor`` header holds the cursor to pass for the next page. A
cursor names its list (and the list's filters), so one from another list is refused (422,
field ``cursor``). Items are in a stable order (each list's sort key), and a cursor is the
position after the last item given: an item created or deleted meanwhile never makes a page
skip or repeat another.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Annotated, TypeVar

from fastapi import Depends, Query, Response
from pydantic import BaseModel

from aecp.common.errors import InvalidInput

T = TypeVar("T")
NEXT_CURSOR = "X-Next-Cursor"
MAX_LIMIT = 1000
SortKey = list[str | float | int]


class PageQuery(BaseModel):
    limit: int | None = None
    cursor: str | None = None


def page_query(
    limit: Annotated[
        int | None, Query(ge=1, le=MAX_LIMIT, description="at most this many items")
    ] = None,
    cursor: Annotated[
        str | None,
        Query(max_length=2048, description=f"from the {NEXT_CURSOR} header of the page before"),
    ] = None,
) -> PageQuery:
    return PageQuery(limit=limit, cursor=cursor)


Page = Annotated[PageQuery, Depends(page_query)]


def paginate(
    items: Sequence[T],
    list_id: str,
    key: Callable[[T], SortKey],
    page: PageQuery,
    response: Response,
) -> list[T]:
    """The page of ``items`` (sorted by ``key``) that ``page`` asks for, setting the next
    cursor header on ``response`` if more follow."""
    ordered = sorted(items, key=key)
    if page.cursor is not None:
        after = _decode(page.cursor, list_id)
        try:
            ordered = [i for i in ordered if key(i) > after]
        except TypeError:  # a position of another shape: not one this list gave
            raise InvalidInput("cursor", "is not a cursor of this list") from None
    if page.limit is not None and len(ordered) > page.limit:
        ordered = ordered[: page.limit]
        response.headers[NEXT_CURSOR] = _encode(list_id, key(ordered[-1]))
    return ordered


def _encode(list_id: str, after: SortKey) -> str:
    raw = json.dumps({"l": list_id, "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str, list_id: str) -> SortKey:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        got = json.loads(raw)
        after, source = got["a"], got["l"]
        if not isinstance(after, list) or not isinstance(source, str):
            raise ValueError("bad shape")
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidInput("cursor", "is not a cursor of this API") from None
    if source != list_id:
        raise InvalidInput("cursor", f"is from another list ({source[:64]}), not {list_id}")
    return after
