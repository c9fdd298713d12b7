"""NEFTune against transformers' own (`activate_neftune`, what TRL's `neftune_noise_alpha` runs):
the same noise on the same weights gives the same training-mode logits; none in eval mode."""

from __future__ import annotations

import pytest
import torch

from llmft.errors import LlmftError
from llmft.training.neftune import noisy_embeddings
from tests.helpers import ours_from_folder
from tests.test_gemma3 import hf_gemma3
from tests.test_weights_hf import VOCAB, hf_model

ALPHA = 5.0


def pair(kind: str, tmp_path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same random weights in transformers and llmft, in training mode without dropout (GPT-2's
    default 0.1 would draw from the generator the noise comes from)."""
    hf = hf_gemma3() if kind == "gemma3" else hf_model(kind)
    for module in hf.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf.train(), ours_from_folder(tmp_path, drop_rate=0.0).train()


def noisy_logits(run, seed: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return run()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3"])
def test_training_logits_with_noise_equal_transformers(kind, tmp_path):
    """Gemma scales its embeddings by sqrt(d): the noise must come after that scale, as in
    transformers (its hook sits on the scaled embedding module)."""
    from transformers.integrations.neftune import activate_neftune

    hf, ours = pair(kind, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    clean = noisy_logits(lambda: ours(ids))
    activate_neftune(hf, ALPHA)
    expected = noisy_logits(lambda: hf(ids).logits)
    with noisy_embeddings(ours, ALPHA):
        got = noisy_logits(lambda: ours(ids))
        assert not (got - clean).abs().max() < 1e-2  # the noise moves the logits well past the tolerance
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        ours.eval()
        torch.testing.assert_close(noisy_logits(lambda: ours(ids)), clean, atol=0, rtol=0)  # no noise in eval
        ours.train()
    torch.testing.assert_close(noisy_logits(lambda: ours(ids), seed=8), clean, atol=0, rtol=0)  # hook removed


def test_the_noise_is_bounded_by_alpha_over_sqrt_length_times_width(tmp_path):
    _, ours = pair("llama", tmp_path)
    seen = []
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with noisy_embeddings(ours, ALPHA), torch.no_grad():
        ours.blocks[0].register_forward_pre_hook(lambda block, args: seen.append(args[0]))  # runs after the noise
        ours(ids)
    with torch.no_grad():
        noise = seen[0] - ours.tok_emb(ids)
    bound = ALPHA / (17 * 64) ** 0.5
    assert noise.abs().max() <= bound * (1 + 1e-6)
    assert noise.abs().max() > 0.9 * bound  # uniform over the whole interval, not a smaller one
    assert abs(noise.mean()) < 0.05 * bound  # 2,176 draws, mean 0: std of the mean ≈ 0.012 bound


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_alpha_must_be_positive(alpha):
    from llmft.pipelines.instruction import InstructOptions

    with pytest.raises(LlmftError, match="--neftune-alpha must be a positive number"):
        InstructOptions(model="gpt2-small", out="r", neftune_alpha=alpha)
