"""Shared helpers of the PixelLM golden tests: write the golden state dict as a release
``hf_model`` directory (``.bin`` shards + index, as the release), convert it, build the model."""
import json
import os
import pathlib
import shutil

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
GOLDEN = pathlib.Path(os.environ.get("PIXELLM_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "reference" / "golden_pixellm"))
RELEASE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json")


def golden_available() -> bool:
    return (GOLDEN / "state_dict.safetensors").is_file() and (GOLDEN / "tensors.safetensors").is_file()


def write_release(directory: pathlib.Path, sd: dict, golden: pathlib.Path = GOLDEN) -> pathlib.Path:
    """The release layout: 2 pickled ``.bin`` shards + ``pytorch_model.bin.index.json`` + config/tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    weight_map = {}
    for name, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, directory / name)
        weight_map.update({k: name for k in ks})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in RELEASE_FILES:
        shutil.copy2(golden / f, directory / f)
    return directory


def decoder_num_heads(golden: pathlib.Path = GOLDEN) -> int:
    # the golden set's decoder width (official: 8 heads, hard-coded; the set's patch P1 records it)
    return int(json.loads((golden / "config.json").read_text())["golden_decoder"]["num_heads"])
