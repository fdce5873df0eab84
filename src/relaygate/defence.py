"""Compromised-account defence: the rules, without I/O.

Counts go in, a decision comes out. The service (services/defence.py) feeds
an account's ``Activity`` (this hour's counts, its baseline, whether it logged
in from a network it never used before) and gets a ``Trigger`` or None; the
delivery process feeds refused-recipient counts to ``reject_trigger``.

The baseline is the account's busiest hour of the last 14 days (the hourly
sending counters of quotas.py, kept that long for accounts): the busiest
hour, not the mean, so a steady account's usual peaks never look like an
outbreak. A new account has baseline 0, so the floor applies.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from relaygate.config import DefenceConfig

BASELINE_DAYS = 14
HOUR = 3600.0

# Why an account was held (the ``reason`` of account.held and `held list`).
VOLUME = "volume"
NEW_RECIPIENTS = "new_recipients"
NEW_NETWORK = "new_network"
REMOTE_REJECTS = "remote_rejects"
REASONS = (VOLUME, NEW_RECIPIENTS, NEW_NETWORK, REMOTE_REJECTS)


@dataclass(frozen=True, slots=True)
class Activity:
    """What is known of one account's sending, as the rules need it."""

    messages: int  # accepted this UTC hour
    recipients: int  # their recipients (RCPTs; a recipient of two messages counts twice)
    new_recipients: int  # of those, addresses the account never sent to before
    baseline: int  # messages in its busiest hour of the last 14 days (this hour left out)
    new_network_at: float | None  # first login from a never-used network, in the last hour
    new_network: str | None = None  # ... that network (a /24 or /48), for the admin
    expected_until: float | None = None  # an admin said a burst is expected until then
    expected_messages: int = 0  # ... of about this many messages an hour
    held: bool = False


@dataclass(frozen=True, slots=True)
class Trigger:
    reason: str  # one of REASONS
    detail: str  # for people: which count passed which threshold
    counts: dict[str, int]


def expected(activity: Activity, now: float) -> bool:
    return activity.expected_until is not None and activity.expected_until > now


def effective_baseline(activity: Activity, now: float) -> int:
    """The baseline, raised while an expected burst lasts."""
    if expected(activity, now):
        return max(activity.baseline, activity.expected_messages)
    return activity.baseline


def volume_threshold(config: DefenceConfig, activity: Activity, now: float) -> int:
    """Messages an hour above which the volume trigger fires: max(k x baseline, floor)."""
    return max(int(config.volume_factor * effective_baseline(activity, now)), config.volume_floor)


def decide(config: DefenceConfig, activity: Activity, now: float) -> Trigger | None:
    """Whether the account's sending (its latest message counted) should be held."""
    if not config.enabled or activity.held:
        return None
    counts = {
        "messages": activity.messages,
        "recipients": activity.recipients,
        "new_recipients": activity.new_recipients,
        "baseline": activity.baseline,
    }
    if config.volume_floor:
        limit = volume_threshold(config, activity, now)
        if activity.messages > limit:
            return Trigger(VOLUME, f"{activity.messages} messages this hour > {limit}", counts)
    if (
        activity.new_network_at is not None
        and config.new_network_burst
        and not expected(activity, now)
        and now - activity.new_network_at < HOUR
    ):
        # The new network is never part of the baseline: learning it (its row in
        # defence_seen) does not excuse the burst that follows the login.
        limit = max(config.new_network_burst, activity.baseline)
        if activity.messages > limit:
            where = f" {activity.new_network}" if activity.new_network else ""
            return Trigger(
                NEW_NETWORK,
                f"{activity.messages} messages this hour since a login from a new network"
                f"{where} > {limit}",
                counts,
            )
    if (
        config.new_recipient_min
        and not expected(activity, now)
        and activity.new_recipients >= config.new_recipient_min
        and activity.new_recipients > config.new_recipient_share * activity.recipients
    ):
        return Trigger(
            NEW_RECIPIENTS,
            f"{activity.new_recipients} of {activity.recipients} recipients this hour are new",
            counts,
        )
    return None


def reject_trigger(config: DefenceConfig, refused: int, attempted: int) -> Trigger | None:
    """Remote mail servers refused (5xx) ``refused`` of ``attempted`` recipients in an hour."""
    if not config.enabled or not config.remote_reject_min or refused < config.remote_reject_min:
        return None
    if attempted <= 0 or refused <= config.remote_reject_rate * attempted:
        return None
    return Trigger(
        REMOTE_REJECTS,
        f"{refused} of {attempted} recipients refused by remote servers in the last hour",
        {"refused": refused, "attempted": attempted},
    )


def network_of(client_ip: str) -> str | None:
    """The /24 (IPv4) or /48 (IPv6) a client address belongs to; None if not an address."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def client_name(helo: str) -> str:
    """The client software signal kept per account: its EHLO name, printable, bounded.

    SMTP clients announce no software name; the EHLO argument (a host name, or
    what a mail library puts there) is what changes when someone else's tool
    sends with the account's password."""
    text = "".join(c if c.isprintable() and not c.isspace() else "?" for c in helo[:100])
    return text.lower() or "-"
