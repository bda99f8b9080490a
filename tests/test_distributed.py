"""distributed.EpochSampler: which captions an epoch visits, in what order, on which rank."""
import pytest
import torch

from distributed import EpochSampler


@pytest.mark.parametrize("per_image,batch_size", [(0, 10), (2, 4)])
def test_grouped_items_are_one_image_with_its_captions(per_image, batch_size):
    """group_by_image: each item is the k captions of one image; an epoch visits every image once,
    with the captions the ungrouped sampler visits."""
    grouped = list(EpochSampler(10, 5, 3, per_image, batch_size, grouped=True))
    k = per_image or 5
    assert all(len(g) == k and len({c // 5 for c in g}) == 1 for g in grouped)
    assert sorted(g[0] // 5 for g in grouped) == list(range(10))
    assert sorted(c for g in grouped for c in g) == sorted(EpochSampler(10, 5, 3, per_image, batch_size))


def test_grouped_ranks_take_the_global_batch_between_them():
    one = list(EpochSampler(10, 5, 3, 2, batch_size=8, grouped=True))  # 4 images a batch
    ranks = [list(EpochSampler(10, 5, 3, 2, batch_size=4, rank=r, world=2, grouped=True)) for r in range(2)]
    assert len(one) == 8 and [len(r) for r in ranks] == [4, 4]  # the last incomplete global batch is dropped
    for b in range(2):  # every global batch: rank 0's and rank 1's images are the single process's
        assert sorted(ranks[0][2 * b: 2 * b + 2] + ranks[1][2 * b: 2 * b + 2]) == sorted(one[4 * b: 4 * b + 4])


def test_grouped_resume_continues_where_it_stopped():
    whole = EpochSampler(10, 5, 3, 2, batch_size=4, grouped=True)
    whole.set_epoch(2)
    resumed = EpochSampler(10, 5, 3, 2, batch_size=4, grouped=True)
    resumed.set_epoch(2, start=8)  # 8 captions, 4 images, consumed before the stop
    assert list(resumed) == list(whole)[4:] and len(resumed) == len(whole) - 4


def lengths_of(n, seed=0):
    return torch.randint(3, 25, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grouped", [False, True])
def test_length_pools_visit_the_same_captions_in_batches_of_similar_length(grouped):
    """length_pool: the epoch visits what the random batches visit, each batch of similar lengths, and
    far less padding (the word steps a batch runs past each caption's end)."""
    lengths = lengths_of(200 * 5)
    plain = list(EpochSampler(200, 5, 3, 2, batch_size=8, grouped=grouped))
    pooled = list(EpochSampler(200, 5, 3, 2, batch_size=8, grouped=grouped, lengths=lengths, length_pool=50))
    assert sorted(plain) == sorted(pooled)

    def padding(order):
        batches = torch.tensor(order).view(-1, 8)  # captions: 4 images x 2 when grouped
        return int((lengths[batches].amax(1, keepdim=True) - lengths[batches]).sum())
    # grouped: an image's captions stay together, so what they differ among themselves stays padding
    assert padding(pooled) < padding(plain) / (1.5 if grouped else 4)
    longest = [int(lengths[torch.tensor(b)].max()) for b in torch.tensor(pooled).view(-1, 8).tolist()]
    assert len(set(longest)) > 5  # the batches are shuffled: not one long sorted run
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


@pytest.mark.parametrize("grouped", [False, True])
def test_length_pools_shard_the_global_batch_and_resume_where_they_stopped(grouped):
    lengths = lengths_of(40 * 5, seed=1)
    one = list(EpochSampler(40, 5, 3, 2, batch_size=8, grouped=grouped, lengths=lengths, length_pool=3))
    ranks = [list(EpochSampler(40, 5, 3, 2, batch_size=4, rank=r, world=2, grouped=grouped, lengths=lengths,
                               length_pool=3)) for r in range(2)]
    per = 2 if grouped else 4  # items of a rank's batch
    assert len(ranks[0]) == len(ranks[1]) == len(one) // 2
    for b in range(len(one) // (2 * per)):
        assert sorted(ranks[0][b * per:(b + 1) * per] + ranks[1][b * per:(b + 1) * per]) == \
            sorted(one[2 * per * b: 2 * per * (b + 1)])
    whole = EpochSampler(40, 5, 3, 2, batch_size=4, grouped=grouped, lengths=lengths, length_pool=3)
    whole.set_epoch(1)
    resumed = EpochSampler(40, 5, 3, 2, batch_size=4, grouped=grouped, lengths=lengths, length_pool=3)
    resumed.set_epoch(1, start=12)  # three batches of 4 captions consumed before the stop
    assert list(resumed) == list(whole)[12 // (2 if grouped else 1):]
    other = EpochSampler(40, 5, 3, 2, batch_size=4, grouped=grouped, lengths=lengths, length_pool=3)
    other.set_epoch(2)
    assert list(other) != list(whole)  # each epoch its own batches
