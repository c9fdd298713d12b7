"""`llmft merge RUN [RUN ...] --out DIR [--hf]`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("merge")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, help="Merged run directory to create.")
@click.option("--hf", is_flag=True, help="Also write OUT/hf, a Hugging Face model folder (language-model runs).")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory.")
def merge(run_dirs: tuple[Path, ...], out: str, hf: bool, overwrite: bool) -> None:
    """Fold a LoRA run's adapters into the base weights, or average several runs' weights (a
    model soup of runs fine-tuned from one base on the same splits): a plain run directory."""
    from llmft.pipelines.merge import HF_FOLDER, merge_run

    merge_run(list(run_dirs), out, hf, overwrite)
    what = "merged run" if len(run_dirs) == 1 else f"average of {len(run_dirs)} runs"
    click.echo(f"{what} saved to {out}" + (f" (Hugging Face folder: {Path(out) / HF_FOLDER})" if hf else ""))
