"""`llmft serve`: a run (or a model) behind the HTTP APIs that existing clients speak.

- `served.py`: the model being served (`load_served`) and how requests become its input;
- `batcher.py`: the worker threads that own the model: a bounded queue feeding continuous
  batching of generations (`GenerationBatcher`) or batched classification;
- `bridge.py`: handing jobs from the event loop to a worker and waiting for them;
- `openai_api.py` (/v1: models, chat and text completions, classify), `ollama_api.py` (/api:
  tags, chat, generate), `schemas.py` (their request bodies), `errors.py` (errors in each
  API's shape);
- `app.py`: the application (`create_app`): the checks every request passes, the page
  (`static/index.html`); `server.py`: `serve(ServeOptions(...))` runs it with uvicorn.
"""

from llmft.serving.app import create_app
from llmft.serving.served import load_served
from llmft.serving.server import ServeOptions, serve

__all__ = ["ServeOptions", "create_app", "load_served", "serve"]
