"""PixelLM options: ``add_pixellm_config(cfg)`` adds ``MODEL.PIXELLM.*`` (on top of psalm's config).

Defaults are the release (PixelLM-7B) in ``compat`` behaviour, i.e. what the official code does and
the released weights were trained with. Options that switch to the paper's behaviour say so.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_pixellm_config", "get_pixellm_cfg"]


def add_pixellm_config(cfg):
    p = cfg.MODEL.PIXELLM = CN()
    # A converted model directory (tools: projects/PixelLM/convert_release.py). When set, the
    # architecture is read from its config.json and the VISION/LLM/DECODER sizes below must be left
    # at their defaults (a size set in both places is an error).
    p.MODEL_DIR = ""
    # without MODEL_DIR every weight is random; that is an error unless this is set (models trained
    # from scratch: the tiny test / synthetic configs)
    p.ALLOW_RANDOM_INIT = False
    # "compat" (official code; released weights) or "paper" (learnable fusion weights, TRL on).
    p.SETTING = "compat"

    p.VISION = CN()
    p.VISION.HIDDEN_SIZE = 1024
    p.VISION.INTERMEDIATE_SIZE = 4096
    p.VISION.NUM_LAYERS = 24
    p.VISION.NUM_HEADS = 16
    p.VISION.PATCH_SIZE = 14
    p.VISION.IMAGE_SIZE = 448  # input size S (the release: 448, interpolated from 336)
    p.VISION.HIDDEN_ACT = "quick_gelu"
    p.VISION.TAPS = [-2, -11]  # hidden_states indices: LLM + scale 0, scale 1
    p.VISION.LLM_GRID = 16  # the LLM sees LLM_GRID^2 image tokens
    p.VISION.PAD_AWARE = True
    # the official recipe freezes CLIP (no gradient, eval mode); True trains it too, for a vision tower
    # that starts from scratch (the synthetic CPU run: a random frozen CLIP gives random features)
    p.VISION.TRAIN = False

    p.LLM = CN()
    p.LLM.VOCAB_SIZE = 32008
    p.LLM.HIDDEN_SIZE = 4096
    p.LLM.INTERMEDIATE_SIZE = 11008
    p.LLM.NUM_LAYERS = 32
    p.LLM.NUM_HEADS = 32
    p.LLM.NUM_KV_HEADS = 32
    p.LLM.RMS_NORM_EPS = 1e-6
    p.LLM.MAX_POSITION_EMBEDDINGS = 2048
    p.LLM.ROPE_THETA = 10000.0
    p.LLM.GRADIENT_CHECKPOINTING = False
    # train every LLM weight (models trained from scratch, e.g. the synthetic run); the official
    # recipe trains LoRA + embed_tokens + lm_head only
    p.LLM.TRAIN_FULL = False
    # LoRA through peft (official: q_proj, v_proj, r 8, alpha 16, dropout 0.05)
    p.LLM.LORA = CN()
    p.LLM.LORA.ENABLED = False
    p.LLM.LORA.R = 8
    p.LLM.LORA.ALPHA = 16
    p.LLM.LORA.DROPOUT = 0.05
    p.LLM.LORA.TARGET_MODULES = ["q_proj", "v_proj"]

    p.DECODER = CN()
    p.DECODER.DIM = 256
    p.DECODER.DEPTH = 2
    p.DECODER.NUM_HEADS = 8
    p.DECODER.MLP_DIM = 2048
    p.DECODER.IOU_HEAD_HIDDEN_DIM = 256

    # codebook: SCALES (L) x TOKENS_PER_SCALE (N) tokens [SEG0]..[SEG{L*N-1}] per target
    p.CODEBOOK = CN()
    p.CODEBOOK.TOKENS_PER_SCALE = 3
    p.CODEBOOK.SCALES = 2
    # which LLM hidden state feeds the decoder: "preceding" (official, the position before each
    # codebook token) or "at" (the codebook token's own position)
    p.CODEBOOK.HIDDEN_TAP = "preceding"
    # token fusion: "compat" (official constants float32(1/(L*N)) per token, i.e. half the mean for
    # L=2), "mean" (1/N), "learned" (paper: learnable, initialised to 1/N)
    p.CODEBOOK.TOKEN_FUSION = "compat"
    # scale fusion: "compat" (constant 1/L) or "learned" (paper)
    p.CODEBOOK.SCALE_FUSION = "compat"
    # not in the release: "batch" normalises the fused prompts over the targets of the batch
    # (PromptBatchNorm), for models trained from scratch whose prompts start nearly identical across
    # targets (statistics per process under DDP, as nn.BatchNorm1d); "none" = official
    p.CODEBOOK.PROMPT_NORM = "none"

    p.LOSS = CN()
    p.LOSS.CE_WEIGHT = 1.0
    p.LOSS.BCE_WEIGHT = 2.0
    p.LOSS.DICE_WEIGHT = 0.5
    # 0: losses on every pixel at the original size (official); > 0: on this many points sampled
    # with psalm's point sampling (importance sampling as Mask2Former)
    p.LOSS.NUM_POINTS = 0
    p.LOSS.OVERSAMPLE_RATIO = 3.0
    p.LOSS.IMPORTANCE_SAMPLE_RATIO = 0.75
    # target refinement loss (paper Sec. 3.2): off in compat (the released code has it commented
    # out), on in the paper setting. ALPHA is the weight on pixels claimed by >= 2 masks.
    p.LOSS.TRL = False
    p.LOSS.TRL_ALPHA = 2.0
    # not in the release: > 0 adds BCE + Dice (same weights and sampling as the mask loss) x this on an
    # auxiliary mask per target, its fused prompt dotted with the neck features (PixelLM.prompt_masks):
    # a direct grounding signal to the prompts of a model trained from scratch. 0 = official
    p.LOSS.PROMPT_MASK_WEIGHT = 0.0

    # trainable set (official: LoRA + lm_head + embed_tokens + mask_decoder + text_hidden_fcs +
    # mm_projector + out_mm_projector); the neck and prompt encoder stay frozen unless enabled
    p.TRAIN_NECK_AND_PROMPT_ENCODER = False

    p.EVAL = CN()
    # MUSE: free generation (official ar_validate); referring: the official teacher-forced
    # protocol ("teacher_forced") or "generate" (what users get)
    p.EVAL.MUSE_PROTOCOL = "generate"
    p.EVAL.REFER_PROTOCOL = "teacher_forced"
    # evaluate referring data sets as MRefCOCO (sentences of an image asked together, 6/5/4 per question)
    p.EVAL.MULTI_REFER = False

    # pixellm_synthetic_muse_*: how the answers place each target's codebook group: "is" ("the red
    # circle is [SEG0]..[SEG5]", the documented runs) or "phrase" ("the red circle [SEG0]..[SEG5]", right
    # after the phrase as the released MUSE answers); part of the generated files' parameters
    cfg.DATASETS.PIXELLM_SYNTHETIC_MUSE = CN()
    cfg.DATASETS.PIXELLM_SYNTHETIC_MUSE.ANSWER_STYLE = "is"

    p.OUT_SIZE = 0  # fused low-res mask size; 0 = 4 x the CLIP grid (128 for the release)
    p.MAX_NEW_TOKENS = 512
    p.MODEL_MAX_LENGTH = 512
    p.PIXEL_MEAN = [123.675, 116.28, 103.53]
    p.PIXEL_STD = [58.395, 57.12, 57.375]
    # tokenizer: a directory with the tokenizer files (the converted model dir has them)
    p.TOKENIZER = ""
    return cfg


def get_pixellm_cfg(config_file: str | None = None, opts=None):
    """A fresh config with psalm's and PixelLM's options, optionally merged with a YAML file and ``opts``."""
    from psalm.config import get_psalm_cfg

    cfg = add_pixellm_config(get_psalm_cfg())
    if config_file:
        cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg
