"""The SMS job and app the TestBroker tests share (a job name is registered once)."""

from __future__ import annotations

from pydantic import BaseModel

from brokerjobs import App, RetryPolicy, job


@job("sms.send", retry=RetryPolicy(delays=(1.0, 10.0, 60.0), max_attempts=3))
class SendSms(BaseModel):
    to: str


def sms_app(name: str = "t") -> App:
    app = App(name)
    app.queue(f"{name}.sms", "sms.*")
    return app
