"""Evaluating generated responses: reference metrics (`metrics`) and LLM judges (`judge`)."""

from llmft.evaluation.judge import (
    Judge,
    JudgeReport,
    LocalJudge,
    OllamaJudge,
    OpenAIJudge,
    judge_prompt,
    judge_responses,
    parse_judge_spec,
    parse_score,
)
from llmft.evaluation.metrics import exact_match, rouge_l_f1, score_responses

__all__ = ["Judge", "JudgeReport", "LocalJudge", "OllamaJudge", "OpenAIJudge", "exact_match",
           "judge_prompt", "judge_responses", "parse_judge_spec", "parse_score", "rouge_l_f1",
           "score_responses"]
