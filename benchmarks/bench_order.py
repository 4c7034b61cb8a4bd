"""The benchmark's job payload as a plain pydantic model, with no brokerjobs import: brokerjobs'
arm registers it as its ``@job`` (bench_bj.py) and the typed raw arm (bench_typed.py) validates
each body into it, so both pay for the same model."""

from __future__ import annotations

from pydantic import BaseModel


class BenchOrder(BaseModel):
    order_id: int
    customer: str
    amount: float
    currency: str
    sent_at: float
