"""``check_token(provider)``: one readable line about a provider's OAuth token (RB-09 Triage 3).

It reads the ``oauth_tokens`` row at ``IDIS_DATABASE_URL`` and decrypts
nothing, so it needs no encryption key and can print no secret. It never
contacts the provider and never raises for an unreachable or uninitialised
database: those are states of their own (``unknown``) with the next step in
the line. An unknown provider name raises :class:`UnknownProviderError`,
whose message lists the configured providers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from .._clock import Clock, system_clock
from .._timeparse import format_duration
from ..config import Settings
from ..observability._logs import redact_text

__all__ = ["TokenState", "TokenStatus", "check_token", "token_status", "token_statuses"]

TokenState = Literal[
    "valid",
    "expiring",
    "expired",
    "missing",
    "refresh_failing",
    "reauthorization_required",
    "refresh_outcome_unknown",
    "not_required",
    "unknown",
]


def utc_seconds(value: datetime | None) -> str | None:
    """``value`` to the second in ISO-8601 with ``Z`` (None stays None)."""
    if value is None:
        return None
    return value.replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class TokenStatus:
    """A provider's token state; ``str()`` is one line with no secret in it."""

    #: Provider name.
    provider: str
    #: valid, expiring, expired, missing, refresh_failing, reauthorization_required,
    #: refresh_outcome_unknown (a refresh's answer was lost: re-authorize),
    #: not_required (no OAuth) or unknown (token store unreadable).
    state: TokenState
    #: Seconds until expiry (negative once expired); None when unknown.
    seconds_left: float | None = None
    #: Expiry time.
    expires_at: datetime | None = None
    #: Granted scopes.
    scopes: tuple[str, ...] = ()
    #: Last successful refresh or import.
    last_refresh: datetime | None = None
    #: Outcome of the last attempt (ok, failed, invalid_grant, ...).
    last_outcome: str | None = None
    #: Last error (redacted), cleared by a success.
    last_error: str | None = None
    #: Failed attempts since the last success.
    consecutive_failures: int = 0
    #: The configured grant.
    grant: str = ""
    #: Refresh margin in seconds (``expiring`` means inside it).
    refresh_margin: float = 0.0
    #: What to do next, for the states that need someone.
    hint: str | None = None
    #: Whether the token itself is stored (encrypted); False: each process keeps its own
    #: in memory because IDIS_ENCRYPTION_KEYS is unset.
    stored: bool = True

    @property
    def healthy(self) -> bool:
        """Whether calls can be authenticated now without anyone's help."""
        return self.state in ("valid", "expiring", "not_required")

    def __str__(self) -> str:
        label = self.state.replace("_", " ").upper()
        if not self.stored and self.state in ("valid", "expiring"):
            label += " (in process memory only: IDIS_ENCRYPTION_KEYS is unset)"
        parts = [f"{self.provider}: token {label}"]
        if self.seconds_left is not None:
            seconds, when = round(self.seconds_left), utc_seconds(self.expires_at)
            if seconds >= 0:
                parts.append(f"{seconds}s left ({format_duration(seconds)}, expires {when})")
            else:
                parts.append(
                    f"{seconds}s left (expired {format_duration(-seconds)} ago, at {when})"
                )
        elif self.state not in ("missing", "not_required", "unknown"):
            parts.append("no expiry given")
        if self.state not in ("not_required", "unknown"):
            parts.append(f"scopes: {' '.join(self.scopes) if self.scopes else '-'}")
            refreshed = utc_seconds(self.last_refresh) or "never"
            outcome = f" (last attempt: {self.last_outcome})" if self.last_outcome else ""
            parts.append(f"last refresh: {refreshed}{outcome}")
            if self.consecutive_failures:
                parts.append(f"{self.consecutive_failures} consecutive failures")
            parts.append(f"last error: {self.last_error or 'none'}")
        line = "; ".join(parts)
        # Errors raised by the library already say what to run; do not say it twice.
        if self.hint and "idis-integrations " not in (self.last_error or ""):
            line += f" -> {self.hint}"
        # One line, whatever an error message contained.
        return redact_text(" ".join(line.split()))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (no secret), the margin left out and ``healthy`` added."""
        data = asdict(self) | {
            "seconds_left": None if self.seconds_left is None else round(self.seconds_left),
            "expires_at": utc_seconds(self.expires_at),
            "scopes": list(self.scopes),
            "last_refresh": utc_seconds(self.last_refresh),
            "healthy": self.healthy,
        }
        del data["refresh_margin"]
        return data


#: What to do next in each stopped state a row can store (``{p}``: the provider).
_STOPPED_HINTS = {
    "reauthorization_required": "re-authorize, then `idis-integrations import-token --provider "
    "{p}` (or fix the credentials and run `idis-integrations refresh-tokens --provider {p}`)",
    "refresh_outcome_unknown": "re-authorize: the provider may have rotated the refresh token in "
    "an answer that was lost, and resending the old one could revoke the whole token family; "
    "then `idis-integrations import-token --provider {p}`",
    "refresh_failing": "`idis-integrations refresh-tokens --provider {p}` retries now",
}


def _missing_hint(provider: str, grant: str) -> str:
    if grant == "refresh_token":
        return (
            f"complete the authorization and run `idis-integrations import-token --provider "
            f"{provider}`"
        )
    return (
        f"one is obtained on the first call, or run `idis-integrations refresh-tokens "
        f"--provider {provider}`"
    )


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  # any unparsable URL is shown as a placeholder
        return "<unparsable IDIS_DATABASE_URL>"


def token_status(
    settings: Settings,
    provider: str,
    *,
    engine: Any = None,
    clock: Clock | None = None,
) -> TokenStatus:
    """The status of ``provider``'s token in the database of ``settings``.

    Args:
        settings: Library settings.
        provider: Provider name.
        engine: An engine to read through (default: a short-lived one).
        clock: Where "now" comes from (default: the system clock; the drill passes its own).

    Raises:
        UnknownProviderError: the provider is not configured (lists the known ones).
    """
    auth = settings.provider(provider).auth
    if auth.grant == "none":
        return TokenStatus(provider=provider, state="not_required", grant=auth.grant)
    row = _unreadable(provider, auth.grant, settings.database_url, engine)
    if isinstance(row, TokenStatus):
        return row
    return _from_row(provider, auth.grant, auth.refresh_margin, row, (clock or system_clock).now())


def _from_row(provider: str, grant: str, margin: float, row: Any, now: datetime) -> TokenStatus:
    """The status a provider's ``oauth_tokens`` row (None: no row) gives at ``now``."""
    if row is None:
        return TokenStatus(
            provider=provider,
            state="missing",
            grant=grant,
            refresh_margin=margin,
            hint=_missing_hint(provider, grant),
        )
    left = (row.expires_at - now).total_seconds() if row.expires_at is not None else None
    state: TokenState
    hint = None
    if row.state in _STOPPED_HINTS:
        state, hint = row.state, _STOPPED_HINTS[row.state].format(p=provider)
    elif row.expires_at is None and row.issued_at is None:
        state, hint = "missing", _missing_hint(provider, grant)
    elif left is None or left > margin:
        state = "valid"
    else:
        state = "expiring" if left > 0 else "expired"
    return TokenStatus(
        provider=provider,
        state=state,
        seconds_left=left,
        expires_at=row.expires_at,
        scopes=tuple(row.scopes or ()),
        last_refresh=row.last_refresh_at,
        last_outcome=row.last_outcome,
        last_error=redact_text(row.last_error) if row.last_error else None,
        consecutive_failures=row.consecutive_failures,
        grant=grant,
        refresh_margin=margin,
        hint=hint,
        stored=row.access_token_enc is not None,
    )


def token_statuses(
    settings: Settings,
    providers: Iterable[str],
    connection: Any,
    *,
    clock: Clock | None = None,
) -> dict[str, TokenStatus]:
    """Every listed provider's token status from one read, on ``connection``.

    One statement for all the OAuth providers among ``providers`` (none for
    the others: ``not_required``), on a Connection or Session the caller
    already holds (``status`` reads everything on one connection). Unlike
    :func:`token_status`, a database error is raised, not reported as
    ``unknown``: the caller decides (``status`` falls back to
    :func:`token_status`, which says why).

    Raises:
        UnknownProviderError: a provider is not configured.
        sqlalchemy.exc.SQLAlchemyError: the token table could not be read.
    """
    from sqlalchemy import select

    from ._store import TABLE

    auth = {name: settings.provider(name).auth for name in providers}
    out = {
        name: TokenStatus(provider=name, state="not_required", grant=a.grant)
        for name, a in auth.items()
        if a.grant == "none"
    }
    wanted = sorted(name for name, a in auth.items() if a.grant != "none")
    if not wanted:
        return out
    rows = {
        row.provider: row
        for row in connection.execute(select(TABLE).where(TABLE.c.provider.in_(wanted)))
    }
    now = (clock or system_clock).now()
    for name in wanted:
        a = auth[name]
        out[name] = _from_row(name, a.grant, a.refresh_margin, rows.get(name), now)
    return out


def _unreadable(provider: str, grant: str, url: str, engine: Any) -> Any:
    """The provider's row, None if absent, or an ``unknown`` TokenStatus saying why."""
    from sqlalchemy import select
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from ..db._engine import create_db_engine, read_only
    from ._store import TABLE

    def unknown(why: str) -> TokenStatus:
        return TokenStatus(provider=provider, state="unknown", grant=grant, hint=why)

    own, shown = engine is None, _safe_url(url)
    if own:
        try:
            parsed = make_url(url)
        except Exception:  # noqa: BLE001  # reported as a status line, not a traceback
            return unknown(f"IDIS_DATABASE_URL is not a database URL ({shown})")
        if parsed.get_backend_name() == "sqlite":
            path = parsed.database or ""
            if path and path != ":memory:" and not Path(path).exists():
                # Opening it would create an empty file; report instead.
                return unknown(
                    f"token store {shown} does not exist: run `idis-integrations db "
                    "upgrade` (and check IDIS_DATABASE_URL)"
                )
            engine = create_db_engine(url)
        else:
            engine = create_db_engine(url, connect_args={"connect_timeout": 5})
    try:
        with read_only(engine).connect() as conn:
            row = conn.execute(select(TABLE).where(TABLE.c.provider == provider)).first()
    except DBAPIError as exc:
        text = str(exc.orig) if exc.orig is not None else type(exc).__name__
        if getattr(exc.orig, "sqlstate", None) == "42P01" or "no such table" in text:
            return unknown(f"token table missing in {shown}: run `idis-integrations db upgrade`")
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return unknown(f"token store {shown} unreachable: {redact_text(first)}")
    except SQLAlchemyError as exc:
        return unknown(f"token store {shown} unreadable: {type(exc).__name__}")
    finally:
        if own:
            engine.dispose()
    return row


def check_token(
    provider: str, *, settings: Settings | None = None, clock: Clock | None = None
) -> TokenStatus:
    """Return ``provider``'s OAuth token status; ``print()`` it for one readable line.

    RB-09 Triage 3 runs::

        python -c "from idis.integrations import check_token; print(check_token('crm_provider'))"

    Configuration comes from the environment alone (``Settings.from_env()``);
    the token table at ``IDIS_DATABASE_URL`` is read, nothing is decrypted and
    the provider is not contacted. An unreachable or uninitialised database
    gives state ``unknown`` with the reason, not a traceback.

    Args:
        provider: Provider name as configured.
        settings: Settings to use instead of the environment.
        clock: Where "now" comes from (default: the system clock; a simulated
            timeline, like the drill's, passes its own).

    Returns:
        A :class:`TokenStatus`: state (valid, expiring, expired, missing,
        refresh_failing, reauthorization_required, refresh_outcome_unknown),
        seconds left, scopes, last refresh and last error.

    Raises:
        UnknownProviderError: the provider is not configured; the message lists
            the configured ones.
        ConfigError: the environment itself is invalid (names the variable).
    """
    return token_status(settings or Settings.from_env(), provider, clock=clock)
