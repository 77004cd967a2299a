"""Remote control of the emulated workers: ``app.control`` answered as a worker answers it.

``app.control.revoke()``, ``inspect().active()`` and the rest publish to kombu's
mailbox (a fanout exchange); the in-memory broker hands each broadcast to the
live workers' mailboxes at once. Each mailbox is Celery's own
(``celery.worker.pidbox.Pidbox``): its node runs ``celery.worker.control``'s
handlers against that worker's state, and its reply is waiting in the
client's reply queue when the publish returns. The client is kombu's and
Celery's, unchanged: it stops waiting as soon as no reply is left to read, so
nothing waits a real second.

Each worker keeps its revoked ids in its own memory (:attr:`WorkerMailbox.revoked`),
as a worker process does: lost when it restarts, unless ``worker_state_db``
is set and it stopped cleanly (Celery saves that file at exit).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Protocol

from celery import Celery

from .. import _celery_internals as internals
from .broker import InMemoryBroker
from .pool import InProcessPool


class Node(Protocol):
    """The worker process, as its mailbox sees it (:class:`.consumer.EmulatedWorker`)."""

    @property
    def app(self) -> Celery: ...
    @property
    def hostname(self) -> str: ...
    @property
    def broker(self) -> InMemoryBroker: ...
    @property
    def pool(self) -> InProcessPool: ...
    @property
    def connection(self) -> Any: ...
    @property
    def channel(self) -> Any: ...
    @property
    def alive(self) -> bool: ...
    @property
    def stop_requested(self) -> bool: ...

    def held_for_eta(self) -> list[tuple[float, Any]]: ...

    def reset_rate_limits(self) -> None: ...

    def request_stop(self) -> None: ...

    def die(self, *, graceful: bool = False) -> None: ...


class WorkerMailbox:
    """One emulated worker's mailbox and revoked ids."""

    def __init__(self, worker: Node) -> None:
        self.worker = worker
        self.revoked: Any = internals.new_revoked_set()
        self.saved: Any = None  # the revoked ids worker_state_db holds, once saved
        self.accept = internals.control_message_accept(worker.app)
        consumer = SimpleNamespace(
            app=worker.app,
            hostname=worker.hostname,
            pool=worker.pool,
            timer=internals.EtaTimer(worker.held_for_eta),
            controller=SimpleNamespace(use_eventloop=True, state=None, autoscaler=None),
            connection=worker.connection,
            task_consumer=None,
            gossip=None,
            event_dispatcher=None,
            on_decode_error=lambda message, exc: None,
            reset_rate_limits=worker.reset_rate_limits,  # the ``rate_limit`` command
        )
        self.pidbox = internals.control_panel(consumer, worker.channel)

    def open(self) -> None:
        """The worker is up: broadcasts reach it."""
        self.worker.broker.mailboxes[self.worker.hostname] = self.handle

    def close(self, *, clean: bool) -> None:
        """The worker is gone; on a clean exit ``worker_state_db`` keeps its revoked ids."""
        self.worker.broker.mailboxes.pop(self.worker.hostname, None)
        if clean and self.worker.app.conf.worker_state_db:
            self.saved = internals.new_revoked_set()
            self.saved.update(self.revoked)

    def fresh_process(self, *, keep_saved: bool) -> None:
        """A new worker process: empty memory, then what ``worker_state_db`` saved."""
        if self.revoked:  # an empty one is as new
            self.revoked = internals.new_revoked_set()
        if not keep_saved:
            self.saved = None
        elif self.saved is not None:
            self.revoked.update(self.saved)

    def holding_revoked(self) -> internals.revoked_held_by:
        """Celery's worker code reads this worker's revoked ids while it is entered."""
        return internals.revoked_held_by(self.revoked)

    def handle(self, payload: dict[str, Any]) -> None:
        """A broadcast arrived: Celery's ``Pidbox.on_message``, in this worker's view."""
        worker = self.worker
        if not worker.alive or worker.stop_requested:
            return
        channel = worker.channel
        message = channel.Message(payload, channel=channel)
        message.accept = self.accept
        try:
            with internals.worker_view(worker.hostname, self.revoked):
                self.pidbox.on_message(message.decode(), message)
        except SystemExit as leaving:
            if not internals.control_leaves_the_worker(leaving):
                raise
            worker.request_stop()  # ``shutdown``: a warm shutdown
            if not worker.pool.running:
                worker.die(graceful=True)
