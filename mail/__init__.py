"""Confirmation mails: a worker on the ``events`` stream (``python -m mail``)
and a dev SMTP sink (``python -m mail.sink``)."""

# Event types the `mailer` group sends a confirmation for. `mail.requeued` is
# appended by the admin's dead-letter retry (app/lua/requeue_mail.lua). Defined
# on the app side, which reads the backlog too (app/mail_backlog.py).
from app.mail_backlog import MAIL_EVENT_TYPES, MAIL_REQUEUED, ORDER_COMPLETED

__all__ = ["MAIL_EVENT_TYPES", "MAIL_REQUEUED", "ORDER_COMPLETED"]
