"""The actor a person's command writes in audit rows: ``cli:<login>``, or ``cli:unknown``."""

from __future__ import annotations

import getpass

import pytest

from idis.integrations._audit import cli_actor


def test_the_actor_is_the_login_name(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOGNAME", "oncall-bob")

    assert "cli:oncall-bob" == cli_actor()


@pytest.mark.parametrize("error", [KeyError("uid 4242"), OSError("no passwd entry")])
def test_without_a_login_name_the_actor_is_cli_unknown(
    monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    """Some containers run as a uid with no passwd entry: getpass raises, the command goes on."""

    def no_login() -> str:
        raise error

    monkeypatch.setattr(getpass, "getuser", no_login)

    assert "cli:unknown" == cli_actor()
