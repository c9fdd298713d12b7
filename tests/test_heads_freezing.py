import pytest
import torch

from llmft.errors import LlmftError
from llmft.models import build_model
from llmft.training.freezing import apply_trainable, count_parameters, first_trainable_block
from llmft.training.heads import SequenceClassifier, pool_last, pool_mean


def test_pooling_reads_last_real_token():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    lengths = torch.tensor([2, 4])
    assert pool_last(hidden, lengths).flatten().tolist() == [1.0, 7.0]
    assert pool_mean(hidden, lengths).flatten().tolist() == [0.5, 5.5]


@pytest.mark.parametrize("arch", ["tiny_gpt2_config", "tiny_llama_config"])
def test_padding_does_not_change_the_last_token_logits(arch, request):
    torch.manual_seed(0)
    clf = SequenceClassifier(build_model(request.getfixturevalue(arch)), num_classes=3).eval()
    ids = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0]])
    a = clf(ids, torch.tensor([3]))
    b = clf(padded, torch.tensor([3]))
    assert a.shape == (1, 3)
    torch.testing.assert_close(a, b)


def test_forward_from_equals_full_forward(tiny_llama_config):
    torch.manual_seed(0)
    clf = SequenceClassifier(build_model(tiny_llama_config), num_classes=2).eval()
    ids, lengths = torch.randint(0, 100, (2, 6)), torch.tensor([6, 4])
    b = clf.backbone
    pos = b.default_positions(ids, None)
    hidden = b.run_blocks(b.embed(ids, pos), pos, stop=1)
    torch.testing.assert_close(clf.forward_from(hidden, lengths, start_layer=1), clf(ids, lengths))


@pytest.mark.parametrize("policy, first, trainable_names", [
    ("head", 2, {"out_head"}),
    ("last-block", 1, {"blocks.1", "final_norm", "out_head"}),
    ("last-two-blocks", 0, {"blocks.0", "blocks.1", "final_norm", "out_head"}),
    ("all", 0, {"tok_emb", "pos_emb", "blocks.0", "blocks.1", "final_norm", "out_head"}),
])
def test_trainable_policies(tiny_gpt2_config, policy, first, trainable_names):
    clf = SequenceClassifier(build_model(tiny_gpt2_config), num_classes=2)
    apply_trainable(clf.backbone, policy)
    names = {n for n, p in clf.backbone.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] if not n.startswith("blocks") else ".".join(n.split(".")[:2]) for n in names} \
        == trainable_names
    assert first_trainable_block(clf.backbone) == first
    trainable, total = count_parameters(clf)
    assert 0 < trainable <= total


def test_unknown_policy(tiny_gpt2_config):
    with pytest.raises(LlmftError, match="unknown --trainable 'some'"):
        apply_trainable(build_model(tiny_gpt2_config), "some")
