"""Django under faults: a worker process's connection per execution, writes as side effects."""

from __future__ import annotations

from collections.abc import Callable

import pytest

RunTests = Callable[..., pytest.RunResult]  # the django_tests fixture (conftest.py)


def test_a_crash_inside_atomic_rolls_back_and_the_redelivery_commits_once(
    django_tests: RunTests,
) -> None:
    django_tests(
        """
        import pytest
        from django.db import connection
        from djshop.models import Order, Payment, Receipt
        from djshop.tasks import pay

        def test_crash_inside_atomic(transactional, celery_faults, orm):
            assert connection.in_atomic_block is not transactional
            orm.count_writes("statements")
            order = Order.objects.create()
            blocks = list(connection.atomic_blocks)
            outcome = celery_faults.run(pay.s(order.id), "sigkill@1")  # after the INSERT
            assert (outcome.deliveries, outcome.result) == (2, "paid")
            assert Payment.objects.count() == 1
            assert Receipt.objects.count() == 1  # on_commit published it, as in production
            # The test's own transaction (db) is the one it had, and still works.
            assert connection.atomic_blocks == blocks
            Order.objects.create()
            assert Order.objects.count() == 2
            labels = [str(effect) for effect in celery_faults.effects]
            assert labels[:2] == ["db default INSERT djshop_payment"] * 2

        def test_crash_right_after_the_commit_keeps_it_and_loses_the_hook(db, celery_faults, orm):
            orm.count_writes("commits")
            order = Order.objects.create()
            outcome = celery_faults.run(pay.s(order.id), "sigkill@1")  # after COMMIT
            assert (outcome.deliveries, outcome.result) == (2, "already paid")
            assert Payment.objects.count() == 1
            assert Receipt.objects.count() == 0  # the hook died with the process

        def test_crash_before_the_commit_publishes_nothing(db, celery_faults, orm):
            orm.count_writes("commits")
            order = Order.objects.create()
            outcome = celery_faults.run(pay.s(order.id), "raise(django.db.OperationalError)@0")
            assert outcome.state == "FAILURE"
            assert Payment.objects.count() == 0
            assert Receipt.objects.count() == 0
            assert Order.objects.get().status == "new"
        """,
        passed=4,
    )


def test_two_autocommit_writes_are_two_side_effects_and_a_crash_between_duplicates(
    django_tests: RunTests,
) -> None:
    django_tests(
        """
        from djshop.models import Order, Payment
        from djshop.tasks import pay_in_two_commits

        def test_between_the_two_commits(db, celery_faults, orm):
            orm.count_writes()
            order = Order.objects.create()
            outcome = celery_faults.run(pay_in_two_commits.s(order.id), "sigkill@1")
            assert outcome.result == "paid"
            assert Payment.objects.count() == 2  # the bug: the payment committed alone

        def test_sweep_finds_it(db, celery_faults, orm):
            orm.count_writes()
            order = Order.objects.create()

            def reset():
                Payment.objects.all().delete()
                Order.objects.update(status="new")

            report = celery_faults.sweep(
                pay_in_two_commits.s(order.id),
                observe=lambda: Payment.objects.count(),
                reset=reset,
                hows=["sigkill"],
                pairs=False,
            )
            assert [failure.replay for failure in report.failures] == ["sigkill@1"]
        """,
        passed=2,
    )


def test_a_frozen_execution_is_rolled_back_from_outside_on_any_thread(
    django_tests: RunTests,
) -> None:
    django_tests(
        """
        import threading
        import pytest
        from django.db import connection, transaction
        from djshop.models import Order

        class Frozen:
            task_id, task_name, delivery, effect_count, dead = "t1", "djshop.pay", 1, 0, False

        @pytest.mark.parametrize("where", ["test thread", "own thread", "pooled thread"])
        def test_killed_mid_atomic(transactional, where, celery_faults, orm):
            assert connection.in_atomic_block is not transactional
            Order.objects.create(status="kept")
            state = lambda: (connection.in_atomic_block, list(connection.atomic_blocks))
            before = state()
            execution = Frozen()

            def body():  # started, a committed write, then frozen inside atomic
                orm.started(execution)
                Order.objects.create(status="committed")
                transaction.atomic().__enter__()
                Order.objects.create(status="open")
                transaction.on_commit(lambda: Order.objects.create(status="hook"))

            if where == "own thread":
                thread = threading.Thread(target=body)
                thread.start()
                thread.join()
            elif where == "pooled thread":  # a thread that already ran an execution
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=1) as pool:
                    first = Frozen()
                    pool.submit(orm.started, first).result()
                    orm.ended(first, "returned")
                    pool.submit(body).result()
            else:
                body()
            orm.ended(execution, "child killed")  # from the harness's side
            assert sorted(Order.objects.values_list("status", flat=True)) == ["committed", "kept"]
            assert state() == before

        def test_interleaved_executions_are_refused(db, celery_faults, orm):
            first, second = Frozen(), Frozen()
            second.task_id = "t2"
            orm.started(first)
            with pytest.raises(RuntimeError) as refused:
                orm.started(second)
            orm.ended(first, "returned")
            assert str(refused.value) == (
                "celery_faults: djshop.pay[t2] started while another execution holds the "
                "test's Django connection; the Django integration needs executions that do "
                "not interleave"
            )
        """,
        passed=7,
    )


def test_mail_sent_by_a_task_is_a_side_effect(django_tests: RunTests) -> None:
    django_tests(
        """
        from django.core import mail
        from djshop.models import Order
        from djshop.tasks import receipt

        def test_receipt_mail_twice_after_a_crash(db, celery_faults, orm):
            assert orm.count_mail() == "mail send_messages"
            order = Order.objects.create()
            outcome = celery_faults.run(receipt.s(order.id), "sigkill@1")
            assert outcome.deliveries == 2
            assert [m.subject for m in mail.outbox] == ["receipt", "receipt"]
        """,
        passed=1,
    )


def test_executions_get_worker_connections_without_asking(django_tests: RunTests) -> None:
    """(#19.3) No worker_connections(): a killed task's thread still uses the test's connection."""
    django_tests(
        """
        from django.db import connection
        from djshop.models import Order, Payment, Receipt
        from djshop.tasks import pay
        from pytest_celery_faults.integrations.django import worker_connections

        def test_pay_after_a_kill(transactional, celery_faults):
            attached = celery_faults.django_connections
            assert worker_connections(celery_faults) is attached  # to count writes, if asked
            order = Order.objects.create()
            blocks = list(connection.atomic_blocks)
            outcome = celery_faults.run(pay.s(order.id), "sigkill@0")
            assert (outcome.deliveries, outcome.state, outcome.result) == (2, "SUCCESS", "paid")
            assert Payment.objects.count() == 1
            assert Receipt.objects.count() == 1  # on_commit published it
            assert connection.atomic_blocks == blocks  # the test's transaction is whole
        """,
        passed=2,
    )


def test_the_gate_gives_eager_runs_worker_connections(django_project: pytest.Pytester) -> None:
    """(#19.3) --celery-faults on a Django suite that never asked for worker_connections."""
    django_project.makepyfile(
        """
        from djshop.models import Order, Payment, Receipt
        from djshop.tasks import pay

        def test_pay_eagerly(transactional):
            order = Order.objects.create()
            pay.apply(args=(order.id,))  # delivered twice: "paid", then "already paid"
            assert Payment.objects.count() == 1
            # on_commit published it at the task's commit; the receipt task, delivered
            # twice as well, is not idempotent
            assert Receipt.objects.count() == 2
        """
    )
    result = django_project.runpytest_subprocess("--celery-faults=redeliver*1")
    result.assert_outcomes(passed=2)


def test_executions_at_once_are_refused_in_one_line(django_project: pytest.Pytester) -> None:
    """(#19.3) Executions at once would share the test's one connection: refused, not hung."""
    django_project.makepyfile(
        """
        import pytest

        @pytest.mark.celery_faults(workers=2)
        def test_two_workers(db, celery_faults):
            pass
        """
    )
    result = django_project.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.no_fnmatch_line("*Traceback*")
    result.stdout.fnmatch_lines(
        [
            "celery_faults: Django is configured and this harness runs "
            "executions at once (2 worker(s) x worker_concurrency=1): they would share the "
            "test's one database connection per alias, which worker processes never do; run "
            "the test with workers=1 and app.conf.worker_concurrency=1"
        ]
    )


def test_an_execution_the_integration_refuses_fails_the_test(
    django_project: pytest.Pytester,
) -> None:
    """An ``overlap`` copy refused by worker_connections() is not classed ok."""
    django_project.makepyfile(
        """
        from djshop.models import Order, Payment
        from djshop.tasks import pay_in_two_commits

        def test_overlap(db, celery_faults, orm):
            orm.count_writes()
            order = Order.objects.create()

            def reset():
                Payment.objects.all().delete()
                Order.objects.update(status="new")

            celery_faults.assert_idempotent(
                pay_in_two_commits.s(order.id), Payment.objects.count, reset, specs=["overlap"]
            )
        """
    )
    result = django_project.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E   *EmulationError: celery_faults: the plugin failed inside "
            "djshop.tasks.pay_in_two_commits[[]*[]] (delivery 2) as it started, not the task: "
            "RuntimeError: djshop.tasks.pay_in_two_commits[[]*[]] started while another execution "
            "holds the test's Django connection; the Django integration needs executions "
            "that do not interleave"
        ]
    )
