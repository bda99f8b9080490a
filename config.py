"""The run configuration: configs/default.yaml holds every key with its default and a comment; a YAML
file (--config) and --key value pairs overlay it, each value checked against the default's type.

Paths in a config (data_folder, encoder_weights, out, init files) are used as written: a relative
path is relative to the folder the command runs in, at the time it runs.
"""
import argparse
import difflib
import os
import re
from dataclasses import fields

from models import DECODERS, ModelConfig, decoder_class
from utils import ArgumentParser, InputError, at_least, atomic_path, one_spelling, option_key

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
MODEL_FIELDS = fields(ModelConfig)  # the model's keys bring their own bounds
CHOICES = {  # decoder's choices are DECODERS' names when a value is checked (a decoder registered later counts)
    **{f.name: f.metadata["choices"] for f in MODEL_FIELDS if "choices" in f.metadata},
    "device": ("auto", "cpu", "cuda"),
    "amp_dtype": ("float16", "bfloat16"),
    "early_stop_metric": ("bleu4", "loss"),
    "lr_schedule": ("constant", "cosine"),
    "cache_features": ("auto", True, False),
    "objective": ("xe", "scst"),
    "scst_baseline": ("mean", "greedy"),
    "attention": ("soft", "hard"),
    "hard_estimator": ("reinforce", "loo", "gumbel"),
    "hard_inference": ("expected", "argmax"),
}
AT_LEAST = {**{f.name: f.metadata["min"] for f in MODEL_FIELDS if "min" in f.metadata},
            "batch_size": 1, "accumulation_steps": 1, "epochs": 0, "max_steps": 0, "workers": 0,
            "train_captions_per_image": 0, "length_pool": 0, "val_beam_size": 1, "max_decode_len": 1, "patience": 0,
            "lr_decay_patience": 0, "max_nonfinite_steps": 1, "checkpoint_every": 0, "log_every": 1,
            "val_max_images": 0, "scst_samples": 1, "scst_max_len": 1, "hard_sample_p": 0.0, "hard_lambda_r": 0.0,
            "hard_lambda_e": 0.0, "hard_samples": 1, "hard_tau": 0.0,
            "decoder_lr": 0.0, "encoder_lr": 0.0, "grad_clip": 0.0, "alpha_c": 0.0, "dropout": 0.0,
            "label_smoothing": 0.0}  # besides these, each decoder class's training_bounds
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
# What says where and how a run ran, not what it is: runs whose configs differ only in these keys are
# seeds of one experiment (compare.py --group refuses any other difference).
RUN_KEYS = ("seed", "out", "init_from", "workers", "device", "log_every", "checkpoint_every", "tensorboard")


def read_yaml(path):
    import yaml
    if not os.path.isfile(path):
        raise InputError(f"config file {path} not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold key: value pairs")
    return data


def default_config():
    return read_yaml(os.path.join(CONFIG_DIR, "default.yaml"))


def choices(key):
    """The values a key may take (None: any of its type)."""
    return tuple(DECODERS) if key == "decoder" else CHOICES.get(key)


def lowest(key):
    """The least value a key may take (None: no bound): config.AT_LEAST's, a ModelConfig field's, or the
    training_bounds of the decoder class whose key it is."""
    bounds = {k: v for cls in DECODERS.values() for k, v in cls.training_bounds.items()} | AT_LEAST
    return bounds.get(key)


def _coerce(key, value, default, source):
    """`value` (from YAML, or a string from the command line) as the type of the default."""
    kind = type(default)
    allowed, low = choices(key), lowest(key)
    if key == "cache_features" and isinstance(value, str) and value.lower() in TRUE + FALSE:
        value = value.lower() in TRUE  # cache_features: true on the command line
    try:
        if kind is bool and isinstance(value, str) and value.lower() in TRUE + FALSE:
            value = value.lower() in TRUE
        elif kind is int and isinstance(value, str):
            value = int(value)
        elif kind is float and isinstance(value, str | int) and not isinstance(value, bool):
            value = float(value)
        elif default is None and isinstance(value, str) and value.lower() in ("null", "none", ""):
            value = None
    except ValueError:
        pass
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if allowed:
        ok = True  # checked against the choices below
    elif default is None:
        ok = value is None or isinstance(value, str)
    if not ok:
        expected = "a string or null" if default is None else "true or false" if kind is bool else kind.__name__
        raise InputError(f"{source}: {key} must be {expected}, got {value!r}")
    if allowed and value not in allowed:
        raise InputError(f"{source}: {key} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    if low is not None and value < low or key.endswith("_lr") and value <= 0:
        bound = "> 0" if key.endswith("_lr") else f">= {low}"
        raise InputError(f"{source}: {key} must be {bound}, got {value!r}")
    return value


def merge_config(cfg, updates, source):
    """cfg with `updates` applied; unknown keys and wrong types are InputErrors naming `source`."""
    cfg = dict(cfg)
    defaults = default_config()
    for key, value in updates.items():
        key = option_key(key)
        if key not in defaults:
            near = difflib.get_close_matches(key, defaults, n=1)
            raise InputError(f"{source}: unknown config key {key!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                             + " (configs/default.yaml lists them)")
        cfg[key] = _coerce(key, value, defaults[key], source)
    return cfg


def dump_yaml(cfg, path):
    import yaml
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def config_keys():
    """[title, its comment's further lines, [(key, default as written, comment)]] for each section of
    configs/default.yaml, in its order: what train.py's command line is made of."""
    sections, key = [], None
    with open(os.path.join(CONFIG_DIR, "default.yaml")) as f:
        text = f.read().split("\n\n", 1)[1]  # after the file's own header
    for line in text.splitlines():
        entry = re.match(r"^(\w+):\s*(.*?)\s*(?:#\s*(.*))?$", line)
        if line.startswith("# ") and sections and not sections[-1][2]:  # a section's title, continued
            sections[-1][1] += line[2:] + " "
        elif line.startswith("# "):
            sections.append([line[2:], "", []])
        elif entry:
            key, value, comment = entry.groups()
            if key == "decoder":  # the registry's names, whatever decoders it holds when asked
                comment = f"{comment}: {' | '.join(DECODERS)}"
            sections[-1][2].append([key, value, comment or ""])
        elif re.match(r"^\s+#", line) and key:  # a comment continued on the next line
            sections[-1][2][-1][2] += " " + line.strip().lstrip("# ")
    return sections


def train_parser(usage):
    """train.py's argparse parser, made from configs/default.yaml: a --KEY VALUE option per key (its
    default shown, its comment the help), besides --config, --resume and --overwrite. Values are strings
    here; merge_config gives each the type of its default and checks its bounds."""
    p = ArgumentParser(prog="train.py", usage="train.py [--config FILE] [--resume CHECKPOINT] [--overwrite] "
                       "[--KEY VALUE ...]", description=usage, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False, spellings=False)
    p.add_argument("--config", metavar="FILE", help="a YAML file of key: value pairs over configs/default.yaml")
    p.add_argument("--resume", metavar="CHECKPOINT", help="a run's last.pt (or best.pt): continue it in its folder")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    for title, more, keys in config_keys():
        group = p.add_argument_group(title, more.strip() or None)
        for key, value, comment in keys:
            group.add_argument(f"--{key}", default=argparse.SUPPRESS, metavar=value or "null",
                               help=comment.replace("%", "%%"))
    return p


def parse_train_args(argv, usage=""):
    """train.py's command line -> ({key: value as given}, --config, --resume, --overwrite); a key
    configs/default.yaml does not have is refused with the nearest one."""
    p = train_parser(usage)
    args, unknown = p.parse_known_args(one_spelling(argv))
    for arg in unknown:
        if arg.startswith("--"):
            merge_config(default_config(), {arg[2:].split("=")[0]: None}, "command line")  # says the nearest key
        p.error(f"unexpected argument {arg!r}: options are --key value")
    given = {k: v for k, v in vars(args).items() if k not in ("config", "resume", "overwrite")}
    return given, args.config, args.resume, args.overwrite


def resolve_config(argv, usage=""):
    """train.py's command line -> (config, checkpoint to resume or None, checkpoint a new run starts
    from (--init_from) or None, --overwrite given); --help prints `usage` and every config key.

    default.yaml (or the resumed checkpoint's config) <- --config FILE <- --key value. A resumed run
    continues in the folder that holds its checkpoint, whatever folder the checkpoint's config names
    (the run may have been copied or moved since), unless --out says otherwise."""
    from checkpoint import check_resumable, load_checkpoint
    pairs, config_file, resume, overwrite = parse_train_args(argv, usage)
    ckpt = load_checkpoint(resume) if resume else None
    from_file = {option_key(k): v for k, v in read_yaml(config_file).items()} if config_file else {}
    # init_from means the same from the command line or a config file: the new run starts from that
    # checkpoint's weights and settings, then the config file and --key value change the settings.
    init_path = None if ckpt else pairs.get("init_from", from_file.get("init_from"))
    init = load_checkpoint(init_path) if init_path else None
    cfg = default_config()
    if ckpt:
        cfg = merge_config(cfg, ckpt["config"], resume)
        cfg["out"] = os.path.dirname(resume) or "."
    elif init:
        cfg = merge_config(cfg, {**init["config"], "out": None}, init_path)
    cfg = merge_config(cfg, from_file, config_file)
    cfg = merge_config(cfg, pairs, "command line")
    if ckpt:
        check_resumable(ckpt, cfg, resume)
    if cfg["objective"] == "scst" and not (ckpt or cfg["init_from"]):
        raise InputError("objective scst fine-tunes a cross-entropy model: give --init_from runs/NAME/best.pt")
    if cfg["objective"] == "scst" and cfg["scst_baseline"] == "mean" and cfg["scst_samples"] < 2:
        raise InputError(f"scst_baseline mean averages the other samples of each image: it needs scst_samples >= 2 "
                         f"(got {cfg['scst_samples']}), or use scst_baseline greedy")
    decoder_class(cfg["decoder"]).check_config(cfg)
    if cfg["attention"] == "hard" and cfg["hard_estimator"] == "loo" and cfg["hard_samples"] < 2:
        raise InputError(f"hard_estimator loo takes each draw's baseline from the other draws: it needs hard_samples "
                         f">= 2 (got {cfg['hard_samples']})")
    if cfg["label_smoothing"] >= 1:
        raise InputError(f"label_smoothing must be below 1 (got {cfg['label_smoothing']})")
    if cfg["hard_sample_p"] > 1 or cfg["hard_tau"] <= 0:
        raise InputError(f"hard_sample_p must be a share in [0, 1] and hard_tau > 0 (got {cfg['hard_sample_p']}, "
                         f"{cfg['hard_tau']})")
    if not cfg["out"]:
        cfg["out"] = os.path.join("runs", cfg["decoder"])
    return cfg, ckpt, init, overwrite


def add_decoding_arguments(parser, beam_size):
    """The decoding options eval.py and caption.py share; `beam_size` is the default (a list for
    several beam sizes)."""
    several = isinstance(beam_size, list)
    parser.add_argument("--beam-size", type=at_least(1), nargs="+" if several else None, default=beam_size,
                        help="beam size" + ("s, each scored" if several else "") + " (1: greedy)")
    parser.add_argument("--max-len", type=at_least(1), help="most words in a caption (default: the checkpoint's "
                        "max_decode_len)")
    parser.add_argument("--length-penalty", type=at_least(0, float), default=0.0, help="divide a beam's "
                        "log-probability by length ** this (0: plain sum)")
    parser.add_argument("--block-ngram-repeat", type=at_least(0), default=0, help="forbid repeating n-grams of "
                        "this size (0: off)")


def decoding_options(args, cfg, beam_size):
    """DecodeOptions from add_decoding_arguments' options, at one beam size; `cfg` is the checkpoint's."""
    from decoding import DecodeOptions
    return DecodeOptions(beam_size, args.max_len or cfg["max_decode_len"], args.length_penalty,
                         args.block_ngram_repeat, "--max-len")
