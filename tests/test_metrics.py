import pytest

from llmft.errors import LlmftError
from llmft.evaluation.metrics import exact_match, lcs_length, rouge_l_f1, score_responses


def test_exact_match_normalises_case_and_whitespace():
    assert exact_match("  The Mouse\nwas chased. ", "the mouse was   chased.")
    assert not exact_match("The mouse was chased", "The mouse was chased.")
    assert exact_match("", "  ")


def test_lcs_length():
    assert lcs_length("abcbdab", "bdcaba") == 4  # CLRS's example
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_hand_computed():
    # pred: the cat sat on the mat (6 words); ref: the cat is on the mat (6 words)
    # LCS = the cat on the mat = 5 -> P = R = 5/6 -> F1 = 5/6
    assert rouge_l_f1("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # Lin's example: LCS("police killed the gunman", "the gunman killed police") = "the gunman"
    # = 2 of 4 words each way -> P = R = F1 = 0.5
    assert rouge_l_f1("police killed the gunman", "the gunman killed police") == pytest.approx(0.5)
    # pred: red (1); ref: the color is red (4): LCS 1 -> P = 1, R = 1/4 -> F1 = 2*0.25/1.25 = 0.4
    assert rouge_l_f1("Red!", "The color is red.") == pytest.approx(0.4)
    assert rouge_l_f1("", "anything") == 0.0
    assert rouge_l_f1("x y", "a b") == 0.0


def test_score_responses_means():
    entries = [
        {"output": "The color is red.", "model_response": "Red!"},
        {"output": "Paris", "model_response": " paris "},
    ]
    assert score_responses(entries) == {"n": 2, "exact_match": 0.5, "rouge_l_f1": pytest.approx(0.7)}


def test_score_responses_errors():
    with pytest.raises(LlmftError, match="no responses"):
        score_responses([])
    with pytest.raises(LlmftError, match="entry 1: missing or non-string 'model_response'"):
        score_responses([{"output": "a", "model_response": "a"}, {"output": "b"}])
