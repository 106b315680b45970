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
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._state import Record, SimulatorState

__all__ = [
    "HUBSPOT_TIME_ZONE",
    "dialect_routes",
    "google_error",
    "ms_time",
    "provider_route",
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


def provider_route(
    path: str, endpoint: str | None, handler: Callable[..., Any], methods: str = "GET"
) -> Route:
    """A route under ``/p/{provider}/``; ``endpoint`` names it for faults and the bearer check
    (``ENDPOINTS``; None: neither applies)."""
    return Route("/p/{provider}/" + path, handler, methods=methods.split(), name=endpoint or "")


def google_error(status: int, reason: str, message: str) -> dict[str, Any]:
    """A Google API error body."""
    error = {"domain": "global", "reason": reason, "message": message}
    return {"error": {"code": status, "message": message, "errors": [error]}}


#: What a dialect answers a request without a valid token (401), by path prefix.
_UNAUTHORIZED: tuple[tuple[str, Any], ...] = (
    (
        "services/data/",
        [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}],
    ),
    (
        "crm/",
        {
            "status": "error",
            "message": "Authentication credentials not found.",
            "category": "INVALID_AUTHENTICATION",
        },
    ),
    ("drive/", google_error(401, "authError", "Request had invalid authentication credentials.")),
    ("v5/", {"status": 401, "error": {"type": "invalid_auth", "message": "Invalid API key"}}),
)


def unauthorized_body(rest: str) -> Any:
    """A dialect's 401 body for a bad token (``rest``: the path after ``/p/{provider}/``),
    or None for the generic one."""
    return next((body for prefix, body in _UNAUTHORIZED if rest.startswith(prefix)), None)


def _ms(moment: datetime) -> int:
    return int(moment.astimezone(UTC).timestamp() * 1000)


def _ms_floor(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def ms_time(moment: datetime, zone: str = "Z") -> str:
    """ISO-8601 in UTC to the millisecond, as HubSpot and Drive write it (Salesforce: ``+0000``)."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}{zone}"


def _hs_object(record: Record) -> dict[str, Any]:
    properties = {k: None if v is None else str(v) for k, v in record.data.items()}
    properties.update(
        {"hs_object_id": record.id, "hs_lastmodifieddate": ms_time(record.updated_at)}
    )
    return {
        "id": record.id,
        "properties": properties,
        "createdAt": ms_time(record.updated_at),
        "updatedAt": ms_time(record.updated_at),
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
        "SystemModstamp": ms_time(record.updated_at, "+0000"),
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

    async def sf_query(request: Request) -> Response:
        version = request.path_params["version"]
        soql = request.query_params.get("q", "")
        limit_match = _SOQL_LIMIT.search(soql)
        limit = int(limit_match.group(1)) if limit_match else 2000
        with sim.lock:
            provider = provider_of(request)
            records = [replace(r, updated_at=_ms_floor(r.updated_at)) for r in live(provider)]
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

    async def one(request: Request, *, hubspot: bool) -> Response:
        """GET or PATCH (an update of an existing record) one object.

        HubSpot answers the object and takes ``{"properties"}``; Salesforce takes the
        fields themselves and answers a PATCH with 204.
        """
        record_id = request.path_params["object_id"]
        fields = None
        if request.method == "PATCH":
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
            if found is not None and not found.deleted and fields is not None:
                found, _, _ = provider.write_record(record_id, {**found.data, **fields})
            headers = hs_headers(provider) if hubspot else sf_headers(provider)
        if found is None or found.deleted:
            if hubspot:
                return _hs_error(404, "OBJECT_NOT_FOUND", "resource not found")
            return _sf_error(404, "NOT_FOUND", "The requested resource does not exist")
        if hubspot:
            return JSONResponse(_hs_object(found), headers=headers)
        if fields is not None:
            return Response(status_code=204, headers=headers)
        return JSONResponse(_sf_object(found, request.path_params["version"]), headers=headers)

    async def sf_window(request: Request, *, deleted: bool) -> Response:
        """``sobjects/Opportunity/updated`` (ids, 30 days back) or ``/deleted`` (15 days)."""
        reach = _SF_DELETED_WINDOW if deleted else _SF_UPDATED_WINDOW
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
        with sim.lock:
            provider = provider_of(request)
            chosen = [
                r
                for r in (provider.records.values() if deleted else live(provider))
                if r.deleted == deleted and start <= r.updated_at <= end
            ]
            headers = sf_headers(provider)
        answer: dict[str, Any] = {"latestDateCovered": ms_time(min(end, sim.now()), "+0000")}
        if deleted:
            answer["deletedRecords"] = [
                {"id": r.id, "deletedDate": ms_time(r.updated_at, "+0000")} for r in chosen
            ]
            answer["earliestDateAvailable"] = ms_time(sim.now() - reach, "+0000")
        else:
            answer["ids"] = [r.id for r in chosen]
        return JSONResponse(answer, headers=headers)

    sf = "services/data/{version}/"
    hs_object, sf_object = partial(one, hubspot=True), partial(one, hubspot=False)
    updated, deleted = partial(sf_window, deleted=False), partial(sf_window, deleted=True)
    return [
        provider_route("account-info/v3/details", "account_info", hs_account),
        provider_route("crm/v3/objects/deals/search", "changes", hs_search, "POST"),
        provider_route("crm/v3/objects/deals", "records", hs_list),
        provider_route("crm/v3/objects/deals/{object_id}", "record", hs_object, "GET PATCH"),
        provider_route(sf + "query", "changes", sf_query),
        provider_route(sf + "sobjects/Opportunity/updated/", "replay", updated),
        provider_route(sf + "sobjects/Opportunity/updated", "replay", updated),
        provider_route(sf + "sobjects/Opportunity/deleted/", "replay", deleted),
        provider_route(sf + "sobjects/Opportunity/deleted", "replay", deleted),
        provider_route(sf + "sobjects/Opportunity/{object_id}", "record", sf_object, "GET PATCH"),
    ]
