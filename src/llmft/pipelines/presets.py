"""Named recipes: `classify train --preset NAME` starts from these flag values instead of the
book-faithful defaults; any flag given on the command line still wins.

A preset is a set of flag values under the command's own option names (as `--config` lays a
recorded run's options over the defaults), so a run made with one records ordinary options
in its run.json, and `--config` reruns it without knowing the preset. The numbers behind each
preset are in docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Any

from llmft.errors import LlmftError

# docs/benchmarks.md, "Spam quality study (issue 16 part 4)": chosen by that study on sms-spam's
# balanced split, seeds 123-125.
CLASSIFY_PRESETS: dict[str, dict[str, Any]] = {
    "spam-quality": {"model": "gemma3-270m", "trainable": "last-two-blocks"},
}


def classify_preset(name: str | None) -> dict[str, Any]:
    """The flag values of the named `classify train` preset ({} for None)."""
    if name is None:
        return {}
    if name not in CLASSIFY_PRESETS:
        raise LlmftError(f"--preset {name!r} is not one of {', '.join(sorted(CLASSIFY_PRESETS))}")
    return dict(CLASSIFY_PRESETS[name])
