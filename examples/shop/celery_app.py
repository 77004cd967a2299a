"""The shop's Celery app, configured as a production app would be."""

from __future__ import annotations

from celery import Celery

app = Celery("shop", broker="redis://localhost:6379/0", include=["shop.tasks"])
app.conf.update(
    task_serializer="json",
    result_backend="redis://localhost:6379/1",
    broker_transport_options={"visibility_timeout": 600},
)
