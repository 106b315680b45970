"""Tokens at rest: Fernet encryption with keys from IDIS_ENCRYPTION_KEYS, newest first."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from idis.integrations.auth._crypto import TokenCipher, generate_key
from idis.integrations.config import Secret, Settings
from idis.integrations.exceptions import AuthError, ConfigError


def test_round_trip_and_ciphertext_hides_the_value() -> None:
    """A value encrypts to ciphertext that does not contain it, and decrypts back."""
    cipher = TokenCipher((Secret(generate_key()),))

    ciphertext = cipher.encrypt("at_supersecret_value")

    assert "at_supersecret_value" not in ciphertext
    assert "at_supersecret_value" == cipher.decrypt(ciphertext)


def test_old_key_still_decrypts_and_reencrypt_moves_to_the_newest() -> None:
    """After a new key is put first, old ciphertext decrypts and re-encryption uses the new key."""
    old, new = generate_key(), generate_key()
    written_before = TokenCipher((Secret(old),)).encrypt("rt_value")
    rotated = TokenCipher((Secret(new), Secret(old)))

    moved = rotated.reencrypt(written_before)

    assert "rt_value" == rotated.decrypt(written_before)
    assert "rt_value" == Fernet(new.encode()).decrypt(moved.encode()).decode()


def test_no_key_refuses_to_store_and_names_the_variable() -> None:
    """Without keys nothing is encrypted: encrypt raises naming IDIS_ENCRYPTION_KEYS."""
    cipher = TokenCipher(())

    with pytest.raises(ConfigError) as caught:
        cipher.encrypt("secret-value")

    assert False is cipher.available
    assert None is cipher.encrypt_optional("secret-value")
    assert "IDIS_ENCRYPTION_KEYS" == caught.value.variable
    assert "keygen" in str(caught.value)


def test_a_dropped_key_is_reported_without_the_ciphertext_or_key() -> None:
    """Ciphertext no configured key opens raises AuthError naming the provider, not the key."""
    key = generate_key()
    ciphertext = TokenCipher((Secret(generate_key()),)).encrypt("value")
    cipher = TokenCipher((Secret(key),))

    with pytest.raises(AuthError) as caught:
        cipher.decrypt(ciphertext, provider="crm_provider")

    assert "crm_provider" in str(caught.value)
    assert key not in str(caught.value)
    assert ciphertext not in str(caught.value)


def test_settings_reject_a_malformed_key_by_position() -> None:
    """A bad key in IDIS_ENCRYPTION_KEYS fails at start naming its position, never echoing it."""
    good = generate_key()

    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"IDIS_ENCRYPTION_KEYS": f"{good},not-a-key-at-all"})

    assert "key #2" in str(caught.value)
    assert "not-a-key-at-all" not in str(caught.value)
