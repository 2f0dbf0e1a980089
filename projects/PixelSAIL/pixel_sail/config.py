"""Pixel-SAIL options: ``add_pixel_sail_config(cfg)`` adds ``MODEL.PIXEL_SAIL.*`` to a psalm config.

Defaults are the authors' code (``bytedance/Sa2VA@9832e1a:sa2va_eval/projects/ST``, spec
``pixelsail_official_spec.md`` B1/B2) in ``compat`` behaviour; options that follow the paper instead say so.
Everything else (``SOLVER.*``, ``DATASETS.*``, ``INPUT.*``, ``MODEL.DEVICE``) is psalm's.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_pixel_sail_config", "get_pixel_sail_cfg"]


def add_pixel_sail_config(cfg):
    ps = cfg.MODEL.PIXEL_SAIL = CN()
    # tokenizer directory (a local HF tokenizer, e.g. Qwen2.5's); the official special tokens are added
    # (pixel_sail.tokens.extend_tokenizer). Empty: LLM.NAME_OR_PATH.
    ps.TOKENIZER = ""

    ps.LLM = CN()
    # "pretrained": weights from LLM.NAME_OR_PATH (a local HF Qwen2 / Qwen2.5 directory; every value below
    # must agree with its config.json, a disagreeing one is an error); "random": from scratch with the
    # values below (tiny configs, tests); "checkpoint": built from the values below, its weights must come
    # from MODEL.WEIGHTS / MODEL.PSALM.INIT.WEIGHTS (fine-tuning a trained Pixel-SAIL; a key they leave
    # uncovered is an error). There is no silent fallback from one to the other.
    ps.LLM.INIT = "pretrained"
    ps.LLM.NAME_OR_PATH = ""
    # Qwen2.5-0.5B (VOCAB_SIZE 0 = the extended tokenizer's size, random init only; pretrained: the
    # directory's vocabulary, grown to the extended tokenizer)
    ps.LLM.VOCAB_SIZE = 151936
    ps.LLM.HIDDEN_SIZE = 896
    ps.LLM.INTERMEDIATE_SIZE = 4864
    ps.LLM.NUM_HIDDEN_LAYERS = 24
    ps.LLM.NUM_ATTENTION_HEADS = 14
    ps.LLM.NUM_KEY_VALUE_HEADS = 2
    ps.LLM.ROPE_THETA = 1000000.0
    ps.LLM.RMS_NORM_EPS = 1e-6
    ps.LLM.MAX_POSITION_EMBEDDINGS = 32768
    ps.LLM.TIE_WORD_EMBEDDINGS = True
    ps.LLM.ATTN_IMPLEMENTATION = "sdpa"  # or "eager"
    ps.LLM.GRADIENT_CHECKPOINTING = False
    # multimodal rotary sections over head_dim / 2 frequencies (t, h, w); [] = the official [0, d/4, d/4]
    ps.LLM.MROPE_SECTION = []

    # image -> patches (official dataset/utils.py): long side min(ceil(long / p) * p, MAX_IMAGE_SIDE),
    # ImageNet normalisation, p x p patches flattened channel-last to 3 p^2 values
    ps.PATCH_SIZE = 16
    ps.MAX_IMAGE_SIDE = 1024
    ps.PIXEL_MEAN = [0.485, 0.456, 0.406]  # on [0, 1] pixels
    ps.PIXEL_STD = [0.229, 0.224, 0.225]
    # full attention inside [<vision> ... </vision>] (Pixel-SAIL 0.5B / 3B); False = causal everywhere
    # (the unmodified EVEv2 base of Pixel-SAIL 7B)
    ps.VISION_BIDIRECTIONAL = True

    # visual prompts <Prompt0> .. <Prompt{K-1}> + <NO_Prompt> (configs: K = 15)
    ps.NUM_VISUAL_PROMPTS = 15
    # initial std of the bias-free vp_embed Linear(D, D) (the injected term is vp_embed(embed(<Prompt_k>))).
    # compat 0.02 = transformers' _init_weights normal(0, initializer_range) that the official module gets
    # (inferred, not stated in the spec). With from-scratch embeddings (std 0.02) and an untrained vis_embed
    # the injected term then starts ~70x smaller than the patch embedding (tiny synthetic config: norm 0.05
    # vs 3.7) and the prompt is drowned; a larger std (e.g. 0.5: norm ~1.3) makes it visible from the start.
    ps.VP_EMBED_INIT_STD = 0.02

    # heads (sa2va_ST.py): pre-projector when D > PRE_PROJECTOR_MAX_DIM, up-sampling blocks to
    # UPSAMPLE_OUTPUT_STRIDE (compat: 2 as the code's block count gives; the paper says 4), image-feature
    # and [SEG] projectors to SEG_HIDDEN_DIM channels
    ps.PRE_PROJECTOR_MAX_DIM = 1024
    ps.UPSAMPLE_OUTPUT_STRIDE = 2
    ps.SEG_HIDDEN_DIM = 512

    ps.LOSS = CN()
    ps.LOSS.BCE_WEIGHT = 2.0
    ps.LOSS.DICE_WEIGHT = 0.5
    # LM loss factor s: LLM_WEIGHT_WITH_MASKS when the batch has a mask loss, else LLM_WEIGHT (code: 0.1 /
    # 1.0; the paper has no down-weighting: set both to 1.0)
    ps.LOSS.LLM_WEIGHT = 1.0
    ps.LOSS.LLM_WEIGHT_WITH_MASKS = 0.1
    ps.LOSS.NUM_POINTS = 12544
    ps.LOSS.OVERSAMPLE_RATIO = 3.0
    ps.LOSS.IMPORTANCE_SAMPLE_RATIO = 0.75

    # dense-feature distillation (training only; pixel_sail.distill). Teacher sources:
    #   "" = off; "hf_mask2former:<local dir>" (transformers Mask2FormerForUniversalSegmentation,
    #   pixel_decoder_last_hidden_state); "hf_sam2:<local dir>" (transformers Sam2Model image embeddings);
    #   "precomputed:<dir>" (one <sample key>.pt tensor [C, h, w] per image, tools in pixel_sail.distill)
    ps.DISTILL = CN()
    ps.DISTILL.M2F_TEACHER = ""
    ps.DISTILL.SAM2_TEACHER = ""
    ps.DISTILL.M2F_WEIGHT = 0.5
    ps.DISTILL.SAM2_WEIGHT = 0.5
    ps.DISTILL.M2F_CHANNELS = 256
    ps.DISTILL.SAM2_CHANNELS = 256

    ps.TEST = CN()
    ps.TEST.MASK_THRESHOLD = 0.5
    ps.TEST.MAX_NEW_TOKENS = 512
    # forced answer prefix when the generated answer has no [SEG]: "protocol" = only where the official
    # evaluation does it (V-T RES), "always" (the paper's statement), "never"
    ps.TEST.FORCE_SEG = "protocol"
    ps.TEST.FORCED_PREFIX = "It is [SEG]."

    # data (pixel_sail.data): referring expressions per image merged into one dialogue (RefCOCO: 5)
    ps.DATA = CN()
    ps.DATA.MAX_TURNS = 5
    # visual-prompt data: share of training samples with one extra "<Prompt_j> is not in the image." turn
    ps.DATA.VP_NEGATIVE_RATIO = 0.05
    # COCO panoptic instance / semantic modes: classes per image
    ps.DATA.MAX_CLASSES = 5
    return cfg


def get_pixel_sail_cfg(config_file=None, opts=None):
    """psalm's config + Pixel-SAIL options, merged with a YAML file and ``opts``."""
    from detectron2.config import get_cfg
    from psalm.config import add_psalm_config

    cfg = add_pixel_sail_config(add_psalm_config(get_cfg()))
    if config_file:
        cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg
