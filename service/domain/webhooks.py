"""Outbound webhooks, as the domain states them: event types, signatures, the retry schedule,
and which addresses a delivery may reach.

Signatures follow Stripe's scheme exactly (Stripe's docs, "Verify webhook signatures"): the
header ``Tally-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``,
with one ``v1=`` entry per secret that signs (two while a rotation overlaps), so Stripe's own
verifiers accept it. The HMAC key is the whole secret string (``whsec_…``), as Stripe's.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import uuid
from collections.abc import Sequence
from urllib.parse import urlsplit

SIGNATURE_HEADER = "Tally-Signature"
SECRET_PREFIX = "whsec_"

CUSTOMER_CREATED = "customer.created"
CUSTOMER_UPDATED = "customer.updated"
CUSTOMER_DELETED = "customer.deleted"
ALERT_BUDGET = "alert.budget"
# A customer that crossed a period threshold is below it again in a later period.
ALERT_BUDGET_RECOVERED = "alert.budget.recovered"
EVENT_TYPES = (CUSTOMER_CREATED, CUSTOMER_UPDATED, CUSTOMER_DELETED, ALERT_BUDGET, ALERT_BUDGET_RECOVERED)
CUSTOMER_TYPES = frozenset({CUSTOMER_CREATED, CUSTOMER_UPDATED, CUSTOMER_DELETED})
# A delivery is pending (until a 2xx, or its retry period is over), then delivered or failed.
DELIVERY_STATES = ("pending", "delivered", "failed")
# What each kind of the change log (service/store/changelog.py) is delivered as.
CHANGE_TYPES = {"c": CUSTOMER_CREATED, "u": CUSTOMER_UPDATED, "d": CUSTOMER_DELETED}

MAX_URL_LENGTH = 2048
_EVENT_NAMESPACE = uuid.UUID("0d3c5f5e-8a51-4c53-9a55-2f0b3e4b7c11")


def new_secret() -> str:
    """A signing secret: ``whsec_`` and 32 random bytes, URL-safe base64."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>.<body>"`` keyed with the secret (Stripe's ``v1``)."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(timestamp: int, body: bytes, signing: Sequence[str]) -> str:
    """The ``Tally-Signature`` value: ``t=`` and one ``v1=`` per secret in ``signing``."""
    return ",".join([f"t={timestamp}", *(f"v1={signature(s, timestamp, body)}" for s in signing)])


def change_event_id(organization_id: uuid.UUID, environment: str, cursor: str) -> str:
    """The id of the change whose change-feed cursor is ``cursor`` (each change has its own):
    the same for every endpoint and every attempt (a receiver dedupes on it)."""
    return "evt_" + uuid.uuid5(_EVENT_NAMESPACE, f"{organization_id}/{environment}/{cursor}").hex


def retry_delay(attempts: int, base: float, cap: float, jitter: float) -> float:
    """Seconds before the attempt after ``attempts`` failed ones: ``base`` doubled per failure,
    at most ``cap``, scaled by ``jitter`` (a number in [0, 1): the delay lies between half and
    all of the exponential one, so receivers that failed together are not retried together)."""
    exponential = min(cap, base * 2.0 ** min(attempts - 1, 40))
    return exponential * (0.5 + jitter / 2)


# ---- addresses ------------------------------------------------------------------------------


def address_refusal(address: str) -> str | None:
    """Why a delivery may not connect to ``address`` (an IPv4 or IPv6 literal), or None when
    it may: private, loopback, link-local, multicast, reserved, unspecified, shared
    (carrier-grade NAT) and other non-global addresses are refused, an IPv4-mapped or
    NAT64-embedded IPv6 address as the IPv4 address it carries."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for flag in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{flag}"):
            return f"{ip} is a {flag.replace('_', '-')} address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return f"{ip} is a site-local address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def check_url(url: str) -> tuple[str, str | None]:
    """The host of an endpoint's URL, and the refusal of its address when the host is an IP
    literal; ValueError saying what is wrong with the URL itself."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"is at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials: authenticate deliveries by their signature")
    if parts.fragment:
        raise ValueError("must not have a fragment")
    if port == 0:
        raise ValueError("must not name port 0")
    host = parts.hostname
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host, None
    return host, address_refusal(host)
