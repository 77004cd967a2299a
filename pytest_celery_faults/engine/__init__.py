"""The engine: an in-memory broker, emulated workers and a virtual clock, running Celery's code.

Nothing here knows pytest. The harness (:mod:`pytest_celery_faults.harness`) is the
small façade a test holds; the verdicts (:mod:`pytest_celery_faults.verdicts`) judge
what the engine recorded.
"""
