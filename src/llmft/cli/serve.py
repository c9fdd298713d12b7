"""`llmft serve`."""

from __future__ import annotations

import click

from llmft.cli.options import prepack_option


@click.command()
@click.argument("run", required=False)
@click.option("--model", default=None, help="Serve this model (registry name, HF folder or .gguf) instead of a run.")
@click.option("--name", default=None, help="The model's name in the APIs (default: the run's folder name, or --model).")
@click.option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, type=int, help="Port to listen on (0: any free one).")
@click.option("--api-key", default=None, envvar="LLMFT_API_KEY",
              help="Require this Bearer token on every API request (or set $LLMFT_API_KEY).")
@click.option("--max-batch", default=16, help="Requests computed together.")
@click.option("--max-queue", default=64, help="Requests waiting beyond those; more get 503.")
@click.option("--max-tokens", default=512, help="Most new tokens a request may ask for.")
@click.option("--device", default="auto")
@prepack_option
def serve(run: str | None, model: str | None, **options) -> None:
    """Serve a run (`llmft serve RUN`) or a model (`--model NAME`): OpenAI's API under /v1,
    Ollama's under /api, /v1/classify for a classifier, and a page at /. Stop with Ctrl-C."""
    from llmft.serving import ServeOptions
    from llmft.serving import serve as run_server

    run_server(ServeOptions(run=run, model=model, **options))
