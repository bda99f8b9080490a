"""pretrain_encoder.py: the shapes encoder it writes loads as a ResNet state_dict and has learnt."""
import json

import torch

from encoder import Encoder
from tests.helpers import ENCODER


def test_pretrained_encoder_loads_and_learnt(shapes_data):
    report = json.loads((shapes_data / ENCODER.replace(".pt", ".json")).read_text())
    assert report["held_out_loss_after"] < report["held_out_loss_before"]
    assert set(report["held_out_accuracy"]) >= {"colour", "shape", "size"}
    enc = Encoder("resnet18", str(shapes_data / ENCODER), encoded_size=4, stages=1)
    state = torch.load(shapes_data / ENCODER, weights_only=True)
    torch.testing.assert_close(enc.net.conv1.weight, state["conv1.weight"])
