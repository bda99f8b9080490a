"""What defines a model (`ModelConfig`), the registry of the decoders (`DECODERS`: decoders.py's two
LSTMs, transformer.py's Transformer) and building a decoder. The encoder is in encoder.py, the loss in
objectives.py. The code asks a decoder's class what it has (decoders.Decoder's attributes: maps, hard
attention, ...), never its name.
"""
from dataclasses import asdict, dataclass, field, fields

from decoders import AttentionDecoder, RNNDecoder
from transformer import TransformerDecoder
from utils import InputError


@dataclass(frozen=True)
class ModelConfig:
    """The config keys that define a model's weights, and only those: every checkpoint saves them
    (`model`), and a resumed run or an --init_from run must ask for the same. Training settings
    (dropout, learning rates, ...) are not here. config.py takes these keys' bounds from the metadata,
    so adding a field here is all a new model setting needs besides its line in configs/default.yaml.
    Every field has configs/default.yaml's default (tested), so that a checkpoint written before a
    field existed loads with the value its model had."""
    decoder: str = "attention"  # a name of DECODERS (config.py takes the choices from there)
    encoder: str = "resnet101"  # resnet18 ... resnet152 (load_resnet checks the name)
    encoder_stages: int = field(default=4, metadata={"choices": (1, 2, 3, 4)})  # ResNet stages kept
    encoded_size: int = field(default=14, metadata={"min": 1})
    coord_channels: bool = False
    emb_dim: int = field(default=512, metadata={"min": 1})
    decoder_dim: int = field(default=512, metadata={"min": 1})
    attention_dim: int = field(default=512, metadata={"min": 1})
    attend_after_word: bool = False
    attention_gate: bool = True
    attention_cell_positions: bool = False
    transformer_layers: int = field(default=3, metadata={"min": 1})
    transformer_heads: int = field(default=8, metadata={"min": 1})
    transformer_dim: int = field(default=512, metadata={"min": 1})
    transformer_ff_dim: int = field(default=2048, metadata={"min": 1})
    transformer_positions: int = field(default=64, metadata={"min": 2})
    transformer_cell_positions: bool = True

    @classmethod
    def of(cls, cfg):
        """The model part of a flat run config (a checkpoint's config may predate some fields)."""
        return cls(**{f.name: cfg.get(f.name, f.default) for f in fields(cls)})

    @classmethod
    def of_checkpoint(cls, ckpt):
        """What a checkpoint's model is (from its config for checkpoints written before `model`)."""
        return cls(**ckpt["model"]) if "model" in ckpt else cls.of(ckpt["config"])

    @property
    def decoder_class(self):
        return decoder_class(self.decoder)

    def differences(self, other):
        """[(key, this value, the other's value)] where the two differ."""
        mine, theirs = asdict(self), asdict(other)
        return [(k, mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]]


# A model of every decoder that trains in seconds on the CPU: the one table of tiny sizes (the tests' models,
# bench.py --tiny).
TINY = {"encoder": "resnet18", "encoder_stages": 1, "encoded_size": 4, "emb_dim": 16, "decoder_dim": 32,
        "attention_dim": 16, "transformer_layers": 2, "transformer_heads": 2, "transformer_dim": 16,
        "transformer_ff_dim": 32}
WIDTHS = ("emb_dim", "decoder_dim", "attention_dim", "transformer_dim", "transformer_ff_dim")

DECODERS = {"rnn": RNNDecoder, "attention": AttentionDecoder, "transformer": TransformerDecoder}


def decoder_class(name):
    """The decoder class a config's `decoder` names; an unknown name is an error, never a fallback."""
    if name not in DECODERS:
        raise InputError(f"unknown decoder {name!r}: use {', '.join(DECODERS)}")
    return DECODERS[name]


def build_decoder(model, vocab_size, encoder_dim, dropout=0.0, hard_inference="expected"):
    """The decoder of a ModelConfig, decoding the way `hard_inference` says (hard attention only)."""
    decoder = model.decoder_class.build(model, vocab_size, encoder_dim, dropout)
    decoder.set_inference(hard_inference)
    return decoder
