"""`llmft`: a thin command-line shell over the Python API in `llmft.pipelines`.

Every user mistake surfaces as an `LlmftError`, printed as one line with exit code 2.
"""

from __future__ import annotations

import logging

import click

from llmft.cli.chat import chat
from llmft.cli.classify import classify
from llmft.cli.instruct import generate, instruct
from llmft.cli.merge import merge
from llmft.cli.options import add_threads_option
from llmft.cli.serve import serve
from llmft.errors import LlmftError
from llmft.training.resources import keep_freed_memory


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(quiet: bool) -> None:
    """Fine-tune GPT-style language models for classification and instruction following."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    keep_freed_memory()


cli.add_command(classify)
cli.add_command(instruct)
cli.add_command(generate)
cli.add_command(merge)
cli.add_command(serve)
cli.add_command(chat)
add_threads_option(cli)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="llmft", standalone_mode=False)
    except LlmftError as e:
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return 2
    return 0
