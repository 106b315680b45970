"""Every SQL statement the outbox runs, built once, executed by the sync and async drivers alike.

Statements are SQLAlchemy Core (no ORM on the hot path) with named bind
parameters, prefixed ``p_`` because SQLAlchemy reserves column names in UPDATE
statements; SQLAlchemy caches their compiled form. Status values appear as SQL
literals, never as bind parameters, so that PostgreSQL and SQLite can prove the
partial indexes' ``WHERE status = ...`` predicates from the query (a generic
plan with a parameter cannot); where SQLite needs the index predicate word for
word, the query repeats it.

**A lease changes no indexed column.** A leased message keeps ``status =
'pending'`` and gets ``lease_owner``/``lease_expires_at``: "in flight" is
*pending with an unexpired lease*. On PostgreSQL that makes the lease a HOT
update (no index entry written; the table keeps page room for it with
``fillfactor``), and on SQLite an update of the row alone. Delivery then costs
one indexed write per message (the settle), not three. It also means a lapsed
lease needs no reclaiming: the message is simply leasable again.

Leasing (:func:`lease_statement`):

* only ``pending`` messages of one provider, due (``next_attempt_at``), not
  under an unexpired lease, oldest (lowest id) first. Id order, not due-time
  order, keeps the scan at the per-key frontier: each key's blocked messages
  sort after its head, whereas by due time every never-tried blocked message
  would sort before a head that is backing off, and each lease would probe
  them all;
* per-ordering-key FIFO: a message is leased only when no *earlier* message
  with the same (provider, ordering_key) is still pending (leased or not),
  i.e. only the head of each key, one index probe per candidate
  (``ix_outbox_messages_ordering``). A dead message no longer blocks its key
  (see ``docs/outbox.md``);
* PostgreSQL: ``FOR UPDATE SKIP LOCKED`` in a materialized CTE, so concurrent
  workers never block on, nor lease, the same rows, and the LIMIT is applied
  exactly once;
* SQLite: the same ``UPDATE ... WHERE id IN (SELECT ... LIMIT n) RETURNING`` runs
  under the write lock that ``BEGIN IMMEDIATE`` (``db/engine.py``) takes first,
  so two workers' leases are serialized and cannot overlap.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    DateTime,
    Delete,
    Insert,
    Interval,
    Select,
    String,
    Table,
    Text,
    Update,
    and_,
    any_,
    bindparam,
    case,
    delete,
    func,
    literal_column,
    or_,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.sql.expression import FromClause

from ..db._base import UTCDateTime, dialect_insert
from ._models import (
    DEAD,
    DELIVERED,
    PENDING,
    RECEIVER_ACTIVE,
    RECEIVER_GONE,
    OutboxMessageRow,
    WebhookReceiverRow,
)

__all__ = [
    "LEASED_COLUMNS",
    "LEASE_EXPIRED",
    "SUSPECT",
    "UNSETTLED",
    "Prepared",
    "first_pending",
    "give_back_statement",
    "id_list",
    "insert_statement",
    "lease_statement",
    "mark_receiver_statement",
    "packed_keys",
    "renew_statement",
    "settle_delivered_statement",
    "settle_statement",
    "utc_wall",
]

# Declarative __table__ is typed as a FromClause; it is a Table.
messages = cast(Table, OutboxMessageRow.__table__)
receivers = cast(Table, WebhookReceiverRow.__table__)

_PENDING: ColumnClause[Any] = literal_column(f"'{PENDING}'")
_DELIVERED: ColumnClause[Any] = literal_column(f"'{DELIVERED}'")
_DEAD: ColumnClause[Any] = literal_column(f"'{DEAD}'")
#: The predicate of ``ix_outbox_messages_unsettled``: status IN (pending, dead).
UNSETTLED = [_PENDING, _DEAD]
#: ``last_error`` a lease writes when it takes over a lapsed lease (a worker died).
LEASE_EXPIRED = "lease expired: the worker holding it stopped without settling it"
#: ``last_error`` of a message given back untried because it was leased with
#: others while a worker that held it had died (:data:`LEASE_EXPIRED`): it stays
#: a suspect, leased alone, until it settles (``give_back_statement``).
SUSPECT = "suspect: a worker holding it stopped mid-batch; it is sent alone until it settles"


def _ts(name: str) -> Any:
    return bindparam(name, type_=UTCDateTime())


#: Columns a lease returns: everything a delivery strategy needs, in the order
#: ``_WorkerCore.to_message`` unpacks them (the lease's expiry is not returned:
#: the worker wrote it, ``:p_expires``).
LEASED_COLUMNS = (
    messages.c.id,
    messages.c.provider,
    messages.c.kind,
    messages.c.idempotency_key,
    messages.c.payload,
    messages.c.ordering_key,
    messages.c.tenant_id,
    messages.c.attempts,
    messages.c.max_retries,
    messages.c.created_at,
    messages.c.lease_generation,
    messages.c.last_error,
)


def _leased_columns(dialect: str) -> tuple[Any, ...]:
    """:data:`LEASED_COLUMNS`, with no result processing by SQLAlchemy.

    The worker converts each leased row itself, in one pass
    (``_WorkerCore.to_messages``): ``payload`` comes back as JSON text on
    both databases, ``created_at`` as fixed-width UTC text on SQLite and as a
    naive UTC datetime on PostgreSQL (:func:`utc_wall`). SQLAlchemy's
    processors would cost two Python calls per value, and the SQLite
    ``DATETIME`` type a regular expression. PostgreSQL's ``jsonb`` as text
    (``payload::text``, the same text the server would send for the
    ``jsonb``) is decoded by psycopg in C; as ``jsonb`` psycopg calls its
    Python JSON loader per value, through two wrappers: 3.5-4.5 against
    1.5-2.1 µs a row, decoding included.
    """
    if dialect == "sqlite":
        raw: dict[str, Any] = {"payload": Text(), "created_at": String()}
        return tuple(
            type_coerce(column, raw[column.name]).label(column.name)
            if column.name in raw
            else column
            for column in LEASED_COLUMNS
        )
    postgres: dict[str, Any] = {
        "payload": type_coerce(sql_cast(messages.c.payload, Text()), Text()),
        "created_at": utc_wall(messages.c.created_at),
    }
    return tuple(
        postgres[column.name].label(column.name) if column.name in postgres else column
        for column in LEASED_COLUMNS
    )


def utc_wall(moment: Any) -> Any:
    """PostgreSQL: ``timezone('UTC', moment)``, the UTC wall time of a ``timestamptz``,
    read back as a naive datetime (the worker attaches UTC).

    The same instant as the aware value, whatever the session's ``TimeZone``;
    but psycopg decodes a naive timestamp in C, where an aware one in a zone
    other than plain ``UTC`` (a server's default is often ``Etc/UTC``) goes
    through ``zoneinfo`` in Python: about 0.4 µs a value, twice per leased row
    (``created_at`` and the statement's time), and the worker then converted
    each to UTC once more.
    """
    return type_coerce(func.timezone(literal_column("'UTC'"), moment), DateTime(timezone=False))


def not_leased(table: Any, now: Any = None) -> Any:
    """No unexpired lease on the row at ``now`` (default ``:p_now``)."""
    at = _ts("p_now") if now is None else now
    return or_(table.c.lease_expires_at.is_(None), table.c.lease_expires_at <= at)


@functools.cache
def insert_statement(dialect: str, *, returning: bool = False) -> Insert:
    """``INSERT ... ON CONFLICT (idempotency_key) DO NOTHING``: enqueueing a key twice is a no-op.

    With ``returning``, the ids of rows actually inserted come back, in the same
    round trip: none when the key was already there.
    """
    stmt = dialect_insert(messages, dialect).on_conflict_do_nothing(
        index_elements=["idempotency_key"]
    )
    return stmt.returning(messages.c.id) if returning else stmt


def first_pending(table: FromClause, provider: Any, dialect: str) -> Select[Any]:
    """The id of ``provider``'s first pending message, read from the due index.

    On PostgreSQL a row comparison that is always true (ids start at 1), but that
    only the due index ``(provider, id)`` can answer, makes the planner take that
    index whatever its statistics say. Asked as ``min(id)`` or ``ORDER BY id
    LIMIT 1``, statistics taken while a backlog was all pending made it walk the
    primary key through every message delivered since: 127 ms per lease, and per
    ``status`` call, at 50,000 delivered. SQLite takes the due index for the plain
    form and sorts for the row comparison, so it gets the plain form
    (tests/outbox/test_outbox_summary_plan.py reads both plans).
    """
    where = [table.c.provider == provider, table.c.status == _PENDING]
    if dialect == "postgresql":
        where.append(tuple_(table.c.provider, table.c.id) > tuple_(provider, literal_column("0")))
    return select(table.c.id).where(*where).order_by(table.c.provider, table.c.id).limit(1)


@functools.cache
def lease_statement(dialect: str, *, database_clock: bool = False) -> Update:
    """Lease up to ``:p_limit`` due head-of-key messages of ``:p_provider`` for ``:p_owner``.

    Parameters: ``p_provider``, ``p_now``, ``p_limit``, ``p_owner``, ``p_expires``.
    Returns :data:`LEASED_COLUMNS` of the leased rows; each lease counts one
    attempt and bumps ``lease_generation`` (the fencing token its settle must
    present). Taking over a lapsed lease stamps ``last_error`` with
    :data:`LEASE_EXPIRED` (the SET sees the old row), so the worker can tell.

    With ``database_clock`` (PostgreSQL only), the statement's own time is
    "now": ``statement_timestamp()`` replaces ``p_now``, the lease lasts
    ``:p_lease`` (an interval) instead of ending at ``p_expires``, and each
    row returns that time (naive, UTC: :func:`utc_wall`) after
    :data:`LEASED_COLUMNS`, so the worker follows
    the database's clock without a round trip of its own to read it.
    """
    if database_clock and dialect != "postgresql":
        raise ValueError("a lease on the statement's own clock is PostgreSQL's")
    now: Any = func.statement_timestamp() if database_clock else _ts("p_now")
    expires: Any = now + bindparam("p_lease", type_=Interval()) if database_clock else None
    cand = messages.alias("cand")
    earlier = messages.alias("earlier")
    blocked = (
        select(literal_column("1"))
        .where(
            earlier.c.provider == cand.c.provider,
            earlier.c.ordering_key == cand.c.ordering_key,
            earlier.c.id < cand.c.id,
            earlier.c.status == _PENDING,
        )
        .exists()
    )
    # Where this provider's pending messages start (one probe of the due
    # index). Without this floor, statistics taken while a backlog was all
    # pending make the planner walk the primary key through every message
    # delivered since, on every lease: quadratic over a drain.
    lowest = first_pending(messages.alias("lowest"), bindparam("p_provider"), dialect)
    floor = lowest.scalar_subquery()
    picked: Select[Any] = (
        select(cand.c.id)
        .where(
            cand.c.status == _PENDING,
            cand.c.provider == bindparam("p_provider"),
            cand.c.id >= floor,
            cand.c.next_attempt_at <= now,
            not_leased(cand, now),
            or_(cand.c.ordering_key.is_(None), ~blocked),
        )
        .order_by(cand.c.id)
        .limit(bindparam("p_limit"))
    )
    values = {
        "lease_owner": bindparam("p_owner"),
        "lease_expires_at": _ts("p_expires") if expires is None else expires,
        "attempts": messages.c.attempts + 1,
        "lease_generation": messages.c.lease_generation + 1,
        "last_attempt_at": now,
        "updated_at": now,
        "last_error": case(
            (messages.c.lease_owner.is_not(None), literal_column(f"'{LEASE_EXPIRED}'")),
            else_=messages.c.last_error,
        ),
    }
    if dialect == "postgresql":
        chosen = picked.with_for_update(skip_locked=True).cte("picked").prefix_with("MATERIALIZED")
        stmt = update(messages).where(messages.c.id == chosen.c.id)
    else:
        stmt = update(messages).where(messages.c.id.in_(picked))
    returned = _leased_columns(dialect)
    if database_clock:
        returned = (*returned, utc_wall(now).label("database_now"))
    return stmt.values(values).returning(*returned)


def _ids(dialect: str) -> Any:
    """``id`` in the list ``:p_ids`` (pass :func:`id_list`'s value).

    One parameter and one statement text for any batch size, so the compiled
    form is cached and nothing is rendered per id: PostgreSQL an array
    (``id = ANY(:p_ids)``), SQLite a JSON array (``id IN (SELECT value FROM
    json_each(:p_ids))``, a primary-key probe per id). An expanding ``IN``
    would render one bind parameter per id on every execution.
    """
    if dialect == "postgresql":
        return messages.c.id == any_(_bigint_array("p_ids"))
    return messages.c.id.in_(
        select(literal_column("value")).select_from(func.json_each(bindparam("p_ids")))
    )


def _bigint_array(name: str) -> Any:
    """``CAST(:name AS BIGINT[])``, the parameter an array literal (``{1,2,3}``) as text.

    psycopg adapts a Python list of ints element by element in Python; the
    literal costs one ``join``.
    """
    return sql_cast(bindparam(name, type_=Text()), postgresql.ARRAY(BigInteger))


def id_list(dialect: str, ids: Sequence[int]) -> str:
    """The value of ``:p_ids`` (or ``:p_gens``) for ``ids``: an array literal
    (PostgreSQL) or a JSON array (SQLite), as text."""
    # A list's repr, written in C: the JSON array itself, and between braces a
    # PostgreSQL array literal (which allows the spaces after its commas).
    text = repr(list(ids))
    return f"{{{text[1:-1]}}}" if dialect == "postgresql" else text


#: SQLite packs (id, lease generation) into one integer, ``id * 2**20 +
#: generation``, when every id is below 2**43 and every generation below 2**20
#: (the product stays a 64-bit integer, and distinct pairs give distinct keys).
_PACK = 2**20
_PACKED_ID_LIMIT = 2**43


def packed_keys(ids: Sequence[int], generations: Sequence[int]) -> str | None:
    """The value of ``:p_keys`` (a JSON array of packed (id, generation) keys), or
    None when a pair does not fit (the unpacked statement takes ``:p_pairs``)."""
    if max(ids, default=0) >= _PACKED_ID_LIMIT or max(generations, default=0) >= _PACK:
        return None
    if min(ids, default=0) < 0 or min(generations, default=0) < 0:
        return None
    return "[" + ",".join([str(i * _PACK + g) for i, g in zip(ids, generations, strict=True)]) + "]"


@functools.cache
def settle_delivered_statement(dialect: str, *, packed: bool = False) -> Update:
    """Mark leased messages delivered, each only under the lease generation it was sent under.

    One statement for the whole batch. PostgreSQL: parameters ``p_ids`` and
    ``p_gens`` (two arrays, pairwise, one statement text for any batch size,
    each :func:`id_list`'s text) and ``p_now``. SQLite: ``p_ids``
    (:func:`id_list`), ``p_pairs`` (the same ids with their generations, a
    JSON array of [id, generation] pairs) and ``p_now``; with ``packed``,
    ``p_keys`` (:func:`packed_keys`) instead of ``p_pairs``: one integer per
    pair, compared with the row's own, where the pairs cost two
    ``json_extract`` calls each and a row-value comparison.

    No lease-owner check: the generation is the fence. A message the provider
    accepted is delivered even if its lease lapsed meanwhile, as long as no
    other worker leased it since; once one has, the late settle is a no-op
    (the rowcount tells) and the current holder's outcome stands.
    """
    if dialect == "postgresql":
        sent = (
            func.unnest(_bigint_array("p_ids"), _bigint_array("p_gens"))
            .table_valued("id", "gen")
            .render_derived(name="sent")
        )
        fence = and_(
            messages.c.id == sent.c.id,
            messages.c.lease_generation == sent.c.gen,
        )
    elif packed:
        # The id list walks the primary key; the packed key is the fence.
        keys: Select[Any] = select(literal_column("value")).select_from(
            func.json_each(bindparam("p_keys"))
        )
        fence = and_(
            _ids(dialect),
            (messages.c.id * literal_column(str(_PACK)) + messages.c.lease_generation).in_(keys),
        )
    else:
        # The plain id list lets SQLite walk the primary key; the pairs alone
        # (a row-value IN) would scan the table. The pairs' subquery is
        # materialized once per statement.
        pair: ColumnClause[Any] = literal_column("value")
        pairs = select(
            func.json_extract(pair, literal_column("'$[0]'")),
            func.json_extract(pair, literal_column("'$[1]'")),
        )
        fence = and_(
            _ids(dialect),
            tuple_(messages.c.id, messages.c.lease_generation).in_(
                pairs.select_from(func.json_each(bindparam("p_pairs")))
            ),
        )
    return (
        update(messages)
        .where(fence, messages.c.status == _PENDING)
        .values(
            status=_DELIVERED,
            delivered_at=_ts("p_now"),
            updated_at=_ts("p_now"),
            lease_owner=None,
            lease_expires_at=None,
        )
    )


@functools.cache
def settle_statement() -> Update:
    """Settle one leased message (executemany): retry, defer, release or dead-letter.

    Parameters per row: ``p_b_id``, ``p_b_gen`` (the lease generation it was
    leased under), ``p_b_status`` (pending or dead), ``p_b_next`` (new
    ``next_attempt_at``), ``p_b_error``, ``p_b_giveback`` (1 when the attempt
    is not counted), and ``p_owner``, ``p_now``. Only the lease holder's settle
    applies: if the lease lapsed and another worker took the message (a newer
    generation), this is a no-op.
    """
    return (
        update(messages)
        .where(
            messages.c.id == bindparam("p_b_id"),
            messages.c.lease_generation == bindparam("p_b_gen"),
            messages.c.lease_owner == bindparam("p_owner"),
            messages.c.status == _PENDING,
        )
        .values(
            status=bindparam("p_b_status"),
            next_attempt_at=_ts("p_b_next"),
            # Given back pending (deferred, released) a suspect stays one: _still_suspect.
            last_error=case(
                (
                    and_(
                        bindparam("p_b_giveback") == literal_column("1"),
                        bindparam("p_b_status") == _PENDING,
                    ),
                    _still_suspect(bindparam("p_b_error")),
                ),
                else_=bindparam("p_b_error"),
            ),
            attempts=messages.c.attempts - bindparam("p_b_giveback"),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=_ts("p_now"),
        )
    )


class Prepared:
    """A statement compiled once for one dialect, to run on the driver's own cursor.

    The worker's two statements per batch (lease, delivered settle) then skip
    SQLAlchemy's per-execute work (cache key, parameter processing, execution
    context, result wrapping): about 40 µs per statement, a microsecond per
    message, the same SQL text as SQLAlchemy sends. Bind values go through the
    same type processors (``UTCDateTime``), and literal values bound by the
    statement itself (``attempts + 1``) are fixed once here.
    """

    __slots__ = ("_fixed", "_given", "_order", "sql")

    def __init__(self, stmt: Any, dialect: Any) -> None:
        compiled = stmt.compile(dialect=dialect)
        sql = compiled.string
        if "POSTCOMPILE" in sql:  # pragma: no cover  # an expanding IN has no fixed text
            raise ValueError("a prepared statement needs one SQL text for every execution")
        names = list(compiled.construct_params(dict.fromkeys(compiled.binds)))
        defaults = compiled.construct_params(
            {name: None for name in names if name.startswith("p_")}
        )
        processors = {
            name: compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in names
        }
        self.sql: str = sql
        #: Parameters the caller supplies (``p_``), with the type's processor (or None).
        self._given = tuple((name, processors[name]) for name in names if name.startswith("p_"))
        #: Values the statement binds itself (``attempts + 1``, ``lease_owner = NULL``).
        self._fixed = {
            name: (processors[name](value) if processors[name] else value)
            for name, value in defaults.items()
            if not name.startswith("p_")
        }
        #: Positional drivers (SQLite's ``?``): the parameters in order; None for named ones.
        self._order = tuple(compiled.positiontup) if compiled.positional else None

    def params(self, given: dict[str, Any]) -> Any:
        """The driver's parameters (a tuple, or a dict for a named paramstyle) for ``given``."""
        values = dict(self._fixed)
        for name, process in self._given:
            value = given[name]
            values[name] = process(value) if process is not None else value
        order = self._order
        return values if order is None else tuple([values[name] for name in order])


@functools.cache
def database_now_statement(dialect: str) -> Select[Any]:
    """The database's current time: PostgreSQL an aware timestamp, SQLite UTC text (ms)."""
    if dialect == "postgresql":
        return select(func.clock_timestamp())
    return select(func.strftime("%Y-%m-%d %H:%M:%f", "now"))


#: ``last_error`` of a message given back after a lease whose COMMIT was not acknowledged.
LEASE_UNACKNOWLEDGED = "lease given back: its COMMIT was not acknowledged, nothing was sent"


@functools.cache
def release_own_statement() -> Update:
    """Give back every pending message leased to ``:p_owner`` (parameters ``p_owner``, ``p_now``).

    Run by a worker that holds no delivery in flight, after a transaction whose
    outcome it could not see (a COMMIT that failed to acknowledge may have
    succeeded): whatever it still holds was leased and never sent. The attempt
    the lease counted is given back.
    """
    return (
        update(messages)
        .where(messages.c.status == _PENDING, messages.c.lease_owner == bindparam("p_owner"))
        .values(
            lease_owner=None,
            lease_expires_at=None,
            attempts=messages.c.attempts - 1,
            last_error=_still_suspect(literal_column(f"'{LEASE_UNACKNOWLEDGED}'")),
            updated_at=_ts("p_now"),
        )
    )


def _still_suspect(otherwise: Any) -> Any:
    """``last_error`` of a message given back without being tried: :data:`SUSPECT`
    if a worker that died held it (:data:`LEASE_EXPIRED`, or already a suspect),
    else ``otherwise``. Nothing was learnt about it, so it is still sent alone."""
    return case(
        (
            messages.c.last_error.in_(
                [literal_column(f"'{LEASE_EXPIRED}'"), literal_column(f"'{SUSPECT}'")]
            ),
            literal_column(f"'{SUSPECT}'"),
        ),
        else_=otherwise,
    )


@functools.cache
def give_back_statement(dialect: str) -> Update:
    """Give back messages this transaction just leased, untried (``p_ids``, ``p_owner``).

    Run in the lease's own transaction, before anything is sent (no other
    worker can have touched the rows since): the attempt the lease counted is
    given back, the lease cleared, and a message that came back from a worker
    that died (:data:`LEASE_EXPIRED`) is marked :data:`SUSPECT`, so that it is
    still told apart when leased again, without being counted as taken over twice.
    """
    return (
        update(messages)
        .where(
            _ids(dialect),
            messages.c.lease_owner == bindparam("p_owner"),
            messages.c.status == _PENDING,
        )
        .values(
            lease_owner=None,
            lease_expires_at=None,
            attempts=messages.c.attempts - 1,
            last_error=_still_suspect(messages.c.last_error),
        )
    )


@functools.cache
def renew_statement(dialect: str) -> Update:
    """Extend this worker's leases on ``:p_ids`` to ``:p_expires``; returns the ids still held."""
    return (
        update(messages)
        .where(
            _ids(dialect),
            messages.c.lease_owner == bindparam("p_owner"),
            messages.c.status == _PENDING,
        )
        .values(lease_expires_at=_ts("p_expires"))
        .returning(messages.c.id)
    )


def mark_receiver_statement(dialect: str) -> Insert:
    """Upsert a webhook receiver's state.

    Parameters: p_provider, p_endpoint, p_status, p_code, p_reason, p_now.
    """
    base = dialect_insert(receivers, dialect)
    stmt = base.values(
        provider=bindparam("p_provider"),
        endpoint=bindparam("p_endpoint"),
        status=bindparam("p_status"),
        status_code=bindparam("p_code"),
        reason=bindparam("p_reason"),
        changed_at=_ts("p_now"),
    )
    return stmt.on_conflict_do_update(
        index_elements=["provider", "endpoint"],
        set_={
            name: stmt.excluded[name] for name in ("status", "status_code", "reason", "changed_at")
        },
    )


def gone_receivers_statement() -> Select[Any]:
    """(provider, endpoint) of every receiver that answered 410 Gone."""
    return select(receivers.c.provider, receivers.c.endpoint).where(
        receivers.c.status == literal_column(f"'{RECEIVER_GONE}'")
    )


def reactivate_receivers_statement(provider: str) -> Update:
    """Let deliveries to ``provider``'s gone receivers resume."""
    return (
        update(receivers)
        .where(
            receivers.c.provider == provider,
            receivers.c.status == literal_column(f"'{RECEIVER_GONE}'"),
        )
        .values(status=RECEIVER_ACTIVE, reason="re-activated by queue-webhook-retries")
    )


def retryable_filter(provider: str, kinds: tuple[str, ...] | None, since: Any) -> Any:
    """Messages ``queue_webhook_retries`` re-queues: dead ones, and failed ones still waiting.

    "Failed" means pending, not in flight (no unexpired lease at ``:p_now``),
    with at least one counted attempt. A re-queued message has ``attempts =
    0``, so running the re-queue again selects nothing new.
    """
    cond = and_(
        messages.c.provider == provider,
        messages.c.status.in_(UNSETTLED),  # the partial index's predicate, verbatim
        or_(
            messages.c.status == _DEAD,
            and_(messages.c.status == _PENDING, messages.c.attempts > 0, not_leased(messages)),
        ),
    )
    if kinds:
        cond = and_(cond, messages.c.kind.in_(list(kinds)))
    if since is not None:
        cond = and_(cond, func.coalesce(messages.c.last_attempt_at, messages.c.created_at) >= since)
    return cond


def purge_statement(provider: str, before: Any) -> Delete:
    """Delete ``provider``'s messages delivered before ``before``."""
    return delete(messages).where(
        messages.c.provider == provider,
        messages.c.status == _DELIVERED,
        messages.c.delivered_at < before,
    )
