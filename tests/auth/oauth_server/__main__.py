"""Run the test OAuth server: migrate, create a client and a user, serve on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path


def main() -> None:
    """Parse the flags, set up Django, and serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--ready", required=True, help="file to write the client and user to")
    parser.add_argument("--grace", type=int, default=0, help="refresh-token reuse grace, s")
    args = parser.parse_args()
    os.environ["IDIS_TEST_OAUTH_DB"] = args.db
    os.environ["IDIS_TEST_OAUTH_GRACE"] = str(args.grace)
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.auth.oauth_server.settings"

    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.core.servers.basehttp import WSGIServer, run
    from django.core.wsgi import get_wsgi_application
    from oauth2_provider.models import Application

    call_command("migrate", verbosity=0, interactive=False)
    password = secrets.token_urlsafe(12)
    user = get_user_model().objects.create_user("deal-owner", password=password)
    client_secret = secrets.token_urlsafe(24)
    application = Application.objects.create(
        name="idis-integrations",
        user=user,
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_PASSWORD,
        client_secret=client_secret,  # hashed on save; we keep the plaintext
    )
    ready = Path(args.ready)
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "client_id": application.client_id,
                "client_secret": client_secret,
                "username": "deal-owner",
                "password": password,
            }
        )
    )
    tmp.replace(ready)
    WSGIServer.address_family = __import__("socket").AF_INET
    run("127.0.0.1", args.port, get_wsgi_application(), ipv6=False, threading=True)


if __name__ == "__main__":
    main()
