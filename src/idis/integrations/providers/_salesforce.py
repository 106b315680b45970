"""The Salesforce pack: Opportunity through the REST API, SOQL polling on SystemModstamp.

What comes from where (vendor pages):

* Auth: OAuth 2 web-server / refresh-token flows,
  https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_refresh_token_flow.htm
  (token endpoint ``/services/oauth2/token``; the answer has no ``expires_in``:
  sessions end by the org's session policy, so a 401 ``INVALID_SESSION_ID``
  triggers one refresh and one retry, which the OAuth module does for every
  401; refresh tokens do not rotate by default).
* Errors: https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm
  (a JSON array of ``{"message", "errorCode"}``; ``REQUEST_LIMIT_EXCEEDED``
  comes as 403 and is the org's API request limit: a rate limit, not our error).
* Limits header: https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/headers_api_usage.htm
  (``Sforce-Limit-Info: api-usage=18/5000``).
* Polling: SOQL (``/services/data/vXX.X/query``) ordered by ``SystemModstamp``
  then ``Id``, keyset-paged: the cursor is the last ``(SystemModstamp, Id)`` read.
* Replay: https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_getupdated.htm
  and ``resources_getdeleted.htm`` (``/sobjects/{type}/updated/?start=&end=``
  answers ``ids`` and ``latestDateCovered``, at most 30 days back;
  ``/deleted/`` answers ``deletedRecords`` with ``deletedDate``, at most 15
  days back). Older than 30 days: :class:`ReplayWindowExceeded`, naming ``--resync``.

Event identity: derived, ``sf:<sObject>:<Id>:<SystemModstamp>`` for a change and
``sf:<sObject>:<Id>:deleted:<deletedDate>`` for a deletion. Ordering: by
``SystemModstamp`` (microseconds), ties by event id.

Not supported (part 1): Change Data Capture / Platform Events (Salesforce sends
no plain webhooks; this pack polls), and taking ``instance_url`` from the token
response: the token store keeps only the token, so ``BASE_URL`` must be the
org's My Domain URL (``https://<domain>.my.salesforce.com``), which serves both
the token endpoint and the API.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .._flow import Flow, async_face, sync_face
from .._timeparse import format_duration, utcnow
from ..exceptions import (
    MalformedResponse,
    ProviderError,
    ProviderRejected,
    QuotaExhausted,
    ReplayWindowExceeded,
)
from ._client import AsyncReplayPages, Call, ClientFlows, ReplayPages, provider_time
from ._order import BY_MODIFIED
from ._pack import (
    Capabilities,
    NoWebhooks,
    RateLimitReading,
    endpoint,
    register_pack,
)

if TYPE_CHECKING:
    from ..config import ProviderSettings
    from ..resilience._gateway import AsyncGateway, Gateway
    from . import ChangesPage, ProviderEvent, ProviderRecord, RecordPage, ReplayPage

__all__ = [
    "DEFAULT_API_VERSION",
    "REPLAY_WINDOW",
    "SALESFORCE",
    "AsyncSalesforceClient",
    "ModstampCursor",
    "SalesforceClient",
    "SalesforcePack",
    "check_window",
    "map_error",
    "read_limit_info",
]

DEFAULT_API_VERSION = "v60.0"
#: How far back ``/updated/`` answers (vendor limit).
REPLAY_WINDOW = timedelta(days=30)
#: How far back ``/deleted/`` answers (vendor limit); older deletions need a resync.
DELETED_WINDOW = timedelta(days=15)
_OBJECT = "Opportunity"
#: Logical endpoint name -> path under ``/services/data/<API_VERSION>/``.
_PATHS = {
    "soql": "query",
    "opportunity": f"sobjects/{_OBJECT}/{{id}}",
    "opportunity_updated": f"sobjects/{_OBJECT}/updated/",
    "opportunity_deleted": f"sobjects/{_OBJECT}/deleted/",
}


def path(settings: ProviderSettings, name: str) -> str:
    """The endpoint to call for ``name`` (see :data:`_PATHS`) at the API version in use."""
    version = settings.api_version or DEFAULT_API_VERSION
    return endpoint(settings, name, f"/services/data/{version}/{_PATHS[name]}")


# Salesforce ids are 15 or 18 letters and digits; the simulator's ids add ``_.@-``.
# Never a quote or a space, so an id can be put into SOQL as a literal.
_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")
_LIMIT_INFO = re.compile(r"api-usage=(\d+)/(\d+)")


def _iso(moment: datetime) -> str:
    """Salesforce's dateTime literal (UTC, milliseconds, ``Z``)."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _time(value: Any, what: str, provider: str) -> datetime:
    # Salesforce writes +0000 (no colon), which fromisoformat reads on 3.11+.
    return provider_time(value, what, provider, "a Salesforce dateTime")


# --------------------------------------------------------------------------- limits, errors


def read_limit_info(headers: Mapping[str, str]) -> RateLimitReading | None:
    """``Sforce-Limit-Info: api-usage=used/allowed`` as a reading."""
    lower = {k.lower(): v for k, v in headers.items()}
    match = _LIMIT_INFO.search(lower.get("sforce-limit-info", ""))
    if match is None:
        return None
    used, allowed = int(match.group(1)), int(match.group(2))
    left = max(0, allowed - used)
    return RateLimitReading(
        remaining=left, limit=allowed, policy="api-usage (rolling 24 h)", exhausted=left == 0
    )


#: How long the provider is paused after ``REQUEST_LIMIT_EXCEEDED``: Salesforce's limit is a
#: rolling 24 hours and the refusal names no reset, so the gateway pauses, then the next call
#: finds out whether it cleared (another 403 pauses again).
REQUEST_LIMIT_PAUSE = 300.0


def map_error(exc: ProviderError) -> ProviderError:
    """``REQUEST_LIMIT_EXCEEDED`` (403) is a rate limit; other errors stay as they are.

    Idempotent (the gateway maps a refusal first, the client again): a
    :class:`QuotaExhausted` is returned as it is.
    """
    if isinstance(exc, QuotaExhausted):
        return exc
    details = exc.details or {}
    if isinstance(exc, ProviderRejected) and details.get("errorCode") == "REQUEST_LIMIT_EXCEEDED":
        error = QuotaExhausted(
            f"{exc.provider} {exc.endpoint}: rate limit: the org's API request limit is "
            f"spent (HTTP 403 REQUEST_LIMIT_EXCEEDED); calls paused for "
            f"{REQUEST_LIMIT_PAUSE:.0f} s, then tried again",
            provider=exc.provider,
            endpoint=exc.endpoint,
            retry_after=exc.retry_after or REQUEST_LIMIT_PAUSE,
        )
        error.status_code = exc.status_code
        error.details = exc.details
        return error
    return exc


def check_window(provider: str, since: datetime, now: datetime) -> None:
    """Refuse a replay older than ``/updated/``'s 30 days, pointing at ``--resync``.

    Raises:
        ReplayWindowExceeded: with ``retention`` set to the window.
    """
    if since < now - REPLAY_WINDOW:
        error = ReplayWindowExceeded(
            f"{provider}: Salesforce returns updated records for the last "
            f"{format_duration(REPLAY_WINDOW)} only; {since.isoformat()} is older. Reconcile "
            f"a window within them, and run a full resync (`idis-integrations reconcile "
            f"--provider {provider} --resync`) for older changes",
            provider=provider,
            endpoint="replay",
        )
        error.retention = REPLAY_WINDOW
        raise error


# --------------------------------------------------------------------------- decoding


def _event_id(record_id: str, modstamp: datetime) -> str:
    return f"sf:{_OBJECT}:{record_id}:{_iso(modstamp)}"


def parse_sobject(raw: Any, provider: str) -> ProviderRecord:
    """An sObject (``Id``, ``SystemModstamp``, fields) as a record."""
    from . import ProviderRecord

    try:
        modstamp = _time(raw["SystemModstamp"], "SystemModstamp", provider)
        data = {k: v for k, v in raw.items() if k != "attributes"}
        return ProviderRecord(
            id=str(raw["Id"]),
            tenant_id=None,
            version=0,
            updated_at=modstamp,
            data=data,
            order=BY_MODIFIED.record_key(version=None, updated_at=modstamp),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise MalformedResponse(
            f"{provider}: malformed Salesforce record ({type(exc).__name__})", provider=provider
        ) from None


def _change(record: ProviderRecord) -> ProviderEvent:
    from . import ProviderEvent

    event_id = _event_id(record.id, record.updated_at)
    return ProviderEvent(
        id=event_id,
        seq=0,
        type="record.updated",
        record_id=record.id,
        tenant_id=None,
        version=0,
        occurred_at=record.updated_at,
        data=dict(record.data),
        order=BY_MODIFIED.event_key(
            event_id=event_id, seq=None, version=None, occurred_at=record.updated_at
        ),
    )


def _deletion(record_id: str, deleted_at: datetime) -> ProviderEvent:
    from . import ProviderEvent

    event_id = f"sf:{_OBJECT}:{record_id}:deleted:{_iso(deleted_at)}"
    return ProviderEvent(
        id=event_id,
        seq=0,
        type="record.deleted",
        record_id=record_id,
        tenant_id=None,
        version=0,
        occurred_at=deleted_at,
        data={},
        order=BY_MODIFIED.event_key(
            event_id=event_id, seq=None, version=None, occurred_at=deleted_at
        ),
    )


@dataclass(frozen=True, slots=True)
class ModstampCursor:
    """The last ``(SystemModstamp, Id)`` read; stored as ``sf1:<modstamp>:<id>``."""

    modstamp: datetime
    last_id: str = ""

    def encode(self) -> str:
        """The opaque text the poller stores."""
        return f"sf1:{_iso(self.modstamp)}:{self.last_id}"

    @classmethod
    def decode(cls, text: str) -> ModstampCursor:
        """Parse :meth:`encode`'s text.

        Raises:
            MalformedResponse: not a Salesforce cursor.
        """
        head, _, rest = text.partition(":")
        stamp, _, last = rest.rpartition(":")
        if head != "sf1" or not stamp or (last and not _ID.fullmatch(last)):
            raise MalformedResponse(
                f"cursor {text[:40]!r} is not a Salesforce cursor (sf1:<SystemModstamp>:<Id>)"
            )
        return cls(_time(stamp, "cursor", "salesforce"), last)


def soql_after(cursor: ModstampCursor, limit: int, fields: Sequence[str] = ()) -> str:
    """The keyset SOQL query for the page after ``cursor`` (ids are checked, never quoted in)."""
    columns = ", ".join(dict.fromkeys(("Id", "SystemModstamp", *fields)))
    stamp = _iso(cursor.modstamp)
    if cursor.last_id:
        where = (
            f"SystemModstamp > {stamp} OR (SystemModstamp = {stamp} AND Id > '{cursor.last_id}')"
        )
    else:
        where = f"SystemModstamp >= {stamp}"
    # Every interpolated value is ours: a formatted time, an id matching _ID.
    return (
        f"SELECT {columns} FROM {_OBJECT} WHERE {where} "  # noqa: S608
        f"ORDER BY SystemModstamp ASC, Id ASC LIMIT {max(1, min(limit, 2000))}"
    )


# --------------------------------------------------------------------------- clients


#: Ids fetched per SOQL ``IN`` during replay (the query string stays well under limits).
_REPLAY_BATCH = 200


class _SalesforceFlows(ClientFlows):
    """Salesforce's client methods, each written once as a flow."""

    @staticmethod
    def accepts_cursor(position: str) -> bool:
        """Whether ``position`` is this API's cursor (``sf1:...``)."""
        return position.startswith("sf1:")

    def _read(self, response: Any) -> Any:
        self.rate_limit = read_limit_info(response.headers)
        try:
            return response.json()
        except ValueError:
            raise MalformedResponse(
                f"{self.name}: Salesforce response is not JSON", provider=self.name
            ) from None

    def _start(self, after: str | int | None, since: datetime | None) -> ModstampCursor:
        if after is not None and not isinstance(after, int):
            return ModstampCursor.decode(after)
        return ModstampCursor(since if since is not None else utcnow())

    def _records(self, body: Any) -> list[ProviderRecord]:
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            raise MalformedResponse(
                f"{self.name}: Salesforce query answer has no 'records' list", provider=self.name
            )
        return [parse_sobject(r, self.name) for r in body["records"]]

    def _page(self, records: list[ProviderRecord], cursor: ModstampCursor, limit: int) -> Any:
        from . import ChangesPage

        more = len(records) >= max(1, min(limit, 2000))
        if not records:
            moved = cursor
        elif more:
            # Inside a run of pages: the keyset moves past every record read.
            moved = ModstampCursor(records[-1].updated_at, records[-1].id)
        else:
            # The end of the feed: the next poll reads the last millisecond again. A
            # record written later in that same millisecond with a smaller Id would
            # otherwise sit behind the keyset until its next change (found by
            # `drill --api salesforce`); the records read again keep their event ids,
            # and the inbox drops them.
            moved = ModstampCursor(records[-1].updated_at)
        return ChangesPage([_change(r) for r in records], None, more, next_cursor=moved.encode())

    def _ids_in(self, ids: Sequence[str]) -> str:
        safe = [i for i in ids if _ID.fullmatch(i)]
        quoted = ", ".join(f"'{i}'" for i in safe)
        return (
            f"SELECT Id, SystemModstamp FROM {_OBJECT} WHERE Id IN ({quoted}) "  # noqa: S608
            "ORDER BY SystemModstamp ASC, Id ASC"
        )

    def _window(self, since: datetime, now: datetime) -> dict[str, str]:
        return {"start": _iso(since), "end": _iso(now)}

    def _deletions(self, body: Any, since: datetime) -> list[ProviderEvent]:
        if not isinstance(body, dict) or not isinstance(body.get("deletedRecords"), list):
            raise MalformedResponse(
                f"{self.name}: Salesforce deleted answer has no 'deletedRecords' list",
                provider=self.name,
            )
        return [
            _deletion(str(d["id"]), _time(d["deletedDate"], "deletedDate", self.name))
            for d in body["deletedRecords"]
        ]

    def _call(self, endpoint_name: str, **kwargs: Any) -> Flow[Any]:
        try:
            response = yield Call(endpoint_name, kwargs, raw=True)
        except ProviderError as exc:
            raise map_error(exc) from exc
        return self._read(response)

    def _query(self, soql: str) -> Flow[list[ProviderRecord]]:
        return self._records(
            (yield from self._call(path(self.settings, "soql"), params={"q": soql}))
        )

    def _get_record(self, record_id: str) -> Flow[ProviderRecord | None]:
        """The record, or None on 404 (``NOT_FOUND``)."""
        try:
            body = yield from self._call(
                path(self.settings, "opportunity"), path_params={"id": record_id}, not_found_ok=True
            )
        except ProviderRejected as exc:
            if exc.status_code == 404:
                return None
            raise
        return parse_sobject(body, self.name)

    def _list_records(
        self, *, updated_since: datetime | None = None, cursor: str | None = None, limit: int = 100
    ) -> Flow[RecordPage]:
        """Every record by keyset pages (the cursor is a :class:`ModstampCursor`)."""
        from . import RecordPage

        start = self._start(cursor, updated_since or datetime(1970, 1, 1, tzinfo=UTC))
        records = yield from self._query(soql_after(start, limit))
        page = self._page(records, start, limit)
        return RecordPage(records, page.next_cursor if page.has_more else None)

    def _changes(
        self, *, after: str | int | None = None, since: datetime | None = None, limit: int = 100
    ) -> Flow[ChangesPage]:
        """Records whose ``SystemModstamp`` is after the cursor (or since ``since``)."""
        cursor = self._start(after, since)
        records = yield from self._query(soql_after(cursor, limit))
        return self._page(records, cursor, limit)  # type: ignore[no-any-return]

    def _replay(
        self, since: datetime, *, cursor: str | None = None, limit: int = 500
    ) -> Flow[ReplayPage]:
        """Updated and deleted records since ``since`` (one page: every id of the window).

        Raises:
            ReplayWindowExceeded: ``since`` is more than 30 days ago.
        """
        from . import ReplayPage

        now = self.gateway.clock.now()
        check_window(self.name, since, now)
        window = self._window(since, now)
        updated = yield from self._call(path(self.settings, "opportunity_updated"), params=window)
        ids = [str(i) for i in (updated or {}).get("ids") or []]
        events: list[ProviderEvent] = []
        for start in range(0, len(ids), _REPLAY_BATCH):
            query = self._ids_in(ids[start : start + _REPLAY_BATCH])
            events.extend(_change(r) for r in (yield from self._query(query)))
        if since >= now - DELETED_WINDOW:
            deleted = yield from self._call(
                path(self.settings, "opportunity_deleted"), params=window
            )
            events.extend(self._deletions(deleted, since))
        return ReplayPage(events, None)


class SalesforceClient(_SalesforceFlows, ReplayPages):
    """Sync Salesforce adapter (Opportunity)."""

    gateway: Gateway

    get_record = sync_face(_SalesforceFlows._get_record)
    list_records = sync_face(_SalesforceFlows._list_records)
    changes = sync_face(_SalesforceFlows._changes)
    replay = sync_face(_SalesforceFlows._replay)
    health = sync_face(_SalesforceFlows._health)


class AsyncSalesforceClient(_SalesforceFlows, AsyncReplayPages):
    """Async twin of :class:`SalesforceClient`."""

    gateway: AsyncGateway

    get_record = async_face(_SalesforceFlows._get_record)
    list_records = async_face(_SalesforceFlows._list_records)
    changes = async_face(_SalesforceFlows._changes)
    replay = async_face(_SalesforceFlows._replay)
    health = async_face(_SalesforceFlows._health)


# --------------------------------------------------------------------------- the pack


class SalesforcePack(NoWebhooks):
    """Salesforce (Opportunity)."""

    name = "salesforce"
    summary = "Salesforce Opportunity: SOQL polling on SystemModstamp, updated/deleted replay."
    capabilities = Capabilities(
        webhooks=None,
        polling="SOQL on SystemModstamp, keyset-paged by (SystemModstamp, Id)",
        replay="sObject updated/ (30 days) and deleted/ (15 days)",
        replay_window="30 days (deletions 15); older: --resync",
        resync=True,
        auth=(
            "oauth refresh_token (the token's instance_url is the API base; reactive refresh "
            "on 401 INVALID_SESSION_ID)",
            "static token",
        ),
        rate_limit_headers=("Sforce-Limit-Info",),
        ordering="modified (SystemModstamp), ties by event id",
        event_identity="derived: sObject, Id, SystemModstamp (or deletedDate)",
    )
    endpoints: Mapping[str, str] = {}
    client_class = SalesforceClient
    async_client_class = AsyncSalesforceClient

    def read_rate_limit(
        self, status: int, headers: Mapping[str, str], details: Mapping[str, Any] | None
    ) -> RateLimitReading | None:
        """``Sforce-Limit-Info``; a 403 ``REQUEST_LIMIT_EXCEEDED`` is the limit spent."""
        if status == 403 and details and details.get("errorCode") == "REQUEST_LIMIT_EXCEEDED":
            return RateLimitReading(remaining=0, policy="api-usage (rolling 24 h)", exhausted=True)
        return read_limit_info(headers)

    map_error = staticmethod(map_error)

    def update_call(
        self, settings: ProviderSettings, record_id: str, data: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``PATCH /services/data/<v>/sobjects/Opportunity/{id}`` with the fields (204)."""
        return {
            "endpoint": path(settings, "opportunity"),
            "method": "PATCH",
            "path_params": {"id": record_id},
            "json": dict(data),
        }


SALESFORCE = register_pack(SalesforcePack())
