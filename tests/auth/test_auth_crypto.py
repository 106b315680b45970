"""Tokens at rest: Fernet encryption with keys from IDIS_ENCRYPTION_KEYS, newest first."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from idis.integrations.auth._crypto import TokenCipher, generate_key
from idis.integrations.config import Secret, Settings
from idis.integrations.exceptions import AuthError, ConfigError

P = "crm_provider"
RT = "refresh_token"


def test_round_trip_and_ciphertext_hides_the_value() -> None:
    """A value encrypts to ciphertext that does not contain it, and decrypts back."""
    cipher = TokenCipher((Secret(generate_key()),))

    ciphertext = cipher.encrypt("at_supersecret_value", provider=P, field="access_token")

    assert "at_supersecret_value" not in ciphertext
    assert "at_supersecret_value" == cipher.decrypt(ciphertext, provider=P, field="access_token")


def test_old_key_still_decrypts_and_reencrypt_moves_to_the_newest() -> None:
    """After a new key is put first, old ciphertext decrypts and re-encryption uses the new key."""
    old, new = generate_key(), generate_key()
    written_before = TokenCipher((Secret(old),)).encrypt("rt_value", provider=P, field=RT)
    rotated = TokenCipher((Secret(new), Secret(old)))

    moved = rotated.reencrypt(written_before, provider=P, field=RT)

    assert "rt_value" == rotated.decrypt(written_before, provider=P, field=RT)
    assert "rt_value" == TokenCipher((Secret(new),)).decrypt(moved, provider=P, field=RT)
    assert Fernet(new.encode()).decrypt(moved.encode()).endswith(b"rt_value")


def test_no_key_refuses_to_store_and_names_the_variable() -> None:
    """Without keys nothing is encrypted: encrypt raises naming IDIS_ENCRYPTION_KEYS."""
    cipher = TokenCipher(())

    with pytest.raises(ConfigError) as caught:
        cipher.encrypt("secret-value", provider=P, field=RT)

    assert False is cipher.available
    assert None is cipher.encrypt_optional("secret-value", provider=P, field=RT)
    assert "IDIS_ENCRYPTION_KEYS" == caught.value.variable
    assert "keygen" in str(caught.value)


def test_a_dropped_key_is_reported_without_the_ciphertext_or_key() -> None:
    """Ciphertext no configured key opens raises AuthError naming the provider, not the key."""
    key = generate_key()
    ciphertext = TokenCipher((Secret(generate_key()),)).encrypt("value", provider=P, field=RT)
    cipher = TokenCipher((Secret(key),))

    with pytest.raises(AuthError) as caught:
        cipher.decrypt(ciphertext, provider="crm_provider", field=RT)

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


def test_a_ciphertext_copied_to_another_provider_or_field_is_refused() -> None:
    """Values are bound to provider and field: a copy in another row or column never decrypts."""
    cipher = TokenCipher((Secret(generate_key()),))
    crm_token = cipher.encrypt("at_of_the_crm", provider="crm_provider", field="access_token")

    with pytest.raises(AuthError) as other_provider:
        cipher.decrypt(crm_token, provider="docs_provider", field="access_token")
    with pytest.raises(AuthError) as other_field:
        cipher.decrypt(crm_token, provider="crm_provider", field="client_secret")

    assert "docs_provider" in str(other_provider.value)
    assert "crm_provider" not in str(other_provider.value)  # never says whose it was
    assert "another provider or field" in str(other_field.value)
    assert "at_of_the_crm" not in str(other_provider.value) + str(other_field.value)


def test_values_written_before_binding_stay_readable_and_reencrypt_binds_them() -> None:
    """Read-time fallback: an unbound (old) value decrypts; re-encryption binds it to its row."""
    key = generate_key()
    legacy = Fernet(key.encode()).encrypt(b"rt_from_before").decode()  # what 0.1 wrote
    cipher = TokenCipher((Secret(key),))

    bound = cipher.reencrypt(legacy, provider=P, field=RT)

    assert "rt_from_before" == cipher.decrypt(legacy, provider=P, field=RT)
    assert "rt_from_before" == cipher.decrypt(bound, provider=P, field=RT)
    with pytest.raises(AuthError):
        cipher.decrypt(bound, provider="docs_provider", field=RT)
