"""The inferline Python client: typed sync and async calls to every route of a gateway, with retries that honour
Retry-After, streaming, and batch helpers. Needs only the core install (httpx, pydantic, numpy).

    from inferline.client import Client, AsyncClient

    with Client("http://127.0.0.1:8000") as client:          # or INFERLINE_URL / INFERLINE_API_KEY
        client.forecast([5, 11, 16, 23, 36, 58, 29, 20, 10, 8, 3, 0], horizon=3).forecast
        for token in client.generate_stream("The module", max_new_tokens=20):
            print(token.token.text, end="")
"""

from inferline.client.calls import Retries
from inferline.client.client import AsyncClient, Client
from inferline.client.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    DeadlineError,
    InferlineError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
)
from inferline.client.types import (
    ChatCompletion,
    Completion,
    Forecast,
    Generation,
    Health,
    ImageClassification,
    InferResult,
    Label,
    ModelCard,
    ModelList,
    ModelMetadata,
    Prediction,
    StreamToken,
    TextClassification,
)

__all__ = ["APIConnectionError", "APIError", "AsyncClient", "AuthenticationError", "BadRequestError",
           "ChatCompletion", "Client", "Completion", "DeadlineError", "Forecast", "Generation", "Health",
           "ImageClassification", "InferResult", "InferlineError", "Label", "ModelCard", "ModelList", "ModelMetadata",
           "NotFoundError", "OverloadedError", "PermissionDeniedError", "Prediction", "RateLimitError", "Retries",
           "ServerError", "StreamToken", "TextClassification"]
