"""Settings come from the environment alone, and a bad value is named and rejected."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import unavailable

from idis.integrations.config import (
    _PROVIDER_FIELDS,
    _SECTIONS,
    EMBEDDED_WEBHOOK_SECRET,
    Secret,
    Settings,
    _declared,
    reference_tables,
)
from idis.integrations.exceptions import ConfigError, UnknownProviderError

BASE = {
    "IDIS_PROVIDERS": "crm,enrich",
    "IDIS_PROVIDER_CRM_KIND": "crm",
    "IDIS_PROVIDER_CRM_BASE_URL": "https://crm.example.com/api/",
    "IDIS_PROVIDER_ENRICH_KIND": "enrichment",
    "IDIS_PROVIDER_ENRICH_BASE_URL": "https://enrich.example.com",
}


def test_embedded_defaults_when_nothing_is_declared() -> None:
    """With no provider declared, the three simulator-backed providers are used."""
    settings = Settings.from_env({})

    assert settings.embedded_defaults
    assert ["crm_provider", "docs_provider", "enrichment_provider"] == sorted(settings.providers)
    assert "http://127.0.0.1:8765/p/crm_provider" == settings.provider("crm_provider").base_url


def test_rb09_switches_and_their_defaults() -> None:
    """CRM_MODE, CRM_POLL_INTERVAL and ENRICHMENT_DEFER_ON_ERROR parse; unset restores defaults."""
    pinned = Settings.from_env(
        {"CRM_MODE": "polling", "CRM_POLL_INTERVAL": "5m", "ENRICHMENT_DEFER_ON_ERROR": "true"}
    )
    default = Settings.from_env({})

    assert ("polling", timedelta(minutes=5), True) == (
        pinned.sync.crm_mode,
        pinned.sync.crm_poll_interval,
        pinned.enrichment.defer_on_error,
    )
    assert ("webhook", timedelta(minutes=5), False) == (
        default.sync.crm_mode,
        default.sync.crm_poll_interval,
        default.enrichment.defer_on_error,
    )


def test_providers_from_environment() -> None:
    """Per-provider variables fill the provider's policies."""
    env = {
        **BASE,
        "IDIS_PROVIDER_CRM_ENDPOINTS": "records=/records,record=/records/{id}",
        "IDIS_PROVIDER_CRM_TIMEOUT": "2s",
        "IDIS_PROVIDER_CRM_DEADLINE": "1m",
        "IDIS_PROVIDER_CRM_RETRY_MAX_ATTEMPTS": "4",
        "IDIS_PROVIDER_CRM_BREAKER_FAILURE_RATE": "0.4",
        "IDIS_PROVIDER_CRM_BREAKER_PER_ENDPOINT": "yes",
        "IDIS_PROVIDER_CRM_RATE_LIMIT": "600/m",
        "IDIS_PROVIDER_CRM_CLIENT_SECRET": "s3cr3t-value",
        "IDIS_PROVIDER_CRM_REPLAY_RETENTION": "3d",
        "IDIS_PROVIDER_ENRICH_FALLBACKS": "crm",
    }
    crm = Settings.from_env(env).provider("crm")

    assert "https://crm.example.com/api" == crm.base_url
    assert {"records": "/records", "record": "/records/{id}"} == dict(crm.endpoints)
    assert (2.0, 60.0) == (crm.timeouts.read, crm.timeouts.deadline)
    assert 4 == crm.retry.max_attempts
    assert (0.4, True) == (crm.breaker.failure_rate, crm.breaker.per_endpoint)
    assert 10.0 == crm.rate_limit.rate
    assert Secret("s3cr3t-value") == crm.auth.client_secret
    assert timedelta(days=3) == crm.replay_retention


def test_providers_from_toml_file(tmp_path: Path) -> None:
    """A TOML file named by IDIS_CONFIG_FILE declares providers; env vars override it."""
    path = tmp_path / "idis.toml"
    path.write_text(
        """
[idis]
database_url = "sqlite:///from-file.db"

[providers.crm]
kind = "crm"
base_url = "https://crm.example.com"
endpoints = { records = "/records" }

[providers.crm.breaker]
failure_threshold = 3

[sync]
crm_poll_interval = "30s"
"""
    )
    settings = Settings.from_env(
        {"IDIS_CONFIG_FILE": str(path), "IDIS_PROVIDER_CRM_BREAKER_FAILURE_THRESHOLD": "7"}
    )

    assert "sqlite:///from-file.db" == settings.database_url
    assert 7 == settings.provider("crm").breaker.failure_threshold
    assert timedelta(seconds=30) == settings.sync.crm_poll_interval


@pytest.mark.parametrize(
    ("env", "variable", "value"),
    [
        ({"CRM_MODE": "pull"}, "CRM_MODE", "pull"),
        ({"CRM_POLL_INTERVAL": "5 parsecs"}, "CRM_POLL_INTERVAL", "5 parsecs"),
        ({"CRM_POLL_INTERVAL": "0s"}, "CRM_POLL_INTERVAL", "0s"),
        ({"ENRICHMENT_DEFER_ON_ERROR": "maybe"}, "ENRICHMENT_DEFER_ON_ERROR", "maybe"),
        (
            {**BASE, "IDIS_PROVIDER_CRM_BASE_URL": "ftp://x"},
            "IDIS_PROVIDER_CRM_BASE_URL",
            "ftp://x",
        ),
        (
            {**BASE, "IDIS_PROVIDER_CRM_BASE_URL": "not a url"},
            "IDIS_PROVIDER_CRM_BASE_URL",
            "not a url",
        ),
        (
            {**BASE, "IDIS_PROVIDER_CRM_MAX_CONCURRENCY": "-1"},
            "IDIS_PROVIDER_CRM_MAX_CONCURRENCY",
            "-1",
        ),
        ({**BASE, "IDIS_PROVIDER_CRM_TIMEOUT": "-5s"}, "IDIS_PROVIDER_CRM_TIMEOUT", "-5s"),
        ({**BASE, "IDIS_PROVIDER_CRM_KIND": "erp"}, "IDIS_PROVIDER_CRM_KIND", "erp"),
        (
            {**BASE, "IDIS_PROVIDER_CRM_BREAKER_FAILURE_RATE": "1.5"},
            "IDIS_PROVIDER_CRM_BREAKER_FAILURE_RATE",
            "1.5",
        ),
        (
            {**BASE, "IDIS_PROVIDER_CRM_RATE_LIMIT": "10/fortnight"},
            "IDIS_PROVIDER_CRM_RATE_LIMIT",
            "10/fortnight",
        ),
        ({**BASE, "IDIS_PROVIDER_CRM_TIMEOUTT": "1s"}, "IDIS_PROVIDER_CRM_TIMEOUTT", "TIMEOUTT"),
        ({**BASE, "IDIS_PROVIDER_ERP_KIND": "crm"}, "IDIS_PROVIDER_ERP_KIND", "ERP"),
        ({"IDIS_DATABASE_URL": "mysql://db/x"}, "IDIS_DATABASE_URL", "mysql://db/x"),
        ({"IDIS_REDIS_URL": "http://x"}, "IDIS_REDIS_URL", "http://x"),
        ({"IDIS_LOG_FORMAT": "xml"}, "IDIS_LOG_FORMAT", "xml"),
        ({"IDIS_OUTBOX_MAX_RETRIES": "ten"}, "IDIS_OUTBOX_MAX_RETRIES", "ten"),
        # A lease that lapses at once would let every worker send the same message.
        ({"IDIS_OUTBOX_LEASE": "0s"}, "IDIS_OUTBOX_LEASE", "0s"),
        # An idle worker would poll the database in a busy loop.
        ({"IDIS_OUTBOX_POLL_INTERVAL": "0s"}, "IDIS_OUTBOX_POLL_INTERVAL", "0s"),
        # Every delivery's timestamp would be outside a zero window: webhooks silently refused.
        ({"IDIS_WEBHOOK_TOLERANCE": "0s"}, "IDIS_WEBHOOK_TOLERANCE", "0s"),
        ({"IDIS_PROVIDERS": "Bad-Name"}, "IDIS_PROVIDERS", "Bad-Name"),
        ({"IDIS_CONFIG_FILE": "/nonexistent/idis.toml"}, "IDIS_CONFIG_FILE", "/nonexistent"),
    ],
)
def test_bad_values_name_the_variable_and_the_value(
    env: dict[str, str], variable: str, value: str
) -> None:
    """Each bad value fails at start with an error naming the variable and the value."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)

    assert variable in str(info.value)
    assert value in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        # LIMIT 99999999999999999999 is a DataError on PostgreSQL: the outbox worker logged
        # "outbox database unreachable; will retry" every few seconds, for ever.
        ("IDIS_OUTBOX_BATCH_SIZE", "99999999999999999999", "at most 2147483647"),
        ("IDIS_SYNC_PAGE_SIZE", "99999999999999999999", "at most 2147483647"),
        ("IDIS_PROVIDER_CRM_RETRY_MAX_ATTEMPTS", "2147483648", "at most 2147483647"),
        # nan passes every "at least" comparison (all are False for nan).
        ("IDIS_PROVIDER_CRM_RETRY_MULTIPLIER", "nan", "finite"),
        ("IDIS_PROVIDER_CRM_RETRY_MULTIPLIER", "inf", "finite"),
        ("IDIS_PROVIDER_CRM_RATE_LIMIT", "nan/s", "finite"),
        ("IDIS_PROVIDER_CRM_RATE_LIMIT", "1e400/s", "finite"),
    ],
)
def test_numbers_beyond_any_use_fail_at_start(variable: str, value: str, why: str) -> None:
    """Huge integers and nan/inf are bad values named at start, not failures at run time."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, variable: value})

    assert f"{variable}={value!r}" in str(info.value)
    assert why in str(info.value)


def test_a_field_for_an_embedded_provider_says_the_defaults_are_not_tunable() -> None:
    """With no provider declared, crm_provider exists (the embedded defaults), so "declared
    are none" read as a contradiction; the error says what to declare instead."""
    env = {"IDIS_PROVIDER_CRM_PROVIDER_TIMEOUT": "2s"}

    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)

    message = str(info.value)
    assert message.startswith("IDIS_PROVIDER_CRM_PROVIDER_TIMEOUT ")
    assert "embedded default providers" in message
    assert "IDIS_PROVIDERS=crm_provider" in message
    assert "IDIS_PROVIDER_CRM_PROVIDER_KIND" in message
    assert "IDIS_PROVIDER_CRM_PROVIDER_BASE_URL" in message


def test_missing_required_field_names_the_variable() -> None:
    """A declared provider without a base URL says which variable to set."""
    env = {"IDIS_PROVIDERS": "crm", "IDIS_PROVIDER_CRM_KIND": "crm"}

    with pytest.raises(ConfigError, match="IDIS_PROVIDER_CRM_BASE_URL"):
        Settings.from_env(env)


def test_unknown_provider_lists_the_known_ones() -> None:
    """Asking for an undeclared provider names it and lists the declared ones."""
    settings = Settings.from_env(BASE)

    with pytest.raises(UnknownProviderError) as info:
        settings.provider("crm_provider")

    assert "'crm_provider'" in str(info.value)
    assert "crm, enrich" in str(info.value)


def test_unknown_fallback_provider_is_rejected() -> None:
    """A fallback naming an undeclared provider fails at start."""
    with pytest.raises(UnknownProviderError, match="'nope'"):
        Settings.from_env({**BASE, "IDIS_PROVIDER_CRM_FALLBACKS": "nope"})


def test_bad_encryption_key_is_named_without_echoing_it() -> None:
    """An invalid Fernet key is reported by position; the key itself never appears."""
    key = "definitely-not-a-fernet-key-but-secret"

    with pytest.raises(ConfigError) as info:
        Settings.from_env({"IDIS_ENCRYPTION_KEYS": key})

    assert "IDIS_ENCRYPTION_KEYS" in str(info.value)
    assert key not in str(info.value)


def test_secret_never_renders() -> None:
    """A Secret's repr, str and the settings' repr never show its value."""
    settings = Settings.from_env({**BASE, "IDIS_PROVIDER_CRM_CLIENT_SECRET": "topsecret-123"})

    assert "topsecret-123" not in repr(settings)
    assert "topsecret-123" not in str(settings.provider("crm").auth.client_secret)
    assert "topsecret-123" == settings.provider("crm").auth.client_secret.get_secret_value()  # type: ignore[union-attr]


# --------------------------------------------------------------------------- declarations and docs


def test_configuration_doc_lists_every_variable_with_its_default() -> None:
    """docs/configuration.md holds the tables generated from the field declarations."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()

    for name, table in reference_tables().items():
        block = f"<!-- generated:{name} -->\n{table}\n<!-- /generated:{name} -->"
        assert block in doc, f"run python scripts/config_reference.py ({name} is out of date)"


def test_every_declared_variable_is_read_from_the_environment() -> None:
    """Each declared variable, set alone, changes its field (names and parsers stay wired)."""
    samples = {
        "IDIS_DATABASE_URL": ("database_url", "sqlite:///x.db"),
        "IDIS_REDIS_URL": ("redis_url", "redis://127.0.0.1:6379/1"),
        "IDIS_ALLOW_EMBEDDED_DEFAULTS": ("allow_embedded_defaults", "true"),
        "IDIS_LOG_FORMAT": ("log_format", "console"),
        "IDIS_LOG_LEVEL": ("log_level", "debug"),
        "IDIS_SIMULATOR_URL": ("simulator_url", "http://127.0.0.1:9"),
        "IDIS_WEBHOOK_BODY_TIMEOUT": ("webhooks.body_timeout", "3s"),
        "IDIS_WEBHOOK_BATCH_LINGER": ("webhooks.batch_linger", "0"),
        "IDIS_WEBHOOK_TOLERANCE": ("webhooks.tolerance", "1m"),
        "CRM_MODE": ("sync.crm_mode", "polling"),
        "IDIS_VAULT_MOUNT": ("vault.mount", "/kv/"),
    }
    default = Settings.from_env({})
    for env, (path, value) in samples.items():
        changed = Settings.from_env({env: value})
        head, _, tail = path.partition(".")
        before = getattr(getattr(default, head), tail) if tail else getattr(default, head)
        after = getattr(getattr(changed, head), tail) if tail else getattr(changed, head)

        assert before != after, env
    assert timedelta(seconds=10) == default.webhooks.body_timeout
    assert False is default.allow_embedded_defaults


@pytest.mark.parametrize("value", ["1500ms", "2s"])
def test_a_batch_linger_over_1s_is_refused(value: str) -> None:
    """The receiver's linger adds latency under load: a long one fails at start."""
    with pytest.raises(ConfigError, match="IDIS_WEBHOOK_BATCH_LINGER") as info:
        Settings.from_env({"IDIS_WEBHOOK_BATCH_LINGER": value})

    assert "between 0 and 1s" in str(info.value)
    assert timedelta(milliseconds=2) == Settings.from_env({}).webhooks.batch_linger


def test_unknown_key_in_the_idis_table_is_refused(tmp_path: Path) -> None:
    """A misspelt key in [idis] fails at start instead of being ignored."""
    path = tmp_path / "idis.toml"
    path.write_text('[idis]\ndatabse_url = "sqlite:///x.db"\n')
    path.chmod(0o600)

    with pytest.raises(ConfigError, match=r"idis\.databse_url"):
        Settings.from_env({"IDIS_CONFIG_FILE": str(path)})


# ------------------------------------------------------------------ the config file's owner


@pytest.mark.parametrize(
    ("mode", "shown"),
    [(0o664, "group-writable"), (0o646, "world-writable"), (0o666, "group- and world-writable")],
)
def test_a_config_file_others_can_write_is_refused(tmp_path: Path, mode: int, shown: str) -> None:
    """A group- or world-writable config file (it may hold a Vault token) is refused."""
    path = tmp_path / "idis.toml"
    path.write_text('[vault]\ntoken = "hvs.config-file-token-0123456789"\n')
    path.chmod(mode)

    with pytest.raises(ConfigError) as info:
        Settings.from_env({"IDIS_CONFIG_FILE": str(path)})

    assert str(path) in str(info.value)
    assert f"{shown} (mode {mode:04o})" in str(info.value)
    assert "config-file-token" not in str(info.value)


def test_a_config_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """A config file owned by someone other than this user (or root) is refused."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        # CI runs as root (it installs Debian packages), so this fails there, never skips.
        unavailable("root, to chown a file to another user")
    path = tmp_path / "idis.toml"
    path.write_text('[vault]\ntoken = "hvs.config-file-token-0123456789"\n')
    path.chmod(0o600)
    os.chown(path, 65534, 65534)

    with pytest.raises(ConfigError) as info:
        Settings.from_env({"IDIS_CONFIG_FILE": str(path)})

    assert str(path) in str(info.value)
    assert "owned by another user (uid 65534, mode 0600)" in str(info.value)


def test_a_private_config_file_loads(tmp_path: Path) -> None:
    """A file only its owner can write loads (0600 and 0644 alike)."""
    path = tmp_path / "idis.toml"
    path.write_text('[vault]\ntoken = "hvs.config-file-token-0123456789"\n')
    for mode in (0o600, 0o644):
        path.chmod(mode)

        token = Settings.from_env({"IDIS_CONFIG_FILE": str(path)}).vault.token

        assert token is not None
        assert "hvs.config-file-token-0123456789" == token.get_secret_value()


# --------------------------------------------------------------------------- no password in output


def test_repr_and_errors_never_show_database_or_redis_passwords(tmp_path: Path) -> None:
    """repr(Settings) and configuration errors mask the passwords of every URL."""
    settings = Settings.from_env(
        {
            **BASE,
            "IDIS_DATABASE_URL": "postgresql://svc:db-pass-123456@db.example.com/idis",
            "IDIS_REDIS_URL": "redis://:redis-pass-123456@cache:6379/0",
            "IDIS_PROVIDER_CRM_BASE_URL": "https://api-user:api-pass-123456@crm.example.com",
            "VAULT_ADDR": "https://vault-user:vault-pass-123456@vault.example.com",
        }
    )
    errors = []
    for env in (
        {"IDIS_DATABASE_URL": "mysql://svc:db-pass-123456@db/x"},
        {"IDIS_REDIS_URL": "http://:redis-pass-123456@cache"},
        {**BASE, "IDIS_PROVIDER_CRM_BASE_URL": "ftp://u:api-pass-123456@x"},
    ):
        with pytest.raises(ConfigError) as info:
            Settings.from_env(env)
        errors.append(str(info.value))

    shown = repr(settings) + "\n".join(errors)
    for password in ("db-pass-123456", "redis-pass-123456", "api-pass-123456", "vault-pass-123456"):
        assert password not in shown
    assert "postgresql://svc:***@db.example.com/idis" in repr(settings)
    assert "mysql://svc:***@db/x" in errors[0]
    # The settings themselves keep the real URLs: only their rendering is masked.
    assert "db-pass-123456" in settings.database_url


@pytest.mark.parametrize(
    ("env", "shown", "why"),
    [
        # The ':' after the scheme forgotten: no "://", so no URL pattern masked the password.
        (
            {"IDIS_DATABASE_URL": "postgresql//svc:db-pass-123456@db/idis"},
            "postgresql//svc:***@db/idis",
            "is not supported",
        ),
        (
            {"IDIS_REDIS_URL": "redis//:redis-pass-123456@cache:6379/0"},
            "redis//:***@cache:6379/0",
            "is not a Redis URL",
        ),
        # An '@' typed into the password unescaped: the rest of it became the host.
        (
            {"IDIS_DATABASE_URL": "postgresql://svc:db@pass-123456@db:5432/idis"},
            "postgresql://svc:***@db:5432/idis",
            "percent-encode it as %40",
        ),
        (
            {"IDIS_DATABASE_URL": "mysql://svc:db@pass-123456@db/x"},
            "mysql://svc:***@db/x",
            "is not supported",
        ),
        # A port that is not a number: SQLAlchemy's ValueError escaped as a traceback.
        (
            {"IDIS_DATABASE_URL": "postgresql://svc:db-pass-123456@db:port/idis"},
            "postgresql://svc:***@db:port/idis",
            "is not a database URL",
        ),
        # Two slashes: SQLite reads "relative.db" as a host, and failed at the first query.
        ({"IDIS_DATABASE_URL": "sqlite://relative.db"}, "sqlite://relative.db", "sqlite:///"),
        # A mistyped libpq option, a timeout that is no number: a psycopg ProgrammingError
        # traceback at the first connection.
        (
            {"IDIS_DATABASE_URL": "postgresql://svc:db-pass-123456@db/idis?sslmod=require"},
            "postgresql://svc:***@db/idis?sslmod=require",
            'invalid connection option "sslmod"',
        ),
        (
            {"IDIS_DATABASE_URL": "postgresql://svc:db-pass-123456@db/idis?connect_timeout=abc"},
            "postgresql://svc:***@db/idis?connect_timeout=abc",
            "connect_timeout",
        ),
    ],
)
def test_malformed_urls_fail_at_start_naming_the_variable_without_the_password(
    env: dict[str, str], shown: str, why: str
) -> None:
    """A mistyped database or Redis URL: a ConfigError naming it, its password masked."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)

    message = str(info.value)
    assert next(iter(env)) in message
    assert shown in message
    assert why in message
    assert "pass-123456" not in message


@pytest.mark.parametrize(
    "url", ["postgresql://svc:db-pass-123456@db:port/idis", "://svc:db-pass-123456@db/idis"]
)
def test_an_engine_on_a_malformed_url_is_a_config_error_without_the_password(url: str) -> None:
    """create_db_engine, called by a host with its own URL: a ConfigError, password masked."""
    from idis.integrations.db import create_db_engine

    with pytest.raises(ConfigError) as info:
        create_db_engine(url)

    assert "IDIS_DATABASE_URL=" in str(info.value)
    assert "svc:***@db" in str(info.value)
    assert "db-pass-123456" not in str(info.value)


# ------------------------------------------------------------------ embedded defaults opt-in


def test_the_published_webhook_secret_needs_the_opt_in() -> None:
    """The embedded secret is refused for verifying and signing unless explicitly allowed."""
    settings = Settings.from_env({})
    allowed = Settings.from_env({"IDIS_ALLOW_EMBEDDED_DEFAULTS": "true"})
    declared = Settings.from_env(
        {
            "IDIS_PROVIDERS": "crm",
            "IDIS_PROVIDER_CRM_KIND": "crm",
            "IDIS_PROVIDER_CRM_BASE_URL": "https://crm.example.com",
            "IDIS_PROVIDER_CRM_WEBHOOK_SECRETS": EMBEDDED_WEBHOOK_SECRET,
        }
    )

    for use in ("verify", "sign"):
        with pytest.raises(ConfigError) as info:
            settings.checked_webhook_secrets("crm_provider", use=use)  # type: ignore[arg-type]
        message = str(info.value)
        assert "IDIS_PROVIDER_CRM_PROVIDER_WEBHOOK_SECRETS" in message
        assert "IDIS_PROVIDERS" in message
        assert "IDIS_ALLOW_EMBEDDED_DEFAULTS=true" in message
        assert EMBEDDED_WEBHOOK_SECRET not in message
    with pytest.raises(ConfigError, match="IDIS_PROVIDER_CRM_WEBHOOK_SECRETS"):
        declared.checked_webhook_secrets("crm", use="verify")
    assert 1 == len(allowed.checked_webhook_secrets("crm_provider", use="verify"))


def _declared_variables() -> list[str]:
    names = [var.env for _, var in _declared(Settings)]
    for cls in _SECTIONS.values():
        names += [var.env for _, var in _declared(cls)]
    return names


_PROVIDER_SUFFIXES = sorted(_PROVIDER_FIELDS)


@settings(max_examples=400, deadline=None)
@given(
    name=st.sampled_from(
        _declared_variables() + [f"IDIS_PROVIDER_CRM_{s}" for s in _PROVIDER_SUFFIXES]
    ),
    value=st.one_of(
        st.text(max_size=40),
        st.integers().map(str),
        st.from_regex(r"\d{1,400}(ms|s|m|h|d|w)?", fullmatch=True),
    ),
)
def test_any_value_of_any_variable_loads_or_is_a_config_error(name: str, value: str) -> None:
    """Whatever text a variable holds, from_env returns Settings or raises ConfigError."""
    env = {**BASE, name: value}
    try:
        Settings.from_env(env)
    except ConfigError as exc:
        variable = exc.variable
    else:
        variable = name
    assert variable is not None
