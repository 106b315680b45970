"""A tiny Django project serving django-oauth-toolkit: a real OAuth server for the auth tests.

Refresh tokens rotate (``ROTATE_REFRESH_TOKEN``) and a rotated-out refresh
token that comes back revokes its whole token family
(``REFRESH_TOKEN_REUSE_PROTECTION``), the behaviour issue 11 item 5 was
reproduced against. ``python -m tests.auth.oauth_server --port N --db PATH
--ready FILE [--grace S]`` migrates a fresh SQLite database, creates one
confidential client and one user, writes them as JSON to ``FILE`` and serves
on 127.0.0.1 until killed. The test fixture in ``tests/auth/conftest.py``
starts it; nothing in the library imports it.
"""
