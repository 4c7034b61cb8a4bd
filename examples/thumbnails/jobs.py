"""The request the API accepts and the typed job it enqueues for the workers."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from brokerjobs import RetryPolicy, job

Size = Annotated[int, Field(ge=16, le=4096)]

# Fetching and decoding images fails transiently (timeouts, a busy image store): retry twice,
# after 1 s and 5 s, then park the job so an operator can look at it and replay it.
IMAGE_RETRY = RetryPolicy(delays=(1.0, 5.0), max_attempts=3)


class ImageRequest(BaseModel):
    """``POST /images`` body: where the image is and which thumbnail widths to make."""

    model_config = ConfigDict(extra="forbid")

    url: HttpUrl
    sizes: list[Size] = Field(default=[128, 512], min_length=1, max_length=8)

    def to_job(self) -> ProcessImage:
        return ProcessImage(url=str(self.url), sizes=sorted(set(self.sizes)))


@job("image.process", retry=IMAGE_RETRY)
class ProcessImage(BaseModel):
    """Make a thumbnail, a preview and the metadata of one uploaded image."""

    url: str = Field(min_length=1, max_length=2048)
    sizes: list[Size] = Field(min_length=1, max_length=8)
