import pytest
import torch

from llmft.errors import LlmftError
from llmft.models import build_model
from llmft.training.freezing import apply_trainable, count_parameters, first_trainable_block
from llmft.training.heads import CLASS_TOKENS, SequenceClassifier, last_position, pool_mean


def test_pooling_reads_last_real_token():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    lengths = torch.tensor([2, 4])
    assert hidden[[0, 1], last_position(lengths, 4)].flatten().tolist() == [1.0, 7.0]
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


@pytest.mark.parametrize("class_token", CLASS_TOKENS)
@pytest.mark.parametrize("arch", ["tiny_gpt2_config", "tiny_llama_config"])
def test_last_block_at_the_pooled_token_only_equals_the_full_computation(arch, class_token, request):
    """The classifier runs its last block on one position; the full model's states at every
    position, then pooled, must give the same logits and the same gradients."""
    torch.manual_seed(0)
    clf = SequenceClassifier(build_model(request.getfixturevalue(arch)), num_classes=3, class_token=class_token)
    ids, lengths = torch.randint(0, 100, (3, 7)), torch.tensor([7, 2, 5])
    b = clf.backbone

    def reference():
        hidden = b.hidden_states(ids)
        if class_token == "mean":
            return b.out_head(pool_mean(hidden, lengths))
        token = {"last": lengths - 1, "last-padded": torch.full_like(lengths, 6), "first": 0 * lengths}[class_token]
        return b.out_head(hidden[torch.arange(3), token])

    def logits_and_grads(forward):
        clf.zero_grad()
        logits = forward()
        logits.square().sum().backward()
        return logits, [p.grad.clone() for p in b.blocks[-1].parameters()]

    pruned = logits_and_grads(lambda: clf(ids, lengths))
    full = logits_and_grads(reference)
    clf.token_only_last_block = False  # what --book-compat runs
    torch.testing.assert_close(pruned, full)
    torch.testing.assert_close(logits_and_grads(lambda: clf(ids, lengths)), full)


@pytest.mark.parametrize("arch", ["tiny_gpt2_config", "tiny_llama_config"])
def test_run_blocks_keep_with_a_mask_and_a_cache(arch, request):
    """`keep` also composes with left-padding masks and a key/value cache prefix (generation)."""
    torch.manual_seed(0)
    model = build_model(request.getfixturevalue(arch)).eval()
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False  # row 1 is left-padded by two tokens
    mask[1, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # padding attends to itself only
    positions = model.default_positions(ids, None)
    x = model.embed(ids, positions)
    keep = torch.tensor([[8, 3], [5, 8]])
    full = model.run_blocks(x, positions, mask)
    torch.testing.assert_close(model.run_blocks(x, positions, mask, keep=keep),
                               full[torch.arange(2)[:, None], keep])
    model.set_kv_cache(2, 9)
    model.run_blocks(x[:, :4], positions[:, :4], cache_pos=0)
    in_chunk = torch.tensor([[4, 0], [1, 4]])  # of the 5 tokens after the 4 cached ones
    cached = model.run_blocks(x[:, 4:], positions[:, 4:], cache_pos=4, keep=in_chunk)
    causal = model.run_blocks(x, positions)
    torch.testing.assert_close(cached, causal[torch.arange(2)[:, None], in_chunk + 4])


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
