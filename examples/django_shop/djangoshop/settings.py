"""Django settings of the example shop (SQLite; pytest-django uses an in-memory test database)."""

from __future__ import annotations

SECRET_KEY = "example"
INSTALLED_APPS = ["djangoshop"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "djangoshop.sqlite3"}}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
