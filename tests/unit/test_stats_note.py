"""`brokerjobs stats` names the broker command for dead letters that AMQP cannot count."""

from __future__ import annotations

from pydantic import BaseModel

from brokerjobs import App, job
from brokerjobs.stats import at_least_once_queues, held_dead_letters_note


@job("note.write")
class Write(BaseModel):
    n: int


def app_of(kind: str) -> App:
    app = App("notes", queue_kind=kind)  # type: ignore[arg-type]

    @app.handler(Write)
    async def write(task: Write) -> None: ...

    return app


def test_quorum_queues_get_the_messages_dlx_command_for_the_urls_vhost() -> None:
    topology = app_of("quorum").topology()
    assert "notes.note.write.retry.1s" in at_least_once_queues(topology)
    note = held_dead_letters_note(topology, "amqp://u:p@rabbit:5672/shop%2Fprod")
    assert note is not None
    assert 'rabbit_amqqueue:info_all(<<"shop/prod">>, [name, messages_ready, messages_dlx])' in note
    assert "p@" not in note
    default = held_dead_letters_note(topology, "amqp://u:p@rabbit:5672")
    assert default is not None and '<<"/">>' in default


def test_classic_queues_need_no_note() -> None:
    assert held_dead_letters_note(app_of("classic").topology(), "amqp://rabbit/") is None
