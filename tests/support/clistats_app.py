"""An app for ``brokerjobs stats`` tests, named by $CLISTATS_APP (one handler, default policy)."""

import os

from pydantic import BaseModel

from brokerjobs import App, job


@job("note.write")
class Note(BaseModel):
    text: str


app = App(os.environ.get("CLISTATS_APP", "clistats"))


@app.handler(Note)
async def write(_: Note) -> None:
    pass
