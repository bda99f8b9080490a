"""The encoder: a ResNet trunk (ImageNet weights, or the small one pretrained for the shapes data)
that turns uint8 images into a grid of features B x P x D, built from a ModelConfig; `features_of` is
the one path from images (or the feature cache's grids) to the decoders' features. torchvision is
imported only where a ResNet is built.
"""
import os
from collections import OrderedDict

import torch
from torch import nn

from utils import InputError

TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_resnet(arch, weights):
    """A torchvision ResNet with weights 'imagenet' (downloaded once into $TORCH_HOME), 'none', or a
    path to a saved ResNet state_dict (keys of layers the encoder drops may be missing)."""
    import torchvision  # here: its import takes 2 s, which a script that builds no encoder need not wait for
    if not hasattr(torchvision.models, arch) or not arch.startswith("resnet"):
        raise InputError(f"unknown encoder {arch!r}: use resnet18, resnet34, resnet50, resnet101 or resnet152")
    net = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        try:
            state = enum.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # offline: URLError, or a half-downloaded file failing its hash
            name = os.path.basename(enum.url)
            hub = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise InputError(
                f"cannot download the ImageNet weights of {arch} ({type(e).__name__}: {e}). Fetch {enum.url} "
                f"on a machine with internet (file {name}, sha256 starting {name.split('-')[-1][:8]}) and put "
                f"it in {hub}, or pass --encoder_weights /path/to/{name}") from None
        net.load_state_dict(state)
    elif weights not in (None, "none"):
        if not os.path.isfile(weights):
            raise InputError(f"encoder weights {weights} not found: give a ResNet state_dict file, "
                             "'imagenet' or 'none'")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"{weights} is not a loadable state_dict ({type(e).__name__}: {e})") from None
        result = net.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise InputError(f"{weights} does not fit {arch}: unexpected keys such as "
                             f"{result.unexpected_keys[0]}")
        return net, set(result.missing_keys)
    return net, set()


class Encoder(nn.Module):
    """ResNet trunk (conv1 .. layer{stages}) + adaptive average pooling to a grid.

    Takes uint8 images B x 3 x H x W and normalises them itself, so every caller feeds the same
    thing. Returns B x P x D features, P = encoded_size ** 2 grid cells, D = the last stage's width
    (2048 for resnet101 with 4 stages), plus 2 when `coords` appends each cell's x and y in [-1, 1]:
    pooled ResNet features hardly say where a cell is, and words like "left of" need it."""

    def __init__(self, arch="resnet101", weights="imagenet", encoded_size=14, stages=4, coords=False):
        super().__init__()
        if stages not in (1, 2, 3, 4):
            raise InputError(f"encoder_stages must be 1 to 4, got {stages}")
        resnet, missing = load_resnet(arch, weights)
        # Named like torchvision's ResNet, so self.net.state_dict() is itself a (partial) ResNet state_dict.
        names = TRUNK[: 4 + stages]
        self.net = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in names))
        layers = list(self.net.children())[4:]
        kept = tuple(f"{name}." for name in names)
        lost = sorted(k for k in missing if k.startswith(kept))
        if lost:
            raise InputError(f"{weights} lacks weights the encoder needs, such as {lost[0]}")
        self.pool = nn.AdaptiveAvgPool2d(encoded_size)
        self.dim = [m for m in layers[-1].modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
        self.coords = coords
        if coords:
            self.dim += 2
            ramp = torch.linspace(-1, 1, encoded_size)
            grid = torch.stack([ramp.expand(encoded_size, -1), ramp[:, None].expand(-1, encoded_size)])
            self.register_buffer("grid", grid.flatten(1).t().contiguous(), persistent=False)  # P x 2 (x, y)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.fine_tune(False)

    def fine_tune(self, on=True):
        """Train conv blocks 2-4 (layer2..layer4) or nothing; the stem and layer1 stay frozen, as in
        the reference experiment."""
        if on and len(self.net) < 6:
            raise InputError("fine_tune_encoder: true trains ResNet blocks 2-4, but encoder_stages 1 keeps none")
        for p in self.net.parameters():
            p.requires_grad = False
        for block in list(self.net.children())[5:]:
            for p in block.parameters():
                p.requires_grad = on
        self.train(self.training)

    def train(self, mode=True):
        # Frozen blocks stay in eval mode: their BatchNorm statistics must not drift in training.
        self.training = mode
        for block in self.net.children():
            block.train(mode and any(p.requires_grad for p in block.parameters()))
        return self

    @property
    def frozen(self):
        return not any(p.requires_grad for p in self.parameters())

    def trunk(self, images):
        """uint8 images B x 3 x H x W -> the last stage's grid B x C x h x w (h = H / 32 for 4 stages)."""
        return self.net((images.float() - self.mean) / self.std)

    def head(self, grid):
        """A grid B x C x g x g (the trunk's, or read from the feature cache) -> the decoders' features
        B x P x D: pooled to encoded_size x encoded_size cells, each cell's x, y appended."""
        # channels-last: the pooling kernel is 3x faster so, and B x P x C comes out without a copy
        x = self.pool(grid.contiguous(memory_format=torch.channels_last)).flatten(2).transpose(1, 2)  # B x P x C
        if self.coords:
            x = torch.cat([x, self.grid.to(x.dtype).expand(x.size(0), -1, -1)], dim=2)  # B x P x (C + 2)
        return x

    def forward(self, images):
        return self.head(self.trunk(images))

    def cache_grid(self, images):
        """What the feature cache keeps of uint8 images: the trunk's own grid (ResNet-101 at 256 px: 8 x 8,
        a third of the 14 x 14 cells pooling spreads it over), or the pooled grid where the trunk's is
        larger; head() of it is forward() of the images. B x C x g x g."""
        grid = self.trunk(images)
        if grid.shape[2] * grid.shape[3] > self.pool.output_size ** 2:
            grid = self.pool(grid)
        return grid


def build_encoder(model, weights="none"):
    """The Encoder of a ModelConfig, with `weights` (imagenet | none | a ResNet state_dict file)."""
    return Encoder(model.encoder, weights, model.encoded_size, model.encoder_stages, model.coord_channels)


def features_of(encoder, images):
    """Encoder features B x P x D of uint8 images B x 3 x H x W, with a graph only where the encoder
    trains; or of the feature cache's grids (float16 B x C x g x g, Encoder.cache_grid), pooled here."""
    if images.dtype != torch.uint8:
        return encoder.head(images.float())
    with torch.set_grad_enabled(torch.is_grad_enabled() and not encoder.frozen):
        return encoder(images)
