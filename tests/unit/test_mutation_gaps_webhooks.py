"""Cases `make mutate` found missing for Standard Webhooks signatures (docs/testing.md).

Each test kills a mutant of ``webhooks/_signing.py`` that survived every listed test.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from idis.integrations.config import Secret
from idis.integrations.webhooks._signing import sign_headers
from idis.integrations.webhooks._verify import (
    InboundRequest,
    StandardWebhooksScheme,
    normalize_headers,
)

NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BODY = b'{"a":1}'


@pytest.mark.parametrize(
    "before",
    ["v1a,c2lnbmVkIHdpdGggZWQyNTUxOQ==", "v2,whatever", "v1,not*base64"],
    ids=["asymmetric_v1a", "unknown_version", "malformed_v1"],
)
def test_a_valid_v1_signature_counts_after_entries_the_verifier_cannot_use(before: str) -> None:
    """The header is a space-separated list: entries we cannot check are skipped, not fatal.

    Kills ``continue`` → ``break`` for the other-version and the undecodable entry.
    """
    headers = sign_headers(SECRET, BODY, msg_id="msg_x", timestamp=NOW)
    headers["webhook-signature"] = f"{before} {headers['webhook-signature']}"
    request = InboundRequest(
        method="POST", uri="/crm", headers=normalize_headers(headers), body=BODY
    )

    assert "msg_x" == StandardWebhooksScheme([Secret(SECRET)]).verify(request, NOW)
