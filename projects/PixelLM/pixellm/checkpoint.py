"""Strict converter: released PixelLM ``hf_model`` directory + HF CLIP directory -> one model directory.

Release layout (spec A4): ``config.json`` (``model_type: llava``, ``architectures:
[PixelLMForCausalLM]``), ``pytorch_model-*.bin`` shards + ``pytorch_model.bin.index.json`` (or one
``pytorch_model.bin``; safetensors shards are accepted too), LoRA merged, ``model.vision_tower.*``
removed; tokenizer files incl. ``added_tokens.json``. The vision tower comes from the CLIP directory
(``openai/clip-vit-large-patch14-336``); its 24x24 position table is interpolated to the 448 grid
exactly as the official code does (``compat=True``: with its CLS off-by-one).

Output directory: ``model.safetensors`` (our key names, the release dtype), ``config.json`` (the
architecture spec read by :func:`pixellm.modeling.build.load_spec`), the tokenizer files.

Every release key is consumed by exactly one rule or dropped by a named rule (the prompt
encoder's point / box / mask-prompt modules, unused by PixelLM; the transformers-4.31 rotary
``inv_freq`` buffers after checking them against the standard formula); missing, unexpected or
mis-shaped keys raise :class:`psalm.checkpoint.strict.IncompatibleKeysError` with the full list.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import shutil

import torch

from psalm.checkpoint.strict import IncompatibleKeysError, LoadReport, check_state_dict

from .modeling.vision import interpolate_position_embedding

__all__ = ["load_release_state_dict", "release_to_pixellm_keys", "release_spec", "convert_release", "Conversion"]

logger = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.json")
_DROPPED_PROMPT_ENCODER = re.compile(r"^model\.prompt_encoder\.(point_embeddings|not_a_point_embed|mask_downscaling)\.")
_INV_FREQ = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


@dataclasses.dataclass
class Conversion:
    state_dict: dict
    dropped: list[str]
    spec: dict


def load_release_state_dict(directory) -> dict[str, torch.Tensor]:
    """All tensors of a release directory (``.bin`` shards with index, one ``.bin``, or safetensors)."""
    d = pathlib.Path(directory)
    for index_name, loader in (("pytorch_model.bin.index.json", "bin"), ("model.safetensors.index.json", "st")):
        if (d / index_name).is_file():
            files = sorted(set(json.loads((d / index_name).read_text())["weight_map"].values()))
            break
    else:
        files = [f for f in ("pytorch_model.bin", "model.safetensors") if (d / f).is_file()]
        if not files:
            raise FileNotFoundError(f"no pytorch_model*.bin / model*.safetensors (with index) in {d}")
    sd = {}
    for f in files:
        path = d / f
        if f.endswith(".safetensors"):
            from safetensors.torch import load_file

            part = load_file(str(path))
        else:
            part = torch.load(str(path), map_location="cpu", weights_only=True)
        dup = set(part) & set(sd)
        if dup:
            raise ValueError(f"{path}: keys repeated across shards: {sorted(dup)[:5]}")
        sd.update(part)
    return sd


def _decoder_key(rest: str) -> str:
    rest = re.sub(r"\.norm(\d)\.", r".layer_norm\1.", rest)
    rest = rest.replace(".norm_final_attn.", ".layer_norm_final_attn.")
    rest = re.sub(r"^(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d)\.",
                  lambda m: f"{m.group(1)}.{ {'0': 'proj_in', '1': 'layers.0', '2': 'proj_out'}[m.group(2)] }.", rest)
    rest = rest.replace("pe1.positional_encoding_gaussian_matrix", "pe1.pe.positional_embedding")
    return "mask_decoder." + rest


def release_to_pixellm_keys(sd: dict, rope_theta: float = 10000.0) -> tuple[dict, list[str]]:
    """Rename release keys to ours. Returns (renamed dict, dropped keys). Unknown keys raise."""
    out, dropped, unknown = {}, [], []
    for k, v in sd.items():
        if _DROPPED_PROMPT_ENCODER.match(k):
            dropped.append(k)
            continue
        if _INV_FREQ.match(k):
            dim = 2 * v.numel()
            ref = 1.0 / (rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            if not torch.allclose(v.float(), ref, rtol=1e-6, atol=0):
                raise ValueError(f"{k} is not the standard rotary inv_freq (base {rope_theta}); this converter "
                                 "only supports the standard LLaMA rotary embedding")
            dropped.append(k)
            continue
        if k == "lm_head.weight":
            nk = "llm.lm_head.weight"
        elif re.match(r"^model\.(embed_tokens|layers|norm)\.", k):
            nk = "llm." + k
        elif re.match(r"^model\.(mm_projector|out_mm_projector|image_feature_neck)\.", k):
            nk = k[len("model."):]
        elif k.startswith("model.text_hidden_fcs.0."):
            nk = "text_hidden_fcs." + k[len("model.text_hidden_fcs.0."):]
        elif k == "model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":
            nk = "prompt_encoder.pe_layer.pe.positional_embedding"
        elif k == "model.prompt_encoder.no_mask_embed.weight":
            nk = "prompt_encoder.no_mask_embed.weight"
        elif k.startswith("model.mask_decoder."):
            nk = _decoder_key(k[len("model.mask_decoder."):])
        else:
            unknown.append(k)
            continue
        out[nk] = v
    if unknown:
        raise IncompatibleKeysError(LoadReport([], unknown, []), "release state dict (no conversion rule)")
    return out, dropped


def release_spec(config: dict, clip_config: dict, sd: dict, added_tokens: dict, decoder_num_heads: int = 8) -> dict:
    """The architecture spec of a release (sizes from its config.json, the CLIP config and shapes)."""
    from .modeling.build import SPEC_FORMAT
    from .modeling.codebook import codebook_tokens

    if config.get("model_type") != "llava" or "PixelLMForCausalLM" not in config.get("architectures", []):
        raise ValueError("config.json is not a PixelLM release (model_type 'llava', architectures "
                         f"['PixelLMForCausalLM']), got {config.get('model_type')!r} {config.get('architectures')}")
    scales = int(config.get("image_feature_scale_num", 2))
    seg = sorted((t for t in added_tokens if re.fullmatch(r"\[SEG\d+\]", t)), key=lambda t: int(t[4:-1]))
    if not seg or len(seg) % scales:
        raise ValueError(f"added_tokens.json has codebook tokens {seg}, not a multiple of {scales} scales")
    tokens = codebook_tokens(scales, len(seg) // scales)
    if seg != tokens:
        raise ValueError(f"added_tokens.json codebook tokens {seg} are not {tokens}")
    dim = int(sd["model.prompt_encoder.no_mask_embed.weight"].shape[1])
    depth = len({k.split(".")[5] for k in sd if k.startswith("model.mask_decoder.transformer.0.layers.")})
    image_size = int(config.get("resize_vision_tower_size", 448))
    vis_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                "hidden_act", "layer_norm_eps")
    return {
        "format": SPEC_FORMAT,
        "llm": dict(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                    intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
                    num_attention_heads=config["num_attention_heads"],
                    num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
                    rms_norm_eps=config["rms_norm_eps"], max_position_embeddings=config["max_position_embeddings"],
                    rope_theta=float(config.get("rope_theta", 10000.0)), hidden_act=config.get("hidden_act", "silu"),
                    tie_word_embeddings=bool(config.get("tie_word_embeddings", False))),
        "vision": dict({k: clip_config[k] for k in vis_keys}, image_size=image_size),
        "decoder": dict(dim=dim, depth=depth, num_heads=int(decoder_num_heads),
                        mlp_dim=int(sd["model.mask_decoder.transformer.0.layers.0.mlp.lin1.weight"].shape[0]),
                        iou_head_hidden_dim=int(sd["model.mask_decoder.iou_prediction_head.layers.0.weight"].shape[0])),
        "codebook": {"tokens_per_scale": len(seg) // scales, "scales": scales, "ids": [int(added_tokens[t]) for t in seg]},
        "taps": [int(config.get("mm_vision_select_layer", -2)), -11],
        "llm_grid": 16,
        "pad_aware": bool(config.get("pad_train_clip_images", True)),
        "pad_token_id": int(config.get("pad_token_id", 0) or 0),
        "bos_token_id": int(config.get("bos_token_id", 1)),
        "eos_token_id": int(config.get("eos_token_id", 2)),
        "special_tokens": {t: int(added_tokens[t]) for t in ("<im_start>", "<im_end>") if t in added_tokens},
        "source": {"position_embedding_interpolation": None},
    }


def _clip_state_dict(clip_dir, grid: int, compat: bool) -> tuple[dict, dict, list[str]]:
    d = pathlib.Path(clip_dir)
    clip_config = json.loads((d / "config.json").read_text())
    if clip_config.get("model_type") == "clip":  # a full CLIP directory
        clip_config = clip_config["vision_config"]
    files = sorted(d.glob("model*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no CLIP weights in {d}")
    sd = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd.update(load_file(str(f)))
        else:
            sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
    out, dropped = {}, []
    for k, v in sd.items():
        if k.endswith("embeddings.position_ids"):
            dropped.append(k)  # a non-persistent buffer in current transformers
            continue
        if not k.startswith("vision_model."):
            if k.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale")):
                dropped.append(k)
                continue
            raise IncompatibleKeysError(LoadReport([], [k], []), f"CLIP checkpoint {d}")
        if k == "vision_model.embeddings.position_embedding.weight":
            v = interpolate_position_embedding(v, grid, compat=compat)
        # transformers 5's CLIPVisionModel holds the embeddings / encoder directly (no vision_model.)
        out["vision_tower.clip." + k[len("vision_model."):]] = v
    return out, clip_config, dropped


def convert_release(release_dir, clip_dir, output_dir=None, decoder_num_heads: int = 8,
                    compat_position_embedding: bool = True, dtype: torch.dtype | None = None) -> Conversion:
    """Convert; write the model directory when ``output_dir`` is given. Raises on any key problem."""
    release_dir = pathlib.Path(release_dir)
    config = json.loads((release_dir / "config.json").read_text())
    added_path = release_dir / "added_tokens.json"
    if not added_path.is_file():
        raise FileNotFoundError(f"{added_path} missing: the codebook token ids are read from it")
    added = json.loads(added_path.read_text())
    raw = load_release_state_dict(release_dir)
    vt = [k for k in raw if k.startswith("model.vision_tower.")]
    if vt:
        raise ValueError(f"{len(vt)} model.vision_tower.* keys in the release; the release has them removed "
                         "and the vision tower is taken from the CLIP directory")
    sd, dropped = release_to_pixellm_keys(raw, float(config.get("rope_theta", 10000.0)))
    clip_cfg = json.loads((pathlib.Path(clip_dir) / "config.json").read_text())
    clip_cfg = clip_cfg.get("vision_config", clip_cfg) if clip_cfg.get("model_type") == "clip" else clip_cfg
    spec = release_spec(config, clip_cfg, raw, added, decoder_num_heads)
    grid = spec["vision"]["image_size"] // spec["vision"]["patch_size"]
    clip_sd, _, clip_dropped = _clip_state_dict(clip_dir, grid, compat_position_embedding)
    spec["source"] = {"release": str(release_dir), "clip": str(clip_dir),
                      "position_embedding_interpolation": "official (CLS off-by-one)" if compat_position_embedding
                      else "fixed (CLS at row 0)"}
    sd.update(clip_sd)
    dropped += clip_dropped
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    # check against the model structure built on the meta device (no memory)
    with torch.device("meta"):
        from .modeling.build import pixellm_module_tree

        ref = pixellm_module_tree(spec)
    report = check_state_dict(ref, sd)
    if not report.ok:
        raise IncompatibleKeysError(report, "converted PixelLM state dict")
    logger.info("converted %d tensors; dropped by rule: %d (%s)", len(sd), len(dropped),
                ", ".join(sorted({re.sub(r"\d+", "N", k) for k in dropped})))
    if output_dir is not None:
        from safetensors.torch import save_file

        out = pathlib.Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(spec, indent=2))
        for f in TOKENIZER_FILES:
            if (release_dir / f).is_file():
                shutil.copy2(release_dir / f, out / f)
    return Conversion(sd, dropped, spec)
