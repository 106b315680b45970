"""Django settings of the test OAuth server (read from the environment the runner sets)."""

from __future__ import annotations

import os
import secrets

DEBUG = False
SECRET_KEY = secrets.token_urlsafe(32)
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "tests.auth.oauth_server.urls"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "oauth2_provider",
]
MIDDLEWARE: list[str] = []
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["IDIS_TEST_OAUTH_DB"],
        # Threaded server: wait for SQLite's write lock rather than fail.
        "OPTIONS": {"timeout": 30},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Fast hashing: the test user's password and the client secret are throwaway values.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
OAUTH2_PROVIDER = {
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": int(os.environ.get("IDIS_TEST_OAUTH_GRACE", "0")),
    "ACCESS_TOKEN_EXPIRE_SECONDS": 3600,
    "SCOPES": {"read": "read", "write": "write"},
    "PKCE_REQUIRED": False,
    # The tests bootstrap each token family with the password grant (no browser);
    # explicit, so a future default change keeps it working.
    "COMPLIANT_BCP_RFC9700_PASSWORD_GRANT": False,
}
LOGGING_CONFIG = None
