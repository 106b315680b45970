"""Engines and sessions for the embedded SQLite default and for PostgreSQL.

URLs are normalised so an operator can write ``postgresql://...`` or
``sqlite:///file.db`` and get psycopg 3 / aiosqlite drivers, WAL mode, a busy
timeout and foreign keys on SQLite, and pre-ping on PostgreSQL so a restarted
server costs one failed checkout, not a crashed worker.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from itertools import repeat
from json.scanner import make_scanner
from typing import Any, TypeAlias, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from .._redact import mask_url
from ..exceptions import ConfigError, StorageError

try:  # SQLAlchemy >= 2.1 (await_only, the old name, is deprecated there)
    from sqlalchemy.util import await_ as await_in_greenlet
except ImportError:  # pragma: no cover  # SQLAlchemy 2.0
    from sqlalchemy.util import await_only as await_in_greenlet

__all__ = [
    "READ_ONLY",
    "SqliteRun",
    "aiosqlite_thread",
    "aread_only",
    "async_session_scope",
    "await_in_greenlet",
    "blocking_twin",
    "create_async_db_engine",
    "create_db_engine",
    "driver_error",
    "normalize_url",
    "on_driver",
    "on_driver_pair",
    "on_driver_pipeline",
    "ping_idle_only",
    "read_only",
    "session_scope",
    "storage_errors",
    "unwatched",
]

#: Seconds SQLite waits on a locked database before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalize_url(url: str, *, asynchronous: bool = False) -> str:
    """Return the SQLAlchemy URL with this library's chosen driver.

    Raises:
        ConfigError: when the URL cannot be parsed or names another database.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigError(
            f"IDIS_DATABASE_URL={mask_url(url)!r} is not a database URL: expected "
            "sqlite:///path.db or postgresql://user@host/db",
            variable="IDIS_DATABASE_URL",
        ) from None
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite" if asynchronous else "sqlite")
    else:
        raise ConfigError(
            f"IDIS_DATABASE_URL={mask_url(url)!r} is not supported: expected sqlite or postgresql",
            variable="IDIS_DATABASE_URL",
        )
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the single writer; NORMAL sync is durable
    # across application crashes (not power loss), the usual WAL trade-off.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


#: Execution option marking a connection whose transactions only read.
READ_ONLY = "idis_read_only"


def _sqlite_begin(conn: Any) -> None:
    if conn.get_execution_options().get(READ_ONLY):
        # A deferred BEGIN takes no lock until the first read, and in WAL mode
        # readers never wait for the writer: status pages stay fast while a
        # worker drains the outbox.
        conn.exec_driver_sql("BEGIN")
        return
    # BEGIN IMMEDIATE takes the write lock up front, so two writers queue on
    # busy_timeout instead of failing with "database is locked" on upgrade.
    if not conn.dialect.is_async and unwatched(conn):
        # Nothing watches execution: straight to pysqlite (SQLAlchemy's
        # exec_driver_sql would add about 40 µs to every write transaction).
        on_driver(conn, "BEGIN IMMEDIATE", ())
        return
    hop = aiosqlite_thread(conn)
    if hop is not None:
        # aiosqlite: one hop to its thread, not three (cursor, execute, close).
        hop(_begin_immediate)
        return
    conn.exec_driver_sql("BEGIN IMMEDIATE")


_SQL_LOG = logging.getLogger("sqlalchemy.engine.Engine")


def unwatched(conn: Any) -> bool:
    """Whether nothing watches SQLAlchemy's execution on ``conn`` (no cursor or error
    listeners, no echo, no SQL logging): a statement may then go to the driver directly."""
    dispatch = conn.dispatch
    return not (
        dispatch.before_cursor_execute
        or dispatch.after_cursor_execute
        or conn.dialect.dispatch.handle_error
        or conn.engine.echo
        or _SQL_LOG.isEnabledFor(logging.INFO)
    )


def on_driver(
    conn: Any, sql: str, params: Any, *, many: bool = False, rowcount: bool = False
) -> Any:
    """Run ``sql`` on ``conn``'s DB-API cursor, skipping SQLAlchemy's execute.

    The rows (a list of tuples; none for ``many`` or a statement that returns
    none), or with ``rowcount`` how many rows it changed. For a caller that
    checked :func:`unwatched` first. A driver error comes out as SQLAlchemy's
    execute raises it: a ``DBAPIError`` subclass, a lost connection invalidated.
    """
    dbapi_conn = conn.connection.dbapi_connection
    cursor = dbapi_conn.cursor()
    try:
        if many:
            cursor.executemany(sql, params)
            return []
        cursor.execute(sql, params)
        if rowcount:
            return cursor.rowcount
        return cursor.fetchall() if returns_rows(cursor) else []
    except conn.dialect.loaded_dbapi.Error as exc:
        raise driver_error(conn, exc, sql, params, cursor) from exc
    finally:
        cursor.close()


#: libpq's status of a result that carries rows (``PGRES_TUPLES_OK``).
_TUPLES_OK = 2
#: A cursor without psycopg's ``pgresult`` (another driver).
_NO_RESULT: Any = object()


def returns_rows(cursor: Any) -> bool:
    """Whether ``cursor``'s last statement returned rows (``description is not None``).

    On psycopg this reads its result as ``description`` does, without building the
    ``Column`` object per column that ``description`` makes on each access."""
    result: Any = getattr(cursor, "pgresult", _NO_RESULT)
    if result is _NO_RESULT:
        return cursor.description is not None
    return result is not None and (result.nfields > 0 or result.status == _TUPLES_OK)


def _pipelines(dbapi_conn: Any) -> bool:
    """Whether ``dbapi_conn`` can pipeline statements (psycopg on libpq 14 or later)."""
    return getattr(type(dbapi_conn), "pipeline", None) is not None and _psycopg_pipelines()


@functools.cache
def _psycopg_pipelines() -> bool:
    from psycopg import Pipeline

    return bool(Pipeline.is_supported())


def on_driver_pair(
    conn: Any, first_sql: str, first_params: Any, second_sql: str, second_params: Any
) -> tuple[int, list[Any]]:
    """How many rows ``first_sql`` changed and the rows ``second_sql`` returns, run in
    that order on ``conn``'s DB-API cursors, skipping SQLAlchemy's execute.

    On psycopg both go to the server in one round trip (:func:`on_driver_pipeline`),
    where :func:`on_driver` twice takes two; elsewhere they run one after the other.
    The second does not run when the first fails.
    """
    if not _pipelines(conn.connection.dbapi_connection):
        count: int = on_driver(conn, first_sql, first_params, rowcount=True)
        return count, on_driver(conn, second_sql, second_params)
    (count, _), (_, rows) = on_driver_pipeline(
        conn, [(first_sql, first_params), (second_sql, second_params)]
    )
    return count, rows


def on_driver_pipeline(
    conn: Any, statements: Sequence[tuple[str, Any]], *, driver: Any = None
) -> list[tuple[int, list[Any]]]:
    """Each statement's rowcount and rows, all sent in one psycopg pipeline (one round
    trip) on ``driver`` (default ``conn``'s DB-API connection), skipping SQLAlchemy's execute.

    The server runs them in order, and none after one that fails. A driver error
    comes out as SQLAlchemy's execute raises it, naming the statement that failed;
    for a caller that checked :func:`unwatched` first.
    """
    if driver is None:
        driver = conn.connection.dbapi_connection
    cursors = [driver.cursor() for _ in statements]
    try:
        with driver.pipeline():
            for cursor, (sql, params) in zip(cursors, statements, strict=True):
                cursor.execute(sql, params)
        return [(c.rowcount, c.fetchall() if returns_rows(c) else []) for c in cursors]
    except conn.dialect.loaded_dbapi.Error as exc:
        # A failed statement's cursor holds no result (psycopg checks the results
        # before attaching them): the first such one failed.
        failed = next((i for i, c in enumerate(cursors) if c.pgresult is None), len(cursors) - 1)
        sql, params = statements[failed]
        raise driver_error(conn, exc, sql, params, cursors[failed]) from exc
    finally:
        for cursor in cursors:
            cursor.close()


def driver_error(conn: Any, exc: Exception, sql: str, params: Any, cursor: Any = None) -> Exception:
    """The error SQLAlchemy's execute would raise for the driver's ``exc`` on ``conn``
    (a lost connection invalidated, as SQLAlchemy does)."""
    dialect = conn.dialect
    lost = bool(dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor))
    if lost:
        conn.invalidate(exc)
    error: Exception = DBAPIError.instance(
        sql,
        params,
        exc,
        dialect.loaded_dbapi.Error,
        hide_parameters=conn.engine.hide_parameters,
        connection_invalidated=lost,
        dialect=dialect,
    )
    return error


#: Runs one statement on a ``sqlite3`` connection: (qmark SQL, parameters, executemany) -> rows.
SqliteRun: TypeAlias = Callable[[str, Any, bool], list[Any]]

_T = TypeVar("_T")
#: aiosqlite's ``Connection`` method that queues a function to its thread (private API).
_AIOSQLITE_CALL = "_execute"


def aiosqlite_thread(conn: Any) -> Callable[[Callable[[SqliteRun], _T]], _T] | None:
    """On aiosqlite, with nothing watching execution: runs ``work`` in one hop on the
    connection's own thread, its statements on the ``sqlite3`` connection there; else None.

    aiosqlite runs every call (cursor, execute, fetchall, close, commit) as a function
    queued to its thread and awaits its future: ``Connection._execute(fn, *args)``, the
    queue SQLAlchemy's aiosqlite dialect also feeds directly (its ``isolation_level``
    setter). That is private API (a test pins it with the installed aiosqlite, 0.22):
    without ``_execute``, or without a running worker and an open ``sqlite3``
    connection behind it, this answers None and the statements go through
    SQLAlchemy's adapter as before (which raises for a closed connection). Called in
    the greenlet of ``AsyncSession.run_sync``, as the adapter's cursor is. A driver
    error comes out as SQLAlchemy's execute raises it (:func:`driver_error`). ``work``
    runs on that thread: it must not touch the event loop or SQLAlchemy's connection,
    only ``run``.
    """
    dialect = conn.dialect
    if not dialect.is_async or dialect.driver != "aiosqlite" or not unwatched(conn):
        return None
    driver = getattr(conn.connection.dbapi_connection, "driver_connection", None)
    execute = getattr(driver, _AIOSQLITE_CALL, None)
    raw = getattr(driver, "_connection", None)
    running = getattr(driver, "_running", False)
    if not callable(execute) or not running or not isinstance(raw, sqlite3.Connection):
        return None
    error = dialect.loaded_dbapi.Error

    def hop(work: Callable[[SqliteRun], _T]) -> _T:
        last: list[Any] = ["", ()]

        def run(sql: str, params: Any, many: bool) -> list[Any]:
            last[0], last[1] = sql, params
            cursor = raw.cursor()
            try:
                if many:
                    cursor.executemany(sql, params)
                    return []
                cursor.execute(sql, params)
                return cursor.fetchall() if cursor.description is not None else []
            finally:
                cursor.close()

        try:
            result: _T = await_in_greenlet(execute(work, run))
        except error as exc:
            raise driver_error(conn, exc, last[0], last[1]) from exc
        return result

    return hop


def _begin_immediate(run: SqliteRun) -> None:
    run("BEGIN IMMEDIATE", (), False)


def _no_pysqlite_txn(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not pysqlite, emit BEGIN (see SQLAlchemy's
    # "Serializable isolation / Savepoints / Transactional DDL" notes).
    dbapi_connection.isolation_level = None


def _configure_sqlite(engine: Engine) -> None:
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "connect", _no_pysqlite_txn)
    event.listen(engine, "begin", _sqlite_begin)


_json_decoder = json.JSONDecoder()
_json_decode = _json_decoder.decode
# typeshed types make_scanner as the class it is, whose constructor takes the decoder.
_json_scan = make_scanner(_json_decoder)  # type: ignore[arg-type]


def load_json(text: str) -> Any:
    """``json.loads(text)`` for a document as a database returns it, a third faster.

    The decoder's own scanner, called directly: ``JSONDecoder.decode`` wraps
    it in two regular-expression matches for surrounding whitespace, which
    documents written by ``json.dumps`` or read from ``jsonb`` do not have.
    Anything else (whitespace, trailing text, malformed) goes through
    ``decode`` and behaves exactly as ``json.loads``.
    """
    try:
        value, end = _json_scan(text, 0)
    except (StopIteration, ValueError):
        return _json_decode(text)
    if end != len(text):
        return _json_decode(text)
    return value


def load_json_column(texts: Sequence[str]) -> Sequence[Any]:
    """``[load_json(t) for t in texts]``, scanned in C with no Python call per document.

    When a document is not one the scanner takes whole (whitespace, trailing
    text, malformed), every one goes through :func:`load_json`, which
    behaves as ``json.loads``: the same values, the same errors.
    """
    if not texts:
        return []
    try:
        values, ends = zip(*map(_json_scan, texts, repeat(0)), strict=True)
    except (StopIteration, ValueError):
        return [load_json(text) for text in texts]
    if ends != tuple(map(len, texts)):
        return [load_json(text) for text in texts]
    return values


def load_json_values(texts: Sequence[str]) -> Sequence[Any]:
    """``[load_json(t) for t in texts]`` for texts that are each one JSON value, as
    PostgreSQL's ``json``/``jsonb`` output always is: scanned at once, as the
    elements of one array.

    One scanner call for the batch, and the object keys the documents share
    are made once (the scanner's memo lasts one call): about a quarter less
    than scanning each. A text that is not one value could merge with its
    neighbours in the array, so this is for the database's own JSON output
    only; a batch the array scan does not take whole (a count or an end that
    does not match, a scanner error) is decoded by :func:`load_json_column`,
    which raises what ``json.loads`` raises.
    """
    if not texts:
        return []
    try:
        text = "[" + ",".join(texts) + "]"
        values, end = _json_scan(text, 0)
    except (StopIteration, ValueError, TypeError, RecursionError):
        return load_json_column(texts)
    if end != len(text) or len(values) != len(texts):
        return load_json_column(texts)
    return values  # type: ignore[no-any-return]  # the scanner's list


def _json_loads(data: bytes | str) -> Any:
    # PostgreSQL sends json/jsonb as UTF-8; json.loads(bytes) would first
    # sniff the encoding (twice the cost of the decode for a small payload).
    return load_json(data.decode() if isinstance(data, bytes) else data)


def _fast_json(dbapi_connection: Any, _record: Any) -> None:
    from psycopg.types.json import set_json_loads

    set_json_loads(_json_loads, dbapi_connection)


#: Async engines made by :func:`create_async_db_engine` -> their ``connect_args``.
_MADE_HERE: weakref.WeakKeyDictionary[Engine, dict[str, Any]] = weakref.WeakKeyDictionary()


#: Modules whose pool listeners every engine gets anyway (not the host's own).
_OWN_LISTENERS = ("sqlalchemy.", "idis.integrations.")


def blocking_twin(engine: AsyncEngine, *, pool_size: int = 0) -> Engine | None:
    """A blocking engine on the same database as ``engine``, or None.

    For work that runs a whole transaction in one hop to a thread instead of
    awaiting each statement: aiosqlite sends every statement, cursor call and
    COMMIT to its own thread and back; psycopg's async driver waits for each
    result through the event loop. The twin (pysqlite, or psycopg's blocking
    connection) opens its own connections with the same URL and
    ``connect_args`` (no pool: whoever uses it holds its connection), with the
    same SQLite pragmas and ``BEGIN IMMEDIATE``, runs the ``connect`` and
    ``checkout`` listeners the host added to ``engine``'s pool before the twin
    was made (on the driver's own connection, not the async adapter), and fires
    ``engine``'s connection events (``begin``, ``commit``,
    ``before_cursor_execute``, ...), those added later too. Connections may
    move between threads; the caller uses each from one thread at a time.

    ``pool_size`` > 0 gives the twin a pool of its own instead (that many
    connections kept, as many again opened under load; pre-ping on PostgreSQL
    as :func:`create_async_db_engine`): for callers that run many short
    transactions and hold none (the webhook receiver's batches).

    None when ``engine`` was not made by :func:`create_async_db_engine` (its
    options are unknown), is an in-memory SQLite database (a second
    connection would see another database), or runs on a SQLAlchemy whose
    private dispatch join (how the events are shared) is gone.
    """
    sync = engine.sync_engine
    connect_args = _MADE_HERE.get(sync)
    if connect_args is None:
        return None
    url = sync.url
    pooling: dict[str, Any] = (
        {"pool_size": pool_size, "max_overflow": pool_size}
        if pool_size > 0
        else {"poolclass": NullPool}
    )
    if sync.dialect.name == "sqlite":
        database = url.database or ""
        if (
            database in ("", ":memory:")
            or "mode=memory" in database
            or url.query.get("mode") == "memory"
        ):
            return None
        twin = create_engine(
            url.set(drivername="sqlite"),
            connect_args={"check_same_thread": False, **connect_args},
            **pooling,
        )
        event.listen(twin, "connect", _sqlite_pragmas)
        event.listen(twin, "connect", _no_pysqlite_txn)
    else:
        if pool_size > 0:
            pooling["pool_pre_ping"] = True
        twin = create_engine(url, connect_args=connect_args, **pooling)
        event.listen(twin, "connect", _fast_json)
    # The host's own pool listeners (a search_path, a pragma, a SQL function set on
    # each new or checked-out connection) set up the twin's connections too: without
    # them its statements could run in another schema. SQLAlchemy's and this
    # module's are the twin's already. Ones added to ``engine`` later are not copied.
    for name in ("connect", "checkout"):
        # ``.listeners``: this pool's own; class-wide ones (``Pool``) reach the twin anyway.
        for listener in list(getattr(getattr(sync.pool.dispatch, name), "listeners", ())):
            if not getattr(listener, "__module__", "").startswith(_OWN_LISTENERS):
                event.listen(twin, name, listener)
    # The async engine's connection events, dispatched on the twin's connections
    # as well (what SQLAlchemy's own Engine.execution_options copies do). That join
    # is SQLAlchemy's private API: a version without it gets no twin (the caller
    # then runs on the async engine itself), never a twin deaf to the host's events.
    try:
        twin.dispatch = twin.dispatch._join(sync.dispatch)
    except (AttributeError, NotImplementedError):
        twin.dispose()
        return None
    twin._has_events = True
    return twin


def ping_idle_only(engine: Engine, seconds: float) -> None:
    """Pre-ping only the pooled connections that came back more than ``seconds`` ago.

    A connection the pool got back a moment ago (its transaction just
    committed or rolled back on it) is alive in all likelihood, and its ping
    (a ``SELECT 1`` round trip and two autocommit switches on psycopg) is
    a large share of a short transaction's cost. Should the server have gone
    away within ``seconds`` nonetheless, the first statement fails as a
    disconnect, which invalidates the pool's connections (SQLAlchemy), so the
    next checkout connects afresh; callers retry as they would any transient
    fault. An engine without ``pool_pre_ping`` is left alone; a second call
    changes the window.
    """
    pool: Any = engine.pool
    if not getattr(pool, "_pre_ping", False):
        return
    dialect: Any = engine.dialect
    window = getattr(dialect, "_idis_ping_window", None)
    if window is not None:
        window[0] = seconds
        return
    window = dialect._idis_ping_window = [seconds]
    returned: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
    ping = dialect.do_ping

    def do_ping(dbapi_connection: Any) -> bool:
        # An asyncio driver's connection is SQLAlchemy's adapter around the driver's own.
        key = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        at = returned.get(key)
        if at is not None and time.monotonic() - at < window[0]:
            return True
        return bool(ping(dbapi_connection))

    def checkin(dbapi_connection: Any, _record: Any) -> None:
        if dbapi_connection is not None:
            key = getattr(dbapi_connection, "driver_connection", dbapi_connection)
            with contextlib.suppress(TypeError):  # not weakly referable: always pinged
                returned[key] = time.monotonic()

    dialect.do_ping = do_ping
    event.listen(pool, "checkin", checkin)


def create_db_engine(url: str, **kwargs: Any) -> Engine:
    """Create a sync engine for ``url`` (sqlite or postgresql)."""
    normalized = normalize_url(url)
    if normalized.startswith("sqlite"):
        engine = create_engine(normalized, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 10)
    return create_engine(normalized, **kwargs)


def create_async_db_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """Create an asyncio engine for ``url`` (aiosqlite or psycopg async)."""
    normalized = normalize_url(url, asynchronous=True)
    if normalized.startswith("sqlite"):
        engine = create_async_engine(normalized, **kwargs)
        _configure_sqlite(engine.sync_engine)
    else:
        kwargs.setdefault("pool_pre_ping", True)
        engine = create_async_engine(normalized, **kwargs)
    _MADE_HERE[engine.sync_engine] = dict(kwargs.get("connect_args") or {})
    return engine


def async_session_factory(engine: AsyncEngine) -> async_sessionmaker[Any]:
    """Session factory for an async engine (expire_on_commit off, as asyncio needs)."""
    return async_sessionmaker(engine, expire_on_commit=False)


@contextmanager
def storage_errors(what: str = "database") -> Iterator[None]:
    """Translate SQLAlchemy connection failures into :class:`StorageError`.

    The message names the database host, never its password.
    """
    try:
        yield
    except (OperationalError, DBAPIError) as exc:
        if (
            isinstance(exc, DBAPIError)
            and not exc.connection_invalidated
            and not isinstance(exc, OperationalError)
        ):
            raise
        raise StorageError(
            f"{what} unreachable or refused the statement: {_describe(exc)}"
        ) from exc


def _describe(exc: DBAPIError) -> str:
    from ..observability._logs import redact_text

    text = str(exc.orig) if exc.orig is not None else type(exc).__name__
    return redact_text(text.strip().splitlines()[0] if text.strip() else type(exc).__name__)


def read_only(engine: Engine) -> Engine:
    """``engine`` with its transactions marked read-only (no write lock on SQLite)."""
    return engine.execution_options(**{READ_ONLY: True})


def aread_only(engine: AsyncEngine) -> AsyncEngine:
    """Async twin of :func:`read_only`."""
    return engine.execution_options(**{READ_ONLY: True})


@contextmanager
def session_scope(engine: Engine, *, write: bool = True) -> Iterator[Session]:
    """A session in one transaction: commit on success, roll back on error.

    ``write=False`` for transactions that only read: on SQLite they take no
    write lock, so they never queue behind a writer.
    """
    factory = sessionmaker(engine if write else read_only(engine), expire_on_commit=False)
    with storage_errors(), factory.begin() as session:
        yield session


@asynccontextmanager
async def async_session_scope(
    engine: AsyncEngine, *, write: bool = True
) -> AsyncIterator[AsyncSession]:
    """Async twin of :func:`session_scope`."""
    factory = async_sessionmaker(engine if write else aread_only(engine), expire_on_commit=False)
    with storage_errors():
        async with factory.begin() as session:
            yield session
