"""The pure parts of webhooks (service/domain/webhooks.py): signatures checked by Stripe's own
verifier and by the few lines of stdlib Python the guide gives receivers, the address rules,
URL checks and the retry schedule."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest
import stripe

from service.domain.webhooks import (
    address_refusal,
    check_url,
    new_secret,
    retry_delay,
    signature,
    signature_header,
)


def receiver_verifies(body: bytes, header: str, secret: str, tolerance: int = 300) -> bool:
    """The receiver of docs/api/webhooks.md, as written there."""
    parts = [p.split("=", 1) for p in header.split(",")]
    timestamp = next(v for k, v in parts if k == "t")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(timestamp)) <= tolerance
    return fresh and any(k == "v1" and hmac.compare_digest(v, expected) for k, v in parts)


def test_stripes_verifier_accepts_the_header_and_refuses_a_forgery() -> None:
    secret, body = new_secret(), b'{"id":"evt_1","type":"customer.created","data":{"name":"\xc3\xa9"}}'
    header = signature_header(int(time.time()), body, [secret])
    assert header.startswith("t=") and header.count(",v1=") == 1
    assert stripe.WebhookSignature.verify_header(body.decode(), header, secret, 300)
    assert receiver_verifies(body, header, secret)
    for wrong_secret, wrong_body in [(new_secret(), body), (secret, body + b" ")]:
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.WebhookSignature.verify_header(wrong_body.decode(), header, wrong_secret, 300)
        assert not receiver_verifies(wrong_body, header, wrong_secret)
    stale = signature_header(int(time.time()) - 3600, body, [secret])
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(body.decode(), stale, secret, 300)
    assert not receiver_verifies(body, stale, secret)


def test_during_a_rotation_both_secrets_sign() -> None:
    old, new, body = new_secret(), new_secret(), b"{}"
    header = signature_header(int(time.time()), body, [new, old])
    assert header.count("v1=") == 2
    for secret in (old, new):
        assert stripe.WebhookSignature.verify_header(body.decode(), header, secret, 300)
        assert receiver_verifies(body, header, secret)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    # Computed apart from Python: printf '1700000000.{}' | openssl dgst -sha256 -hmac whsec_test
    expected = "35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91"
    assert signature("whsec_test", 1_700_000_000, b"{}") == expected


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.9",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "fec0::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "2001:db8::1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_refusal(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_refusal(address) is None


def test_urls() -> None:
    assert check_url("https://hooks.example.com/x?y=1") == ("hooks.example.com", None)
    host, refusal = check_url("http://[::1]:8080/")
    assert host == "::1" and refusal is not None
    for bad in [
        "ftp://a.example",
        "https://",
        "https://u:p@a.example",
        "https://a.example/#f",
        "https://a.example:0/",
        "https://a.example:99999/",
        "https://a.example/" + "x" * 2048,
    ]:
        with pytest.raises(ValueError):
            check_url(bad)


def test_the_retry_schedule_doubles_to_its_cap_with_jitter() -> None:
    delays = [retry_delay(n, 30, 3600, 0.999999) for n in range(1, 12)]
    assert delays[:4] == pytest.approx([30, 60, 120, 240], rel=1e-5)
    assert max(delays) == pytest.approx(3600, rel=1e-5)
    assert retry_delay(3, 30, 3600, 0.0) == 60  # jitter: between half and all of the delay
    assert retry_delay(10_000, 30, 3600, 0.5) == 2700
