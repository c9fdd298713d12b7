from llmft.data.batching import LengthGroupedSampler


def test_every_example_once_and_similar_lengths_together():
    lengths = [(i * 37) % 100 + 1 for i in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 125
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # a plain random order pads ~1.7x here
    assert list(sampler) != batches  # a new order every epoch


def test_drop_last_keeps_full_batches_only():
    batches = list(LengthGroupedSampler(list(range(1, 21)), batch_size=8, seed=1, drop_last=True))
    assert [len(b) for b in batches] == [8, 8]
