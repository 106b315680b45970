"""The Google Drive pack (documents): the changes feed, watch channels, files by id.

What comes from where (vendor pages):

* Polling: https://developers.google.com/drive/api/guides/manage-changes and
  https://developers.google.com/drive/api/reference/rest/v3/changes/list
  (``GET /drive/v3/changes/startPageToken``, then ``GET /drive/v3/changes?pageToken=``;
  a page with ``nextPageToken`` has more, the last page carries ``newStartPageToken``,
  the token to store for the next poll). Tokens are opaque: the pack stores them as
  ``gd1:<token>`` and never reads them.
* Push: https://developers.google.com/drive/api/guides/push
  (``POST /drive/v3/changes/watch?pageToken=`` with ``{"id", "type": "web_hook",
  "address", "token", "expiration"}``; notifications are POSTs with no body that
  only say *something changed*: ``X-Goog-Channel-ID``, ``X-Goog-Channel-Token``
  (the token we set: what we verify), ``X-Goog-Resource-State`` (``sync`` when the
  channel opens, then ``change``), ``X-Goog-Message-Number``. A channel expires at
  its ``expiration`` (at most a week for changes) and is not renewed by Google: a
  new channel must be opened before, and ``POST /drive/v3/channels/stop`` closes the old).
* Errors: https://developers.google.com/drive/api/guides/handle-errors
  (``403`` with reason ``rateLimitExceeded``/``userRateLimitExceeded`` and ``429``:
  back off exponentially; ``401``: refresh the token; ``invalid_grant`` from
  https://oauth2.googleapis.com/token: the refresh token is revoked, re-authorize).

Event identity: ``gd:<fileId>:<file.version>`` (Drive increments ``version`` on every
change of a file), ``gd:<fileId>:removed:<time>`` for a removal. Ordering: by
modification time (the change's ``time`` / the file's ``modifiedTime``), ties by
event id. A notification carries no data, so ``webhook_events`` is empty: a verified
``change`` notification is a trigger to fetch changes (:meth:`DriveClient.changes`).
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .._flow import Flow, async_face, sync_face
from ..exceptions import (
    MalformedResponse,
    ProviderError,
    ProviderRejected,
    RateLimited,
    WebhookVerificationError,
)
from ._client import AsyncReplayPages, Call, ClientFlows, ReplayPages, provider_time
from ._order import BY_MODIFIED
from ._pack import Capabilities, PackBase, RateLimitReading, endpoint, register_pack

if TYPE_CHECKING:
    from ..config import ProviderSettings, Secret
    from ..resilience._gateway import AsyncGateway, Gateway
    from ..webhooks._verify import InboundRequest
    from . import ChangesPage, ProviderEvent, ProviderRecord, RecordPage, ReplayPage

__all__ = [
    "GDRIVE",
    "AsyncDriveClient",
    "CatchUp",
    "Channel",
    "ChannelToken",
    "DriveClient",
    "DrivePack",
    "Notification",
]

#: Reasons Drive gives a 403 that is a rate limit, not a permission (handle-errors page).
RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
#: Longest channel life Drive grants for changes (push guide: one week).
MAX_CHANNEL_TTL = timedelta(days=7)
_FIELDS = "id,name,version,modifiedTime,trashed,appProperties"
_CHANGE_FIELDS = f"nextPageToken,newStartPageToken,changes(fileId,removed,time,file({_FIELDS}))"


def _time(value: Any, what: str, provider: str) -> datetime:
    return provider_time(value, f"Drive {what}", provider, "an RFC 3339 time")


def _ms(moment: datetime) -> int:
    return int(moment.astimezone(UTC).timestamp() * 1000)


def _rfc3339(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


# --------------------------------------------------------------------------- notifications


@dataclass(frozen=True, slots=True)
class Notification:
    """One verified push notification: which channel, what state, which message."""

    channel_id: str
    #: ``sync`` (the channel opened) or ``change`` (fetch changes now).
    state: str
    message_number: int | None

    @property
    def triggers_fetch(self) -> bool:
        """Whether the notification means there are changes to fetch."""
        return self.state != "sync"


class ChannelToken:
    """Verifies Drive push notifications by ``X-Goog-Channel-Token`` (the token we set).

    Drive signs nothing: the channel token, chosen by us at ``changes.watch`` and
    compared in constant time, is the push guide's way to know a notification is
    ours. Several tokens are accepted while channels are renewed with a new one.
    """

    name = "gdrive"

    def __init__(self, tokens: Sequence[str | Secret], *, label: str = "channel token") -> None:
        from ..exceptions import ConfigError

        if not tokens:
            raise ConfigError(f"{label}: no Drive channel token configured", variable=label)
        self._tokens = tuple(t if isinstance(t, str) else t.get_secret_value() for t in tokens)

    def __repr__(self) -> str:
        return f"ChannelToken(tokens={len(self._tokens)})"

    def notification(self, headers: Mapping[str, str]) -> Notification:
        """The notification the headers describe, verified.

        Raises:
            WebhookVerificationError: a header is missing or the token is not ours.
        """
        lower = {k.lower(): v for k, v in headers.items()}
        token = lower.get("x-goog-channel-token", "")
        channel = lower.get("x-goog-channel-id", "").strip()
        state = lower.get("x-goog-resource-state", "").strip()
        if not token or not channel or not state:
            raise WebhookVerificationError(
                "Drive notification lacks X-Goog-Channel-ID, X-Goog-Channel-Token or "
                "X-Goog-Resource-State",
                reason="missing_headers",
            )
        if not any(hmac.compare_digest(token.encode(), t.encode()) for t in self._tokens):
            raise WebhookVerificationError(
                "X-Goog-Channel-Token matches no configured channel token", reason="bad_signature"
            )
        number = lower.get("x-goog-message-number", "").strip()
        return Notification(channel, state, int(number) if number.isdigit() else None)

    def verify(self, request: InboundRequest, now: datetime) -> str | None:
        """Check the token; the delivery id is ``<channel>:<message number>``."""
        note = self.notification(request.headers)
        if note.message_number is None:
            return note.channel_id
        return f"{note.channel_id}:{note.message_number}"


@dataclass(frozen=True, slots=True)
class Channel:
    """An open watch channel, as ``changes.watch`` answered."""

    id: str
    resource_id: str
    expiration: datetime

    def due(self, now: datetime, margin: timedelta) -> bool:
        """Whether to open the next channel now (``margin`` before expiry)."""
        return now >= self.expiration - margin


# --------------------------------------------------------------------------- decoding


def _file_record(raw: Any, provider: str) -> ProviderRecord:
    from . import ProviderRecord

    try:
        modified = _time(raw["modifiedTime"], "modifiedTime", provider)
        data = dict(raw.get("appProperties") or {})
        data["name"] = raw.get("name")
        return ProviderRecord(
            id=str(raw["id"]),
            tenant_id=None,
            version=int(raw.get("version") or 0),
            updated_at=modified,
            data=data,
            order=BY_MODIFIED.record_key(version=None, updated_at=modified),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedResponse(
            f"{provider}: malformed Drive file ({type(exc).__name__})", provider=provider
        ) from None


def _event(record: ProviderRecord, kind: str, event_id: str, at: datetime) -> ProviderEvent:
    from . import ProviderEvent

    return ProviderEvent(
        id=event_id,
        seq=0,
        type=kind,
        record_id=record.id,
        tenant_id=None,
        version=record.version,
        occurred_at=at,
        data=record.data,
        order=BY_MODIFIED.event_key(event_id=event_id, seq=None, version=None, occurred_at=at),
    )


def change_event(raw: Any, provider: str) -> ProviderEvent:
    """One ``drive#change`` as an event (a trashed or removed file is a deletion)."""
    from . import ProviderEvent

    try:
        file_id = str(raw["fileId"])
        at = _time(raw["time"], "change time", provider)
        if raw.get("removed") or raw.get("file") is None:
            event_id = f"gd:{file_id}:removed:{_rfc3339(at)}"
            return ProviderEvent(
                id=event_id,
                seq=0,
                type="record.deleted",
                record_id=file_id,
                tenant_id=None,
                version=0,
                occurred_at=at,
                order=BY_MODIFIED.event_key(
                    event_id=event_id, seq=None, version=None, occurred_at=at
                ),
            )
        record = _file_record(raw["file"], provider)
    except (KeyError, TypeError, AttributeError) as exc:
        raise MalformedResponse(
            f"{provider}: malformed Drive change ({type(exc).__name__})", provider=provider
        ) from None
    kind = "record.deleted" if raw["file"].get("trashed") else "record.updated"
    return _event(record, kind, f"gd:{file_id}:{record.version}", at)


def read_rate_limit(
    status: int, headers: Mapping[str, str], details: Mapping[str, Any] | None
) -> RateLimitReading | None:
    """Drive sends no quota headers: only a refusal says a limit was hit (its ``reason``)."""
    reason = None if details is None else details.get("reason")
    if status == 429 or (status == 403 and reason in RATE_LIMIT_REASONS):
        retry = headers.get("retry-after", headers.get("Retry-After", "")).strip()
        return RateLimitReading(
            remaining=0,
            reset_after=float(retry) if retry.isdigit() else None,
            policy=str(reason) if reason else "rateLimitExceeded",
        )
    return None


def map_error(exc: ProviderError) -> ProviderError:
    """A 403 whose reason is a rate limit is a :class:`RateLimited` (backed off, retried)."""
    if isinstance(exc, ProviderRejected) and exc.status_code == 403:
        reason = (exc.details or {}).get("reason")
        if reason in RATE_LIMIT_REASONS:
            error = RateLimited(
                f"{exc.provider} {exc.endpoint}: rate limit (HTTP 403 {reason}); backing off",
                provider=exc.provider,
                endpoint=exc.endpoint,
                status_code=403,
            )
            error.details = exc.details
            return error
    return exc


# --------------------------------------------------------------------------- cursor


def _token(cursor: str) -> str:
    if not cursor.startswith("gd1:") or len(cursor) == 4:
        raise MalformedResponse(
            f"cursor {cursor[:40]!r} is not a Drive page token (gd1:<pageToken>)"
        )
    return cursor[4:]


@dataclass(frozen=True, slots=True)
class CatchUp:
    """A catch-up through ``files.list`` (Drive cannot list changes by time).

    Stored as ``gd1f:<since ms>:<len(start)>:<start token><files page token>``:
    the start token was taken *before* listing, so every change after it is
    fetched from the feed once the listing is done (some twice: the inbox
    drops those by event id).
    """

    since_ms: int
    start: str
    files_token: str | None = None

    def encode(self) -> str:
        """The opaque text the poller stores."""
        return f"gd1f:{self.since_ms}:{len(self.start)}:{self.start}{self.files_token or ''}"

    @classmethod
    def decode(cls, text: str) -> CatchUp:
        """Parse :meth:`encode`'s text.

        Raises:
            MalformedResponse: it is not a Drive catch-up cursor.
        """
        parts = text.split(":", 3)
        if len(parts) == 4 and parts[0] == "gd1f" and parts[1].isdigit() and parts[2].isdigit():
            size = int(parts[2])
            if 0 < size <= len(parts[3]):
                rest = parts[3][size:]
                return cls(int(parts[1]), parts[3][:size], rest or None)
        raise MalformedResponse(f"cursor {text[:40]!r} is not a Drive catch-up cursor")


class _DriveFlows(ClientFlows):
    """Drive's client methods, each written once as a flow."""

    @staticmethod
    def accepts_cursor(position: str) -> bool:
        """Whether ``position`` is a Drive cursor (``gd1:`` page token, ``gd1f:`` catch-up)."""
        return position.startswith(("gd1:", "gd1f:"))

    def _path(self, name: str) -> str:
        paths = {
            "start": "/drive/v3/changes/startPageToken",
            "changes": "/drive/v3/changes",
            "watch": "/drive/v3/changes/watch",
            "stop": "/drive/v3/channels/stop",
            "files": "/drive/v3/files",
            "file": "/drive/v3/files/{id}",
        }
        return endpoint(self.settings, f"drive_{name}", paths[name])

    def _map(self, exc: ProviderError) -> ProviderError:
        self.rate_limit = read_rate_limit(exc.status_code or 0, {}, exc.details)
        return map_error(exc)

    def _start_token(self, body: Any) -> str:
        token = body.get("startPageToken") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise MalformedResponse(
                f"{self.name}: Drive startPageToken answer has no token", provider=self.name
            )
        return token

    def _changes_params(self, token: str, limit: int) -> dict[str, Any]:
        return {
            "pageToken": token,
            "pageSize": max(1, min(limit, 1000)),
            "includeRemoved": "true",
            "fields": _CHANGE_FIELDS,
        }

    def _changes_page(self, body: Any) -> ChangesPage:
        from . import ChangesPage

        if not isinstance(body, dict) or not isinstance(body.get("changes"), list):
            raise MalformedResponse(
                f"{self.name}: Drive changes answer has no 'changes' list", provider=self.name
            )
        events = [change_event(c, self.name) for c in body["changes"]]
        more = body.get("nextPageToken")
        after = more or body.get("newStartPageToken")
        if not after:
            raise MalformedResponse(
                f"{self.name}: Drive changes page has neither nextPageToken nor newStartPageToken",
                provider=self.name,
            )
        return ChangesPage(events, None, bool(more), next_cursor=f"gd1:{after}")

    def _files_params(
        self, since: datetime | None, cursor: str | None, limit: int
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "pageSize": max(1, min(limit, 1000)),
            "orderBy": "modifiedTime",
            "fields": f"nextPageToken,files({_FIELDS})",
        }
        if since is not None:
            params["q"] = f"modifiedTime >= '{_rfc3339(since)}'"
        if cursor:
            params["pageToken"] = cursor
        return params

    def _files_page(self, body: Any) -> RecordPage:
        from . import RecordPage

        if not isinstance(body, dict) or not isinstance(body.get("files"), list):
            raise MalformedResponse(
                f"{self.name}: Drive files answer has no 'files' list", provider=self.name
            )
        return RecordPage(
            [_file_record(f, self.name) for f in body["files"]], body.get("nextPageToken")
        )

    def _catch_up_page(self, catch: CatchUp, raw: Any) -> ChangesPage:
        from . import ChangesPage

        page = self._replay_page(self._files_page(raw), raw)
        if page.next_cursor:
            moved = CatchUp(catch.since_ms, catch.start, page.next_cursor).encode()
            return ChangesPage(page.events, None, True, next_cursor=moved)
        return ChangesPage(page.events, None, True, next_cursor=f"gd1:{catch.start}")

    def _replay_page(self, page: RecordPage, raw: Any) -> ReplayPage:
        from . import ReplayPage

        trashed = {str(f.get("id")) for f in raw["files"] if f.get("trashed")}
        events = [
            _event(
                r,
                "record.deleted" if r.id in trashed else "record.updated",
                f"gd:{r.id}:{r.version}",
                r.updated_at,
            )
            for r in page.items
        ]
        return ReplayPage(events, page.next_cursor)

    def _watch_body(
        self, address: str, token: str, ttl: timedelta, now: datetime
    ) -> dict[str, Any]:
        ttl = min(ttl, MAX_CHANNEL_TTL)
        return {
            "id": str(uuid.uuid4()),
            "type": "web_hook",
            "address": address,
            "token": token,
            "expiration": str(int((now + ttl).timestamp() * 1000)),
        }

    def _channel(self, body: Any) -> Channel:
        try:
            return Channel(
                str(body["id"]),
                str(body["resourceId"]),
                datetime.fromtimestamp(int(body["expiration"]) / 1000, tz=UTC),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedResponse(
                f"{self.name}: Drive watch answer is not a channel ({type(exc).__name__})",
                provider=self.name,
            ) from None

    def _json(self, path: str, raw: bool = False, **kwargs: Any) -> Flow[Any]:
        try:
            return (yield Call(path, kwargs, raw=raw))
        except ProviderError as exc:
            raise self._map(exc) from exc

    def _start_page_token(self) -> Flow[str]:
        """``changes.getStartPageToken``: where changes from now on start."""
        return self._start_token((yield from self._json(self._path("start"))))

    def _get_record(self, record_id: str) -> Flow[ProviderRecord | None]:
        """The file, or None when Drive answers 404."""
        try:
            body = yield from self._json(
                self._path("file"),
                path_params={"id": record_id},
                params={"fields": _FIELDS},
                not_found_ok=True,
            )
        except ProviderRejected as exc:
            if exc.status_code == 404:
                return None
            raise
        return _file_record(body, self.name)

    def _files(self, since: datetime | None, cursor: str | None, limit: int) -> Flow[Any]:
        params = self._files_params(since, cursor, limit)
        return (yield from self._json(self._path("files"), params=params))

    def _list_records(
        self, *, updated_since: datetime | None = None, cursor: str | None = None, limit: int = 100
    ) -> Flow[RecordPage]:
        """One page of ``files.list`` (modified since ``updated_since``), by modification time."""
        return self._files_page((yield from self._files(updated_since, cursor, limit)))

    def _changes(
        self, *, after: str | int | None = None, since: datetime | None = None, limit: int = 100
    ) -> Flow[ChangesPage]:
        """One page of ``changes.list`` after the stored token.

        Without a Drive token (a first poll, or a failover from the webhook feed)
        the feed starts at ``startPageToken``: Drive cannot list changes by time,
        so what changed since ``since`` is reconciled by :meth:`replay`.
        """
        if isinstance(after, str) and after.startswith("gd1f:"):
            return (yield from self._catch_up(CatchUp.decode(after), limit))
        if after is None or isinstance(after, int) or not after.startswith("gd1:"):
            token = yield from self._start_page_token()
            if since is not None:
                return (yield from self._catch_up(CatchUp(_ms(since), token), limit))
        else:
            token = _token(after)
        params = self._changes_params(token, limit)
        return self._changes_page((yield from self._json(self._path("changes"), params=params)))

    def _catch_up(self, catch: CatchUp, limit: int) -> Flow[ChangesPage]:
        since = datetime.fromtimestamp(catch.since_ms / 1000, tz=UTC)
        raw = yield from self._files(since, catch.files_token, limit)
        return self._catch_up_page(catch, raw)

    def _replay(
        self, since: datetime, *, cursor: str | None = None, limit: int = 100
    ) -> Flow[ReplayPage]:
        """Files modified since ``since`` (current states; trashed ones as deletions)."""
        raw = yield from self._files(since, cursor, limit)
        return self._replay_page(self._files_page(raw), raw)

    def _watch(
        self,
        address: str,
        token: str,
        *,
        ttl: timedelta = MAX_CHANNEL_TTL,
        page_token: str | None = None,
    ) -> Flow[Channel]:
        """Open a ``changes.watch`` channel to ``address``, verified by ``token``."""
        body = self._watch_body(address, token, ttl, self.gateway.clock.now())
        start = page_token or (yield from self._start_page_token())
        answer = yield from self._json(
            self._path("watch"), method="POST", params={"pageToken": start}, json=body
        )
        return self._channel(answer)

    def _stop(self, channel: Channel) -> Flow[None]:
        """``channels.stop``: Drive stops notifying the channel."""
        yield from self._json(
            self._path("stop"),
            raw=True,
            method="POST",
            json={"id": channel.id, "resourceId": channel.resource_id},
        )

    def _renew(
        self,
        channel: Channel | None,
        address: str,
        token: str,
        *,
        margin: timedelta,
        ttl: timedelta = MAX_CHANNEL_TTL,
    ) -> Flow[Channel]:
        """Open the next channel when ``channel`` is missing or within ``margin`` of expiry,
        then stop the old one (overlap: no notification is lost in between)."""
        now = self.gateway.clock.now()
        if channel is not None and not channel.due(now, margin):
            return channel
        fresh = yield from self._watch(address, token, ttl=ttl)
        if channel is not None and channel.expiration > now:
            yield from self._stop(channel)
        return fresh


class DriveClient(_DriveFlows, ReplayPages):
    """Sync Drive adapter: the changes feed (opaque page tokens), files, watch channels."""

    gateway: Gateway

    start_page_token = sync_face(_DriveFlows._start_page_token)
    get_record = sync_face(_DriveFlows._get_record)
    list_records = sync_face(_DriveFlows._list_records)
    changes = sync_face(_DriveFlows._changes)
    replay = sync_face(_DriveFlows._replay)
    watch = sync_face(_DriveFlows._watch)
    stop = sync_face(_DriveFlows._stop)
    renew = sync_face(_DriveFlows._renew)
    health = sync_face(_DriveFlows._health)


class AsyncDriveClient(_DriveFlows, AsyncReplayPages):
    """Async twin of :class:`DriveClient`."""

    gateway: AsyncGateway

    start_page_token = async_face(_DriveFlows._start_page_token)
    get_record = async_face(_DriveFlows._get_record)
    list_records = async_face(_DriveFlows._list_records)
    changes = async_face(_DriveFlows._changes)
    replay = async_face(_DriveFlows._replay)
    watch = async_face(_DriveFlows._watch)
    stop = async_face(_DriveFlows._stop)
    renew = async_face(_DriveFlows._renew)
    health = async_face(_DriveFlows._health)


# --------------------------------------------------------------------------- the pack


class DrivePack(PackBase):
    """Google Drive (documents)."""

    name = "gdrive"
    summary = "Google Drive files: changes feed (page tokens), watch channels, OAuth."
    capabilities = Capabilities(
        webhooks=(
            "changes.watch channels, X-Goog-Channel-Token; data-less (the receiver fetches "
            "changes), expire (<= 7 days)"
        ),
        polling="changes.list with page tokens (newStartPageToken stored)",
        replay="files.list modifiedTime >= since (current states)",
        replay_window="unbounded for current states; permanent deletions only by the feed",
        resync=True,
        auth=("oauth refresh_token (oauth2.googleapis.com/token)", "static bearer token"),
        rate_limit_headers=("Retry-After (403 rateLimitExceeded/userRateLimitExceeded, 429)",),
        ordering="modified (change time / modifiedTime), ties by event id",
        event_identity="derived: fileId and file version (removal: fileId and time)",
    )
    endpoints: Mapping[str, str] = {}
    client_class = DriveClient
    async_client_class = AsyncDriveClient

    def webhook_scheme(self, settings: ProviderSettings) -> ChannelToken | None:
        """Channel tokens are ``WEBHOOK_SECRETS`` (several while channels are renewed)."""
        if not settings.webhook_secrets:
            return None
        return ChannelToken(
            settings.webhook_secrets,
            label=f"IDIS_PROVIDER_{settings.name.upper()}_WEBHOOK_SECRETS",
        )

    def webhook_events(self, body: bytes, provider: str) -> list[ProviderEvent]:
        """None: a notification carries no data; it triggers a changes fetch."""
        return []

    def webhook_triggers_fetch(self, headers: Mapping[str, str]) -> bool:
        """Whether a verified notification means "fetch changes now" (``change``, not the
        ``sync`` handshake a new channel sends first). The receiver then runs a changes
        fetch from the stored page token instead of reading the (empty) body."""
        state = {k.lower(): v for k, v in headers.items()}.get("x-goog-resource-state", "")
        return state.strip() != "sync"

    read_rate_limit = staticmethod(read_rate_limit)
    map_error = staticmethod(map_error)

    def update_call(
        self, settings: ProviderSettings, record_id: str, data: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``PATCH /drive/v3/files/{id}`` with ``{"appProperties": data}`` (text values)."""
        return {
            "endpoint": endpoint(settings, "drive_file", "/drive/v3/files/{id}"),
            "method": "PATCH",
            "path_params": {"id": record_id},
            "json": {"appProperties": {k: None if v is None else str(v) for k, v in data.items()}},
        }


GDRIVE = register_pack(DrivePack())
