"""Confirmation mails: a worker on the ``events`` stream (``python -m mail``)
and a dev SMTP sink (``python -m mail.sink``)."""

# Event types the `mailer` group sends a confirmation for. `mail.requeued` is
# appended by the admin's dead-letter retry (mail/lua/requeue_mail.lua).
ORDER_COMPLETED = "order.completed"
MAIL_REQUEUED = "mail.requeued"
MAIL_EVENT_TYPES = frozenset({ORDER_COMPLETED, MAIL_REQUEUED})
