"""Publish once, send faithful copies: what a sweep's scenarios publish.

A sweep runs the same signature hundreds of times. Each scenario needs a
message of its own, and building it is most of ``Task.apply_async``'s cost:
options, routing, ``create_task_message``. A :class:`PublishedMessage` is the
message Celery built for the fault-free run, recorded where ``send_task``
hands it to ``amqp.send_task_message``. Each copy gets a fresh task id
(``id``, ``root_id``, ``correlation_id``, the sent event's ``uuid``), fresh
headers and properties, the body deep-copied (kombu serializes it again with
the task's serializer), and then goes through what ``send_task`` does after
building a message: the result backend's ``on_task_call``, both publish
signals (their receivers see every copy), the publish and the sent event.

Only where a copy is provably the message a full publish would build
(:func:`copyable`): a plain signature without links, published by Celery's
own ``apply_async`` and ``send_task`` (no override in the task's class), protocol
2, no compression, routes that do not depend on the call, the in-memory broker.
The virtual clock starts each scenario at the same instant, so countdowns,
ETAs and expiry come out the same. Anything else publishes in full.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery, Signature, Task
from celery.utils import uuid

from .. import _celery_internals as internals
from .. import speedups


@dataclass(frozen=True)
class PublishedMessage:
    """One task message as Celery built it, ready to be sent again under new ids."""

    app: Celery
    name: str
    message: Any  # celery.app.amqp.task_message: headers, properties, body, sent_event
    options: dict[str, Any]

    @property
    def task_name(self) -> str:
        return str(self.message.headers["task"])

    @staticmethod
    def task_id_for_copy() -> str:
        """A fresh task id, made as ``Signature.freeze()`` makes one."""
        task_id: str = uuid()
        return task_id

    def publish_copy(self, task_id: str) -> None:
        """Send a copy as ``task_id``, as ``send_task`` would have sent that message."""
        internals.send_task_message_again(
            self.app,
            self.name,
            internals.task_message_for(self.message, task_id),
            dict(self.options),  # the router's queue and exchange objects, shared as Celery does
        )


@contextlib.contextmanager
def recording(app: Celery) -> Iterator[list[PublishedMessage]]:
    """The messages ``app.send_task`` sends meanwhile, in order."""
    sent: list[PublishedMessage] = []

    def record(name: str, message: Any, options: dict[str, Any]) -> None:
        sent.append(PublishedMessage(app, name, message, options))

    with internals.task_messages_recorded(app, record):
        yield sent


def copyable(
    app: Celery, signature: Any, sent: list[PublishedMessage], task_id: str
) -> PublishedMessage | None:
    """The one message a run of ``signature`` sent as ``task_id``, if copies of it are faithful.

    A speed-up (publish once, copy per scenario): with :mod:`..speedups` off,
    every scenario publishes through ``apply_async`` again.
    """
    if not speedups.enabled():
        return None
    if getattr(signature, "subtask_type", None) is not None:
        return None  # a canvas publishes several messages, some from the worker side
    if not _celery_s_own_publish(app, signature):
        return None  # code of the app's runs before the message is built: it must run each time
    options = signature.options
    if any(options.get(key) for key in ("link", "link_error", "chain", "chord", "group_id")):
        return None
    if app.conf.task_protocol != 2 or app.conf.task_compression:
        return None
    if not _static_routes(app.conf.task_routes):
        return None
    mine = [published for published in sent if published.message.headers["id"] == task_id]
    if len(mine) != 1 or sent[0] is not mine[0]:
        return None
    published = mine[0]
    if published.options.get("compression") or not _plain_body(published.message.body):
        return None
    return published


def _celery_s_own_publish(app: Celery, signature: Any) -> bool:
    """Nothing between ``signature.apply_async()`` and the message is the application's.

    A task class may override ``apply_async`` (celery-once takes its lock
    there), a signature or app class ``apply_async`` or ``send_task``: what
    they do must happen in every scenario, so such a publish is never copied.
    """
    task = app.tasks.get(signature.task)
    return (
        task is not None
        and type(signature).apply_async is Signature.apply_async
        and type(task).apply_async is Task.apply_async
        and type(app).send_task is Celery.send_task
    )


def _static_routes(routes: Any) -> bool:
    """Routes given as mappings only: the same task always lands in the same place."""
    if not routes:
        return True
    if isinstance(routes, Mapping):
        return True
    if isinstance(routes, list | tuple):
        return all(isinstance(route, Mapping) for route in routes)
    return False


def _plain_body(body: Any) -> bool:
    """``(args, kwargs, embed)`` with no callback, errback, chain or chord embedded."""
    if not (isinstance(body, tuple | list) and len(body) == 3 and isinstance(body[2], dict)):
        return False
    return not any(body[2].get(key) for key in ("callbacks", "errbacks", "chain", "chord"))
