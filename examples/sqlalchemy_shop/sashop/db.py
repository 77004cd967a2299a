"""The shop's tables and its session factory; the engine is bound at start-up (or by a test)."""

from __future__ import annotations

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"
    sku: Mapped[str] = mapped_column(String(20), primary_key=True)
    stock: Mapped[int]


class Reservation(Base):
    __tablename__ = "reservations"
    order_id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(ForeignKey("products.sku"))


Session = sessionmaker()
