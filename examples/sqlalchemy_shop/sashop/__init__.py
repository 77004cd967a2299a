"""A small SQLAlchemy shop whose stock task runs through Celery (the SQLAlchemy example)."""
