"""The offline pretrained model through the CLI (loads the real 135M GGUF: a few seconds)."""

import pytest

from llmft.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("prepack", ["--prepack", "--no-prepack"])
def test_chat_with_the_offline_model(capsys, prepack):
    assert main(["generate", "--model", "smollm2-135m-instruct", "What is the capital of France?",
                 "--max-new-tokens", "20", "--device", "cpu", prepack]) == 0
    assert capsys.readouterr().out.strip() == "The capital of France is Paris."
