"""Wire models of the task routes' small requests (/forecast, /sentiment and /classify-text, /classify-image's options).
Pydantic only: validated in the gateway so the error names the field before anything is queued."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inferline.server.limits import MAX_HORIZON, MAX_ROWS, MAX_SERIES, MAX_TEXT_CHARS

MAX_TEXTS = MAX_ROWS   # the caps are server/limits.py's table, shared with the worker's v2 and predict routes


class ForecastRequest(BaseModel):
    """/forecast's envelope: the route's documented contract and the platform's bounds (how long a series, how far a
    horizon), so that no request makes a worker do unbounded work. The row goes to the worker as sent, and the bound
    deployment's own request type validates it there (its fields, the model's own limits), as on
    /v1/models/{name}/predict: a user's model bound to task "forecast" may take more fields than these."""

    # strict: lax mode would turn `true` into 1 and "4.5" into 4.5; a series holds numbers, a horizon an integer.
    # allow: unknown fields are the model's row type to take or refuse.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    series: list[float] = Field(min_length=1, max_length=MAX_SERIES)
    horizon: int = Field(1, ge=1, le=MAX_HORIZON)   # the model's own max_horizon is checked by its worker


Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class SentimentRequest(BaseModel):
    """Either one `text` or a list of `texts`, not both."""

    model_config = ConfigDict(extra="forbid")

    text: Text | None = None
    texts: list[Text] | None = Field(None, min_length=1, max_length=MAX_TEXTS)

    @model_validator(mode="after")
    def _one_of(self) -> SentimentRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of `text` (a string) or `texts` (a list of strings)")
        return self


class ClassifyOptions(BaseModel):
    """/classify-image options besides the image: from the query string, a form field or the JSON body."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(5, ge=1, le=1000)   # the model's class count is checked by its worker

    @field_validator("top_k", mode="before")
    @classmethod
    def _not_bool(cls, value: Any) -> Any:
        # Lax, for the query string's and form's "3"; but a JSON `true` is not a count (lax mode reads it as 1).
        if isinstance(value, bool):
            raise ValueError("must be an integer, not a boolean")
        return value
