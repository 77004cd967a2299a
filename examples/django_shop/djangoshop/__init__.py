"""A small Django shop whose payment task runs through Celery (the Django example)."""
