"""The simulator's provider dialects: each provider's records as HubSpot and Salesforce serve them.

Every simulated provider answers in every dialect at once, under its own
``/p/{provider}`` prefix, so a test picks the dialect by the pack it configures
(``IDIS_PROVIDER_<NAME>_API``). The records, the fault layer (outages, 429s,
latency) and the bearer-token check are the provider's own: the dialects only
change paths, payload shapes, headers and error bodies.

HubSpot (https://developers.hubspot.com/docs/api/crm/search):
    ``POST /crm/v3/objects/deals/search`` (``hs_lastmodifieddate`` GTE filter,
    ascending, ``after`` paging, HTTP 400 past 10,000 results),
    ``GET /crm/v3/objects/deals[/{id}]``, ``PATCH /crm/v3/objects/deals/{id}``
    (``{"properties": {...}}``); ``X-HubSpot-RateLimit-*`` on every answer;
    ``GET /account-info/v3/details`` (the account's ``timeZone``: ``US/Eastern``).
Salesforce (https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/):
    ``GET /services/data/{v}/query?q=`` (the SOQL forms the pack sends),
    ``/sobjects/Opportunity/{id}`` (GET; PATCH answers 204), ``/updated/`` (30
    days), ``/deleted/`` (15 days); errors as JSON arrays (``INVALID_SESSION_ID`` on a bad token,
    ``NOT_FOUND``, ``INVALID_REPLICATION_DATE``); ``Sforce-Limit-Info``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._state import Record, SimulatorState

__all__ = [
    "DIALECT_ENDPOINTS",
    "HUBSPOT_TIME_ZONE",
    "dialect_endpoint",
    "dialect_routes",
    "unauthorized_body",
]

#: Results one HubSpot search query pages through before HubSpot answers 400.
HUBSPOT_SEARCH_LIMIT = 10_000
HUBSPOT_DAILY = 250_000
#: The simulated HubSpot account's time zone (``GET /account-info/v3/details``).
HUBSPOT_TIME_ZONE = "US/Eastern"
SALESFORCE_DAILY = 15_000
_SF_UPDATED_WINDOW = timedelta(days=30)
_SF_DELETED_WINDOW = timedelta(days=15)

#: (pattern of the path after ``/p/{provider}/``, endpoint name the fault layer and auth see).
DIALECT_ENDPOINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^account-info/v3/details$"), "account_info"),
    (re.compile(r"^crm/v3/objects/deals/search$"), "changes"),
    (re.compile(r"^crm/v3/objects/deals$"), "records"),
    (re.compile(r"^crm/v3/objects/deals/[^/]+$"), "record"),
    (re.compile(r"^services/data/v[0-9.]+/query$"), "changes"),
    (re.compile(r"^services/data/v[0-9.]+/sobjects/Opportunity/(updated|deleted)$"), "replay"),
    (re.compile(r"^services/data/v[0-9.]+/sobjects/Opportunity/[^/]+$"), "record"),
)


def dialect_endpoint(rest: str) -> str | None:
    """The endpoint name of a dialect path (after ``/p/{provider}/``), or None."""
    from ._gdrive import EXTRA_ENDPOINTS

    for pattern, name in (*DIALECT_ENDPOINTS, *EXTRA_ENDPOINTS):
        if pattern.match(rest):
            return name
    return None


def unauthorized_body(rest: str) -> tuple[bytes, bytes] | None:
    """A dialect's 401 body and content type for a bad token, or None for the generic one."""
    if rest.startswith("services/data/"):
        body = [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
        return json.dumps(body).encode(), b"application/json"
    if rest.startswith("crm/"):
        body2 = {
            "status": "error",
            "message": "Authentication credentials not found.",
            "category": "INVALID_AUTHENTICATION",
        }
        return json.dumps(body2).encode(), b"application/json"
    from ._gdrive import extra_unauthorized_body

    return extra_unauthorized_body(rest)


def _ms(moment: datetime) -> int:
    return int(moment.astimezone(UTC).timestamp() * 1000)


def _ms_floor(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _hs_time(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _sf_time(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}+0000"


def _hs_object(record: Record) -> dict[str, Any]:
    properties = {k: None if v is None else str(v) for k, v in record.data.items()}
    properties.update(
        {"hs_object_id": record.id, "hs_lastmodifieddate": _hs_time(record.updated_at)}
    )
    return {
        "id": record.id,
        "properties": properties,
        "createdAt": _hs_time(record.updated_at),
        "updatedAt": _hs_time(record.updated_at),
        "archived": False,
    }


def _sf_object(record: Record, version: str) -> dict[str, Any]:
    return {
        "attributes": {
            "type": "Opportunity",
            "url": f"/services/data/{version}/sobjects/Opportunity/{record.id}",
        },
        **record.data,
        "Id": record.id,
        "SystemModstamp": _sf_time(record.updated_at),
    }


def _sf_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse([{"message": message, "errorCode": code}], status_code=status)


def _hs_error(status: int, category: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"status": "error", "message": message, "category": category}, status_code=status
    )


_SOQL_TIME = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)"
_SOQL_AFTER_KEY = re.compile(
    rf"WHERE SystemModstamp > {_SOQL_TIME} OR \(SystemModstamp = {_SOQL_TIME} AND Id > '([^']+)'\)"
)
_SOQL_SINCE = re.compile(rf"WHERE SystemModstamp >= {_SOQL_TIME}")
_SOQL_IDS = re.compile(r"WHERE Id IN \(([^)]*)\)")
_SOQL_LIMIT = re.compile(r"LIMIT (\d+)")


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def dialect_routes(sim: SimulatorState, provider_of: Callable[[Request], Any]) -> list[Route]:
    """The HubSpot and Salesforce routes over the simulator's records."""

    def hs_headers(provider: Any) -> dict[str, str]:
        used = sum(provider.requests.values())
        return {
            "X-HubSpot-RateLimit-Daily": str(HUBSPOT_DAILY),
            "X-HubSpot-RateLimit-Daily-Remaining": str(max(0, HUBSPOT_DAILY - used)),
            "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
            "X-HubSpot-RateLimit-Max": "100",
            "X-HubSpot-RateLimit-Remaining": "99",
        }

    def sf_headers(provider: Any) -> dict[str, str]:
        used = sum(provider.requests.values())
        return {"Sforce-Limit-Info": f"api-usage={used}/{SALESFORCE_DAILY}"}

    def live(provider: Any) -> list[Record]:
        return sorted(
            (r for r in provider.records.values() if not r.deleted),
            key=lambda r: (_ms(r.updated_at), r.id),
        )

    async def hs_search(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            filters = body.get("filterGroups", [{}])[0].get("filters", [])
            anchor = next(
                int(f["value"])
                for f in filters
                if f.get("propertyName") == "hs_lastmodifieddate" and f.get("operator") == "GTE"
            )
            limit = int(body.get("limit", 10))
            offset = int(body.get("after") or 0)
        except (ValueError, TypeError, KeyError, IndexError, StopIteration, AttributeError):
            return _hs_error(400, "VALIDATION_ERROR", "Invalid search request")
        if not 1 <= limit <= 200:
            return _hs_error(400, "VALIDATION_ERROR", "limit must be between 1 and 200")
        if offset + limit > HUBSPOT_SEARCH_LIMIT:
            return _hs_error(
                400,
                "VALIDATION_ERROR",
                "There was a problem with the request: paging is limited to 10,000 results",
            )
        with sim.lock:
            provider = provider_of(request)
            found = [r for r in live(provider) if _ms(r.updated_at) >= anchor]
            headers = hs_headers(provider)
        page = found[offset : offset + limit]
        answer: dict[str, Any] = {"total": len(found), "results": [_hs_object(r) for r in page]}
        if offset + limit < len(found):
            after = str(offset + limit)
            answer["paging"] = {"next": {"after": after, "link": f"?after={after}"}}
        return JSONResponse(answer, headers=headers)

    async def hs_account(request: Request) -> Response:
        with sim.lock:
            provider = provider_of(request)
            headers = hs_headers(provider)
            now = sim.now()
        offset = now.astimezone(ZoneInfo(HUBSPOT_TIME_ZONE)).utcoffset() or timedelta(0)
        minutes = int(offset.total_seconds()) // 60
        sign = "-" if minutes < 0 else "+"
        answer = {
            "portalId": 62515,
            "accountType": "STANDARD",
            "timeZone": HUBSPOT_TIME_ZONE,
            "companyCurrency": "USD",
            "additionalCurrencies": [],
            "utcOffset": f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}",
            "utcOffsetMilliseconds": minutes * 60_000,
            "uiDomain": "app.hubspot.com",
            "dataHostingLocation": "na1",
        }
        return JSONResponse(answer, headers=headers)

    async def hs_list(request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "10"))
            offset = int(request.query_params.get("after") or 0)
        except ValueError:
            return _hs_error(400, "VALIDATION_ERROR", "Invalid paging")
        with sim.lock:
            provider = provider_of(request)
            records = live(provider)
            headers = hs_headers(provider)
        page = records[offset : offset + limit]
        answer: dict[str, Any] = {"results": [_hs_object(r) for r in page]}
        if offset + limit < len(records):
            answer["paging"] = {"next": {"after": str(offset + limit)}}
        return JSONResponse(answer, headers=headers)

    async def hs_object(request: Request) -> Response:
        if request.method == "PATCH":
            return await patch(request, hubspot=True)
        with sim.lock:
            provider = provider_of(request)
            found = provider.records.get(request.path_params["object_id"])
            body = _hs_object(found) if found is not None and not found.deleted else None
            headers = hs_headers(provider)
        if body is None:
            return _hs_error(404, "OBJECT_NOT_FOUND", "resource not found")
        return JSONResponse(body, headers=headers)

    async def sf_query(request: Request) -> Response:
        version = request.path_params["version"]
        soql = request.query_params.get("q", "")
        limit_match = _SOQL_LIMIT.search(soql)
        limit = int(limit_match.group(1)) if limit_match else 2000
        with sim.lock:
            provider = provider_of(request)
            records = [
                r.__class__(**{**_fields(r), "updated_at": _ms_floor(r.updated_at)})
                for r in live(provider)
            ]
            headers = sf_headers(provider)
        records.sort(key=lambda r: (r.updated_at, r.id))
        if (match := _SOQL_AFTER_KEY.search(soql)) is not None:
            stamp, last = _parse(match.group(1)), match.group(3)
            chosen = [r for r in records if (r.updated_at, r.id) > (stamp, last)]
        elif (match := _SOQL_SINCE.search(soql)) is not None:
            stamp = _parse(match.group(1))
            chosen = [r for r in records if r.updated_at >= stamp]
        elif (match := _SOQL_IDS.search(soql)) is not None:
            wanted = {part.strip().strip("'") for part in match.group(1).split(",")}
            chosen = [r for r in records if r.id in wanted]
        else:
            return _sf_error(400, "MALFORMED_QUERY", "unexpected SOQL for the simulator")
        page = chosen[:limit]
        return JSONResponse(
            {
                "totalSize": len(page),
                "done": True,
                "records": [_sf_object(r, version) for r in page],
            },
            headers=headers,
        )

    async def patch(request: Request, *, hubspot: bool) -> Response:
        """An update of an existing record (HubSpot: ``{"properties"}``; Salesforce: fields)."""
        record_id = request.path_params["object_id"]
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        fields = body.get("properties") if hubspot and isinstance(body, dict) else body
        if not isinstance(fields, dict):
            if hubspot:
                return _hs_error(400, "VALIDATION_ERROR", "body needs a properties object")
            return _sf_error(400, "JSON_PARSER_ERROR", "body is not a JSON object")
        with sim.lock:
            provider = provider_of(request)
            found = provider.records.get(record_id)
            if found is None or found.deleted:
                missing = True
            else:
                missing = False
                record, _, _ = provider.write_record(record_id, {**found.data, **fields})
                answer = _hs_object(record) if hubspot else None
            headers = hs_headers(provider) if hubspot else sf_headers(provider)
        if missing:
            if hubspot:
                return _hs_error(404, "OBJECT_NOT_FOUND", "resource not found")
            return _sf_error(404, "NOT_FOUND", "The requested resource does not exist")
        if hubspot:
            return JSONResponse(answer, headers=headers)
        return Response(status_code=204, headers=headers)

    async def sf_sobject(request: Request) -> Response:
        if request.method == "PATCH":
            return await patch(request, hubspot=False)
        version = request.path_params["version"]
        with sim.lock:
            provider = provider_of(request)
            found = provider.records.get(request.path_params["object_id"])
            body = _sf_object(found, version) if found is not None and not found.deleted else None
            headers = sf_headers(provider)
        if body is None:
            return _sf_error(404, "NOT_FOUND", "The requested resource does not exist")
        return JSONResponse(body, headers=headers)

    def _window(request: Request, reach: timedelta) -> tuple[datetime, datetime] | Response:
        try:
            start = _parse(request.query_params["start"])
            end = _parse(request.query_params["end"])
        except (KeyError, ValueError):
            return _sf_error(400, "INVALID_REPLICATION_DATE", "start and end are required")
        if start < sim.now() - reach:
            return _sf_error(
                400,
                "INVALID_REPLICATION_DATE",
                f"startDate cannot be more than {reach.days} days ago",
            )
        return start, end

    async def sf_updated(request: Request) -> Response:
        window = _window(request, _SF_UPDATED_WINDOW)
        if isinstance(window, Response):
            return window
        start, end = window
        with sim.lock:
            provider = provider_of(request)
            ids = [r.id for r in live(provider) if start <= r.updated_at <= end]
            headers = sf_headers(provider)
        return JSONResponse(
            {"ids": ids, "latestDateCovered": _sf_time(min(end, sim.now()))}, headers=headers
        )

    async def sf_deleted(request: Request) -> Response:
        window = _window(request, _SF_DELETED_WINDOW)
        if isinstance(window, Response):
            return window
        start, end = window
        with sim.lock:
            provider = provider_of(request)
            gone = [
                {"id": r.id, "deletedDate": _sf_time(r.updated_at)}
                for r in provider.records.values()
                if r.deleted and start <= r.updated_at <= end
            ]
            headers = sf_headers(provider)
        return JSONResponse(
            {
                "deletedRecords": gone,
                "earliestDateAvailable": _sf_time(sim.now() - _SF_DELETED_WINDOW),
                "latestDateCovered": _sf_time(min(end, sim.now())),
            },
            headers=headers,
        )

    base = "/p/{provider}"
    sf = base + "/services/data/{version}"
    return [
        Route(base + "/account-info/v3/details", hs_account, methods=["GET"]),
        Route(base + "/crm/v3/objects/deals/search", hs_search, methods=["POST"]),
        Route(base + "/crm/v3/objects/deals", hs_list, methods=["GET"]),
        Route(base + "/crm/v3/objects/deals/{object_id}", hs_object, methods=["GET", "PATCH"]),
        Route(sf + "/query", sf_query, methods=["GET"]),
        Route(sf + "/sobjects/Opportunity/updated/", sf_updated, methods=["GET"]),
        Route(sf + "/sobjects/Opportunity/updated", sf_updated, methods=["GET"]),
        Route(sf + "/sobjects/Opportunity/deleted/", sf_deleted, methods=["GET"]),
        Route(sf + "/sobjects/Opportunity/deleted", sf_deleted, methods=["GET"]),
        Route(sf + "/sobjects/Opportunity/{object_id}", sf_sobject, methods=["GET", "PATCH"]),
    ]


def _fields(record: Record) -> dict[str, Any]:
    return {
        "id": record.id,
        "tenant_id": record.tenant_id,
        "version": record.version,
        "updated_at": record.updated_at,
        "data": record.data,
        "write_no": record.write_no,
        "deleted": record.deleted,
    }
