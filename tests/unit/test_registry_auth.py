"""API key tokens and scopes (no database)."""

from __future__ import annotations

from wm.stores.auth import BOOTSTRAP, Principal, digest, new_token, parse_token


def test_a_new_token_carries_its_key_id_and_a_secret() -> None:
    key_id, token = new_token()
    parsed_id, secret = parse_token(token)
    assert parsed_id == key_id
    assert len(secret) >= 40 and secret not in key_id
    assert new_token()[1] != token


def test_any_other_string_is_checked_against_the_bootstrap_key() -> None:
    assert parse_token("a-long-operator-chosen-secret") == (BOOTSTRAP, "a-long-operator-chosen-secret")
    assert parse_token("mwm_notHex_secret")[0] == BOOTSTRAP


def test_the_stored_form_is_a_sha256_not_the_secret() -> None:
    stored = digest("s3cret")
    assert len(stored) == 64 and "s3cret" not in stored


def test_admin_may_do_everything_others_only_their_scope() -> None:
    read, gateway, admin = (Principal("k", "n", scope) for scope in ("read", "gateway", "admin"))
    assert read.may(frozenset({"read"})) and not read.may(frozenset({"admin"}))
    assert gateway.may(frozenset({"read", "gateway"})) and not gateway.may(frozenset({"read"}))
    assert admin.may(frozenset({"admin"})) and admin.may(frozenset({"gateway"}))
