"""`llmft chat RUN_OR_MODEL`: a conversation in the terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import click

from llmft.cli.options import sampling_options

COMMANDS = "/reset forgets the conversation, /exit (or Ctrl-D) ends it"


def messages() -> Iterator[str]:
    """The user's messages, one a line from standard input, after a `>> ` prompt; up to /exit
    or the end of the input."""
    while True:
        click.echo(">> ", nl=False)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip():
            yield line.strip()


@click.command()
@click.argument("source")
@sampling_options
def chat(source: str, max_new_tokens: int, device: str, compile: bool, **sampling) -> None:
    """Chat with an instruction run (SOURCE: its directory) or a model (a registry name or
    path), in the run's prompt style or the model's chat template; the answer is printed as it
    is generated, earlier turns are kept as far as the context holds them."""
    from llmft.pipelines.chat import open_chat

    session = open_chat(source, device=device, max_new_tokens=max_new_tokens, compile=compile, **sampling)
    click.echo(f"chatting with {source} ({session.style.name} prompts): {COMMANDS}", err=True)
    for message in messages():
        if message == "/reset":
            session.reset()
            click.echo("(conversation reset)")
            continue
        for piece in session.reply(message):
            click.echo(piece, nl=False)
        click.echo()
    click.echo()
