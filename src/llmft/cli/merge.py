"""`llmft merge RUN --out DIR [--hf]`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("merge")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, help="Merged run directory to create.")
@click.option("--hf", is_flag=True, help="Also write OUT/hf, a Hugging Face model folder (language-model runs).")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory.")
def merge(run_dir: Path, out: str, hf: bool, overwrite: bool) -> None:
    """Fold a LoRA run's adapters into the base weights: a plain run directory."""
    from llmft.pipelines.merge import HF_FOLDER, merge_run

    merge_run(run_dir, out, hf, overwrite)
    click.echo(f"merged run saved to {out}" + (f" (Hugging Face folder: {Path(out) / HF_FOLDER})" if hf else ""))
