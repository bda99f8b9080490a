"""Self-critical sequence training (Rennie et al. 2017): the loss of one micro-batch.

Sample scst_samples captions per image through the step API, score each with CIDEr-D against the
image's TRAIN references (document frequencies from all TRAIN references, computed once), and push
up the log-probability of the captions that beat a baseline:

    loss = -(reward - baseline) x (sum of the sampled words' log-probabilities, <end> included)

averaged over every sample of the optimiser step (all micro-batches, all ranks). The baseline is the
mean reward of the image's other samples (Luo 2020, `mean`) or its greedy caption's reward (`greedy`).
"""
import torch
from torch import nn

from metrics import CiderD
from models import greedy, sample


def train_references(dataset):
    """Per TRAIN image, its encoded captions as tuples of word ids (without <start>, <end>, <pad>)."""
    captions, lengths = dataset.captions.tolist(), dataset.caplens.tolist()
    return [[tuple(captions[i][1:lengths[i] - 1]) for i in range(img * dataset.cpi, (img + 1) * dataset.cpi)]
            for img in range(dataset.num_images)]


class Reward:
    """CIDEr-D of sampled captions (word ids) against the TRAIN references of their images."""

    def __init__(self, references):
        self.references = references
        self.cider = CiderD(references)

    def __call__(self, captions, images):
        """captions: word-id sequences without <end>; images: their TRAIN indices -> rewards (float64)."""
        return torch.tensor(self.cider.score(captions, [self.references[i] for i in images]), dtype=torch.float64)


def scst_loss(run, features, images, reward, norm):
    """The loss of one micro-batch (features: B x P x D, images: their B TRAIN indices) divided by
    `norm`, the samples of the whole step; and the RewardSums of its samples."""
    cfg, k = run.cfg, run.cfg["scst_samples"]
    for m in run.decoder.modules():  # the plain decoder's initial-state BatchNorm would see k copies of each image
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    out = sample(run.decoder, features, run.vocab, k, cfg["scst_max_len"])  # R = B x k rows
    sampled = [s[: n - 1] for s, n in zip(out.seqs.tolist(), out.lengths.tolist(), strict=True)]
    r = reward(sampled, images.repeat_interleave(k).tolist()).view(-1, k)  # B x k
    if cfg["scst_baseline"] == "mean":
        baseline = (r.sum(1, keepdim=True) - r) / (k - 1)
    else:
        was_training = run.decoder.training
        run.decoder.eval()
        with torch.no_grad():
            g = greedy(run.decoder, features.detach(), run.vocab, cfg["scst_max_len"])
        run.decoder.train(was_training)
        baseline = reward([s[:-1] for s in g.seqs], images.tolist()).view(-1, 1).expand(-1, k)  # without <end>
    advantage = (r - baseline).flatten().to(out.logprob.device, torch.float32)
    loss = -(advantage * out.logprob).sum() / norm
    sums = torch.stack([r.sum(), baseline.sum(), (out.lengths - 1).sum().double().cpu(),
                        out.ended.sum().double().cpu(), torch.tensor(float(r.numel()), dtype=torch.float64)])
    return loss, sums
