"""The naive server the serving bench compares concurrency-1 latency with: FastAPI + uvicorn, the model run in the
route itself, one request at a time (no queue, no batching, no second process), on the same v2 body.

    python bench/naive_fastapi.py 8001 '{"name": "noop", "model": "tests.runtimes:Noop"}'   # port, ModelSpec JSON

It loads the model with the worker's own loader (so the same Model class, weights and thread count), parses the v2
body with orjson into numpy and answers with the first output tensor. Benchmark use only: no validation beyond what
the model's request type does, no error bodies, no limits.
"""

# No `from __future__ import annotations`: FastAPI reads the route's annotations (Request) at runtime.
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def app_for(spec: dict[str, Any]) -> Any:
    import numpy as np
    import orjson
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    from inferline.server.config import ModelSpec
    from inferline.server.model import signature
    from inferline.server.worker.loading import load_model

    model = load_model(ModelSpec(**spec), "cpu")
    sig = signature(type(model))
    request_type, output = sig.request, sig.outputs[0].name
    assert request_type is not None
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        body = orjson.loads(await request.body())
        tensor = body["inputs"][0]
        row = request_type.model_validate(
            {tensor["name"]: np.asarray(tensor["data"], np.float32).reshape(tensor["shape"][1:])})
        answer = getattr(model.predict([row])[0], output)
        return Response(orjson.dumps({"model_name": name, "outputs": [
            {"name": output, "datatype": "FP32", "shape": [1, *answer.shape], "data": answer.reshape(-1)}]},
            option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    @app.get("/readyz")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app_for(json.loads(sys.argv[2])), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False)
