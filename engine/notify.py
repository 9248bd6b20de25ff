"""Channel senders: blocking calls with bounded timeouts, run in a thread pool.

Each raises :class:`DeliveryError` with a reason an operator can act on (status code,
refused connection, SMTP reply). Nothing here logs the message body or payload: they may
carry result values.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

import structlog

from engine.errors import LabrelayError
from lis_bridge.models import utcnow
from lis_bridge.notifications import ChannelSettings, Delivery

log = structlog.get_logger(__name__)

_MAX_ERROR_BODY = 200


class DeliveryError(LabrelayError):
    """One delivery attempt failed; the notification is retried with backoff."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirected POST becomes a GET without the body in urllib: that is not a delivery.
    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def send_webhook(channel: ChannelSettings, delivery: Delivery) -> None:
    """POST the notification as JSON; any answer but 2xx is a failure."""
    if not channel.url.startswith(("http://", "https://")):
        raise DeliveryError(f"channel {channel.name}: url must be http(s)://")
    body = json.dumps(delivery.webhook_json(), sort_keys=True, default=str).encode("utf-8")
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "labrelay",
        # The receiver can drop a repeat (our retry after a lost response) with this key.
        "Idempotency-Key": f"labrelay-notification-{delivery.id}",
        **dict(channel.headers),
    }
    request = urllib.request.Request(channel.url, data=body, headers=headers, method="POST")  # noqa: S310 - scheme checked above
    try:
        with _opener.open(request, timeout=channel.timeout) as response:
            status = response.status
            response.read(4096)
    except urllib.error.HTTPError as exc:
        detail = exc.read(_MAX_ERROR_BODY).decode("utf-8", "replace").strip() if exc.fp else ""
        raise DeliveryError(
            f"webhook {channel.name} answered HTTP {exc.code} {exc.reason}"
            + (f": {detail}" if detail else "")
        ) from exc
    except urllib.error.URLError as exc:
        raise DeliveryError(f"webhook {channel.name} unreachable: {exc.reason}") from exc
    except TimeoutError as exc:
        raise DeliveryError(
            f"webhook {channel.name} did not answer within {channel.timeout:g} s") from exc
    except OSError as exc:
        raise DeliveryError(f"webhook {channel.name} failed: {exc}") from exc
    if not 200 <= status < 300:
        raise DeliveryError(f"webhook {channel.name} answered HTTP {status}")


def build_email(channel: ChannelSettings, delivery: Delivery) -> EmailMessage:
    message = EmailMessage()
    message["From"] = channel.sender
    message["To"] = ", ".join(channel.recipients)
    message["Subject"] = delivery.subject
    message["Date"] = format_datetime(utcnow())
    # The same id on every attempt: mail systems can recognise a resend as the same mail.
    domain = channel.sender.rpartition("@")[2] or "labrelay"
    message["Message-ID"] = f"<labrelay-notification-{delivery.id}@{domain}>"
    message["X-Labrelay-Kind"] = delivery.kind
    message.set_content(delivery.body)
    return message


def send_email(channel: ChannelSettings, delivery: Delivery) -> None:
    """Send one e-mail over SMTP (STARTTLS and login when configured)."""
    message = build_email(channel, delivery)
    try:
        smtp: smtplib.SMTP
        if channel.port == 465:  # implicit TLS ("SMTPS")
            smtp = smtplib.SMTP_SSL(channel.host, channel.port, timeout=channel.timeout,
                                    context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(channel.host, channel.port, timeout=channel.timeout)
        with smtp:
            smtp.ehlo()
            if channel.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if channel.username:
                smtp.login(channel.username, channel.password)
            refused = smtp.send_message(message)
    except smtplib.SMTPResponseException as exc:
        reply = exc.smtp_error
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
        raise DeliveryError(
            f"smtp {channel.name} refused: {exc.smtp_code} {text[:_MAX_ERROR_BODY]}") from exc
    except smtplib.SMTPRecipientsRefused as exc:
        raise DeliveryError(
            f"smtp {channel.name}: every recipient refused ({len(exc.recipients)})") from exc
    except smtplib.SMTPException as exc:
        raise DeliveryError(f"smtp {channel.name} failed: {exc}") from exc
    except TimeoutError as exc:
        raise DeliveryError(
            f"smtp {channel.name} did not answer within {channel.timeout:g} s") from exc
    except OSError as exc:
        raise DeliveryError(
            f"smtp {channel.name} unreachable at {channel.host}:{channel.port}: {exc}") from exc
    if refused:
        # Some recipients took it: delivered, but say who did not.
        log.warning("notify.smtp.partial", channel=channel.name, refused=len(refused))


def send(channel: ChannelSettings, delivery: Delivery) -> None:
    """Deliver on ``channel`` whatever its type."""
    if channel.type == "webhook":
        send_webhook(channel, delivery)
    elif channel.type == "smtp":
        send_email(channel, delivery)
    else:
        raise DeliveryError(f"channel {channel.name}: unknown type {channel.type!r}")
