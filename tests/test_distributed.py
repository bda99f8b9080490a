"""distributed.EpochSampler: which captions an epoch visits, in what order, on which rank."""
import pytest

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
