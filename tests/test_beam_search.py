"""Beam search: the same hypotheses as Hugging Face transformers' `generate(num_beams=...)` on the
same weights, and its plumbing (cache rows that follow their beams, stop strings, bad settings)."""

from __future__ import annotations

import pytest
import torch

from llmft.errors import LlmftError
from llmft.generation import (BeamSearch, beam_search_batch, beam_search_hypotheses, beam_search_tokens, generate,
                              generate_tokens)
from llmft.models import ModelConfig, build_model
from llmft.weights.huggingface import export_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CONFIG = ModelConfig(name="beam", architecture="llama", vocab_size=96, context_length=64, emb_dim=64, n_layers=2,
                     n_heads=4, n_kv_heads=2, hidden_dim=96)
PROMPTS = [[5, 17, 33, 2, 90, 41, 8], [60, 61], [12] * 11]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our model and transformers' on the same random weights, float64 (so that no near-tie
    between two beams' scores is decided by rounding)."""
    torch.manual_seed(0)
    ours = build_model(CONFIG)
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)  # peaked, context-dependent next-token distributions
    folder = tmp_path_factory.mktemp("hf")
    export_hf(ours, folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).double().eval()
    return ours.double().eval(), hf


def hf_beams(hf: torch.nn.Module, prompt: list[int], eos: list[int], **settings) -> list[int]:
    """transformers' best hypothesis, as new tokens without the stop id and the padding."""
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, early_stopping=False,
                      eos_token_id=eos, pad_token_id=eos[0], **settings)[0, len(prompt):].tolist()
    return next((out[:i] for i, t in enumerate(out) if t in eos), out)


@pytest.mark.parametrize("num_beams,length_penalty", [(2, 1.0), (4, 1.0), (4, 0.0), (3, 0.5)])
@pytest.mark.parametrize("eos", [[72, 5], [18, 77, 88]])
def test_beam_search_equals_transformers(pair, num_beams, length_penalty, eos):
    ours, hf = pair
    ended_early = 0
    for prompt in PROMPTS:
        got = beam_search_tokens(ours, prompt, num_beams=num_beams, max_new_tokens=20, eos_ids=eos,
                                 length_penalty=length_penalty)
        assert got == hf_beams(hf, prompt, eos, num_beams=num_beams, length_penalty=length_penalty,
                               max_new_tokens=20), prompt
        ended_early += len(got) < 20
    assert ended_early  # a stop id ended some best hypothesis: the scoring of finished beams counted


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_every_hypothesis_and_score_equals_transformers(pair, length_penalty):
    """The whole n-best list: transformers' `num_return_sequences=num_beams` sequences, in its
    order, and its `sequences_scores` (summed log-probability over length ** penalty). Both
    sides take float32 log-softmaxes: each of at most 21 steps rounds terms under 30 in size
    at 2 ** -23 relative, under 4e-6 a step, so the sums agree within 1e-4."""
    ours, hf = pair
    eos = [72, 5]
    for prompt in PROMPTS:
        got = beam_search_hypotheses(ours, prompt, num_beams=4, max_new_tokens=20, eos_ids=eos,
                                     length_penalty=length_penalty)
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, early_stopping=False,
                          eos_token_id=eos, pad_token_id=eos[0], num_beams=4, num_return_sequences=4,
                          length_penalty=length_penalty, max_new_tokens=20, output_scores=True,
                          return_dict_in_generate=True)
        want = [next((row[:i] for i, t in enumerate(row) if t in eos), row)
                for row in out.sequences[:, len(prompt):].tolist()]
        assert [tokens for _, tokens in got] == want, prompt
        assert [score for score, _ in got] == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)


def test_prompts_searched_together_hold_what_each_holds_alone(pair):
    """Several prompts in one batch (left padding, each search ending at its own step, one prompt
    with fewer steps before the context ends, one with none) hold the hypotheses each holds when
    searched alone. The batch's float64 logits differ from the lone ones in their last bits; cast
    to float32 for the log-softmax, a term may round one ulp apart (2 ** -23 relative, terms under
    30), so over at most 21 steps the scores agree within 1e-4, as with transformers above."""
    ours, _ = pair
    eos = [72, 5]
    prompts = [*PROMPTS, list(range(60)), list(range(64))]
    together = beam_search_batch(ours, prompts, num_beams=4, max_new_tokens=20, eos_ids=eos)
    for prompt, got in zip(prompts, together):
        alone = beam_search_hypotheses(ours, prompt, num_beams=4, max_new_tokens=20, eos_ids=eos)
        assert [tokens for _, tokens in got] == [tokens for _, tokens in alone], prompt
        assert [score for score, _ in got] == pytest.approx([score for score, _ in alone], abs=1e-4)
    assert together[-1] == [] and max(len(tokens) for _, tokens in together[-2]) <= 4
    assert len({len(hypotheses[0][1]) for hypotheses in together[:3]}) > 1  # the searches ended apart


def test_beam_search_differs_from_greedy(pair):
    """Not greedy in disguise: on these weights some prompt's best beam is not the greedy path."""
    ours, _ = pair
    greedy = generate_tokens(ours, PROMPTS, max_new_tokens=20, eos_ids=[7])
    beams = [beam_search_tokens(ours, p, num_beams=4, max_new_tokens=20, eos_ids=[7]) for p in PROMPTS]
    assert greedy != beams


def test_finished_hypotheses_and_stopping():
    """By hand: a beam that ends among the first `num_beams` candidates is held with its
    length-normalised score; the search stops when no live beam can beat the held ones."""
    search = BeamSearch(num_beams=2, max_new_tokens=10, eos_ids=[0], length_penalty=1.0)
    logp = torch.tensor([[0.6, 0.3, 0.1]]).log()
    assert search.advance(logp) == [0, 0]  # token 0 ends a hypothesis (rank 0); tokens 1 and 2 go on
    assert [t for t, _ in search.beams] == [[1], [2]]
    assert search.hypotheses == [(pytest.approx(float(torch.tensor(0.6).log())), [])]
    rows = search.advance(torch.tensor([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]]).log())
    # both beams end: scores log(0.3*0.9)/2 and log(0.1*0.9)/2; the held ones beat every live beam
    assert rows == []
    assert [t for _, t in search.hypotheses] == [[], [1]]


def test_a_stop_string_ends_a_beam_with_its_tokens():
    search = BeamSearch(num_beams=1, max_new_tokens=10, eos_ids=[0], is_done=lambda tokens: tokens[-1] == 2)
    assert search.advance(torch.tensor([[0.1, 0.2, 0.7]]).log()) == []  # the best candidate is done
    assert search.hypotheses[0][1] == [2]  # a stop string's tokens stay (the text is cut), a stop id's do not


class Digits:
    """A tokenizer whose token i is the text "<i>"."""
    eos_id = 7

    def encode(self, text):
        return [int(t) for t in text.strip("<>").split("><")]

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_generate_with_beams(pair):
    ours, _ = pair
    full = beam_search_tokens(ours, PROMPTS[0], num_beams=3, max_new_tokens=12, eos_ids=[7])
    texts = generate(ours, Digits(), PROMPTS, num_beams=3, max_new_tokens=12, batch_size=2)
    assert texts[0] == Digits().decode(full)
    stop = Digits().decode(full[2:3])
    ended = beam_search_tokens(ours, PROMPTS[0], num_beams=3, max_new_tokens=12, eos_ids=[7],
                               is_done=lambda tokens: stop in Digits().decode(tokens))
    cut = generate(ours, Digits(), [PROMPTS[0]], num_beams=3, max_new_tokens=12, stop_strings=[stop])[0]
    assert cut == Digits().decode(ended).split(stop)[0] and stop not in cut
    with pytest.raises(LlmftError, match="num-beams must be at least 1"):
        generate(ours, Digits(), [PROMPTS[0]], num_beams=0)
    with pytest.raises(LlmftError, match="takes no --temperature"):
        generate(ours, Digits(), [PROMPTS[0]], num_beams=2, temperature=0.7)


def test_prompt_at_the_context_end_gets_no_new_tokens(pair):
    ours, _ = pair
    assert beam_search_tokens(ours, list(range(64)), num_beams=2, max_new_tokens=5) == []
    assert len(beam_search_tokens(ours, list(range(60)), num_beams=2, max_new_tokens=9, eos_ids=[999])) == 4
