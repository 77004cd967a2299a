"""smtplib under faults: every ``SMTP.sendmail`` is a side effect.

``SMTP.send_message`` goes through ``sendmail``, so both count once. A send
that raises (the server hung up) is an attempted effect: the message may have
been accepted before the connection dropped.
"""

from __future__ import annotations

import smtplib
from typing import TYPE_CHECKING, Any

from ..engine.effects import Patch, perform_attempt

if TYPE_CHECKING:
    from ..harness import CeleryFaults


def track_smtp(harness: CeleryFaults) -> None:
    """Count each ``smtplib.SMTP.sendmail`` (and ``send_message``) as a side effect."""
    log = harness.effects
    sendmail = smtplib.SMTP.sendmail

    def counted(client: Any, from_addr: str, to_addrs: Any, msg: Any, *args: Any) -> Any:
        to = to_addrs if isinstance(to_addrs, str) else ", ".join(to_addrs)
        return perform_attempt(
            log,
            "mail",
            f"smtp to {to}",
            lambda: sendmail(client, from_addr, to_addrs, msg, *args),
        )

    harness.on_stop(Patch(smtplib.SMTP, "sendmail", counted).undo)
