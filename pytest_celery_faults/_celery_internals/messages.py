"""Task messages: recorded as Celery sends them, sent again, and what a worker accepts.

Celery 5.3 to 5.7 build a message in ``amqp.create_task_message`` and send it
through ``amqp.send_task_message``; both are the same in every release the
plugin supports.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

from celery import Celery
from celery.utils.serialization import get_pickled_exception


def unpickled_exception(exc: BaseException) -> BaseException:
    return get_pickled_exception(exc)  # type: ignore[no-any-return]


def accept_content(app: Celery) -> set[str]:
    """The content types a worker of ``app`` accepts (what its consumer sets on messages)."""
    from kombu.serialization import prepare_accept_content

    return prepare_accept_content(app.conf.accept_content)  # type: ignore[no-any-return]


@contextlib.contextmanager
def task_messages_recorded(
    app: Celery, record: Callable[[str, Any, dict[str, Any]], None]
) -> Iterator[None]:
    """Call ``record(name, message, options)`` for each message ``app.send_task`` sends.

    ``message`` is what ``amqp.create_task_message`` built (headers,
    properties, body, sent event), before any ``before_task_publish``
    receiver saw it; ``options`` are the routing and publish options that
    ``send_task`` passes on to ``amqp.send_task_message``.
    """
    amqp = app.amqp
    cached = vars(amqp)
    had = "send_task_message" in cached
    previous = cached.get("send_task_message")
    send = amqp.send_task_message

    def recording(producer: Any, name: str, message: Any, **options: Any) -> Any:
        record(name, copy.deepcopy(message), dict(options))  # sending changes the message
        return send(producer, name, message, **options)

    cached["send_task_message"] = recording
    try:
        yield
    finally:
        if had:
            cached["send_task_message"] = previous
        else:
            cached.pop("send_task_message", None)


def send_task_message_again(app: Celery, name: str, message: Any, options: dict[str, Any]) -> None:
    """What ``app.send_task`` does once it has built ``message``, done again (Celery 5.3-5.7).

    A producer from the app's pool, the result backend told of the call
    (unless the result is ignored), then ``amqp.send_task_message``: the
    ``before_task_publish`` and ``after_task_publish`` signals, the publish
    with the message's serializer, and the sent event.
    """
    task_id = message.headers["id"]
    with (
        app.producer_or_acquire(None) as producer,
        producer.connection._reraise_as_library_errors(),
    ):
        if not message.headers.get("ignore_result"):
            app.backend.on_task_call(producer, task_id)
        app.amqp.send_task_message(producer, name, message, **options)


def task_message_for(message: Any, task_id: str) -> Any:
    """A copy of ``message`` as ``create_task_message`` builds it for ``task_id``."""
    old_id = message.headers["id"]
    headers = copy.deepcopy(message.headers)
    properties = copy.deepcopy(message.properties)
    headers["id"] = properties["correlation_id"] = task_id
    if headers.get("root_id") == old_id:  # a top-level task is its own root
        headers["root_id"] = task_id
    sent_event = copy.deepcopy(message.sent_event)
    if sent_event is not None:
        sent_event["uuid"] = task_id
        if sent_event.get("root_id") == old_id:
            sent_event["root_id"] = task_id
    return type(message)(headers, properties, copy.deepcopy(message.body), sent_event)
