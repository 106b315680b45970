"""OAuth commands: ``check-token``, ``refresh-tokens``, ``rotate-credentials``, ``import-token``,
``keygen`` and ``reencrypt-tokens`` (RB-09 Triage 3, Recovery 1 and 2).

Secrets never travel on the command line (they would sit in shell history and
``ps``): new client secrets and imported tokens are read from stdin.
"""

from __future__ import annotations

import json
import sys

import click

from .._audit import cli_actor
from . import main
from ._common import (
    EXIT_CHECK_FAILED,
    EXIT_UNAVAILABLE,
    fail,
    get_settings,
    handle_errors,
    json_option,
    print_json,
    print_result,
    provider_option,
    stderr,
    stdout,
)


def _echo(line: str) -> None:
    stdout.print(line, markup=False, highlight=False)


@main.command("check-token")
@provider_option()
@json_option
@handle_errors
def check_token_command(provider: str, as_json: bool) -> None:
    """Show a provider's OAuth token state in one line (RB-09 Triage 3).

    Exit status: 0 valid or expiring, 1 anything needing attention, 3 token
    store unreachable.
    """
    from ..auth._status import token_status

    status = token_status(get_settings(), provider)
    print_result(status, as_json, lambda r: _echo(str(r)))
    if status.state == "unknown":
        sys.exit(EXIT_UNAVAILABLE)
    if not status.healthy:
        sys.exit(EXIT_CHECK_FAILED)


@main.command("refresh-tokens")
@provider_option(required=False)
@click.option("--all", "all_providers", is_flag=True, help="Refresh every OAuth provider.")
@json_option
@handle_errors
def refresh_tokens_command(provider: str | None, all_providers: bool, as_json: bool) -> None:
    """Refresh OAuth tokens now and show the new expiry (RB-09 Recovery 1).

    Also clears a "refresh failing" or "reauthorization required" state when
    the refresh succeeds. Exit status: 0 every refresh succeeded; 1 one was
    refused (credentials rejected, re-authorization required); 3 the others
    failed only because the provider or the token store was unreachable (retry later).
    """
    from ..auth._tokens import refresh_tokens

    if (provider is None) == (not all_providers):
        fail("give either --provider P or --all")
    results = refresh_tokens(provider, all=all_providers, settings=get_settings())
    if as_json:
        print_json({"results": [r.as_dict() for r in results]})
    else:
        for result in results:
            _echo(str(result))
    failed = [r for r in results if not r.ok]
    if failed:
        sys.exit(EXIT_UNAVAILABLE if all(r.retryable for r in failed) else EXIT_CHECK_FAILED)


def _read_secret_from_stdin() -> str:
    if sys.stdin.isatty():
        value = click.prompt("New client secret", hide_input=True, err=True)
    else:
        value = sys.stdin.readline()
    value = str(value).strip()
    if not value:
        fail("no client secret on stdin: pipe the new secret in (one line)")
    return value


@main.command("rotate-credentials")
@provider_option()
@click.option(
    "--store-in-vault/--store-in-database",
    default=True,
    show_default=True,
    help="Write the new credentials to Vault KV v2 (VAULT_ADDR, VAULT_TOKEN or AppRole), "
    "or keep them encrypted in the database.",
)
@click.option(
    "--from-stdin",
    is_flag=True,
    help="Read the new client secret from stdin even if the provider has a rotation API.",
)
@click.option("--client-id", default=None, help="New client id to go with a secret from stdin.")
@json_option
@handle_errors
def rotate_credentials_command(
    provider: str, store_in_vault: bool, from_stdin: bool, client_id: str | None, as_json: bool
) -> None:
    """Rotate a provider's client credentials (RB-09 Recovery 2).

    New credentials come from the provider's rotation API when it has one
    (ROTATION_URL), otherwise from stdin (never from an argument). They are
    verified by obtaining a token, written to Vault as a new KV version (the
    previous one stays for rollback), and only then switched to. A failure at
    any step leaves the current credentials in use.

    Exit status: 0 rotated; 1 the rotation failed and retrying will not help
    until someone acts (credentials refused, Vault policy denial, a conflicting
    writer; the credentials in use are unchanged); 2 bad input or configuration;
    3 Vault, the provider or the database unreachable (retry later).
    """
    from ..auth._rotation import CredentialRotationError, rotate_credentials

    settings = get_settings()
    p = settings.provider(provider)
    from_api = p.auth.rotation_url and not from_stdin and client_id is None
    new_secret = None if from_api else _read_secret_from_stdin()
    try:
        result = rotate_credentials(
            provider,
            store_in_vault=store_in_vault,
            new_secret=new_secret,
            new_client_id=client_id,
            settings=settings,
            actor=cli_actor(),
        )
    except CredentialRotationError as exc:
        # 3 when a dependency was down (retry later), 1 when the rotation itself failed.
        fail(
            f"{type(exc).__name__}: {exc}",
            EXIT_UNAVAILABLE if exc.retry_later else EXIT_CHECK_FAILED,
        )
    print_result(result, as_json, lambda r: _echo(str(r)))


@main.command("import-token")
@provider_option()
@json_option
@handle_errors
def import_token_command(provider: str, as_json: bool) -> None:
    """Store a token obtained by an authorization-code flow (read as JSON from stdin).

    The JSON is the token endpoint's response: access_token and/or
    refresh_token, expires_in (or expires_at), scope. Needs IDIS_ENCRYPTION_KEYS.
    An access token that has already expired is stored only through its
    refresh_token (refreshed at first use); without one it is refused (exit 2).
    """
    from ..auth._status import utc_seconds
    from ..auth._tokens import import_token

    raw = sys.stdin.read()
    try:
        document = json.loads(raw)
    except ValueError as exc:
        fail(f"stdin is not JSON (line {getattr(exc, 'lineno', '?')}): expected a token object")
    status = import_token(provider, document, settings=get_settings(), actor=cli_actor())
    print_result(status, as_json, lambda s: _echo(f"imported; {s}"))
    if status.state == "expired":
        # No usable access token is stored: say why and what happens next.
        given = isinstance(document, dict) and bool(document.get("access_token"))
        what = (
            f"the access token given expired at {utc_seconds(status.expires_at)}, so only "
            "its refresh token was stored"
            if given
            else "only a refresh token was given"
        )
        stderr.print(
            f"note: {provider}: {what}; it is refreshed at first use "
            f"(or now: idis-integrations refresh-tokens --provider {provider})",
            markup=False,
        )


@main.command("keygen")
def keygen_command() -> None:
    """Print a new Fernet key for IDIS_ENCRYPTION_KEYS (put it first; keep old keys after it)."""
    from ..auth._crypto import generate_key

    click.echo(generate_key())


@main.command("reencrypt-tokens")
@handle_errors
def reencrypt_tokens_command() -> None:
    """Re-encrypt stored tokens and secrets with the first key in IDIS_ENCRYPTION_KEYS."""
    from ..auth._tokens import reencrypt_tokens

    count = reencrypt_tokens(settings=get_settings())
    _echo(f"re-encrypted {count} token row(s) with the newest key; older keys may now be removed")
