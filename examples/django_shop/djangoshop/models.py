"""Orders, the payments taken for them, and the receipts mailed."""

from __future__ import annotations

from django.db import models


class Order(models.Model):
    total = models.IntegerField(default=1999)
    status = models.CharField(max_length=10, default="new")


class Payment(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE)
    amount = models.IntegerField()


class Receipt(models.Model):
    order = models.OneToOneField(Order, on_delete=models.CASCADE)
