"""PSALM configuration: ``add_psalm_config(cfg)`` adds every option this project reads.

Mask2Former's own names are kept where the concept is Mask2Former's (``MODEL.MASK_FORMER.*``,
``MODEL.SEM_SEG_HEAD.*``, ``MODEL.SWIN.*``); everything PSALM adds lives under ``MODEL.PSALM.*``,
the input pipeline under ``INPUT.*`` and per-task inference thresholds under ``TEST.PSALM.*``.

Defaults are the paper's full model (Swin-B + Phi-1.5) in ``compat`` behaviour, i.e. the
behaviour of the official code that the released weights were trained with. Options that fix an
official quirk say so in their comment.

Unknown keys in a YAML file are an error (detectron2 raises ``KeyError: 'Non-existent config key:
<KEY>'``), so a typo never silently falls back to a default.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_psalm_config", "get_psalm_cfg", "extension_options_set"]


def _add_swin_config(cfg):
    # Swin-B, Mask2Former names (D2SwinTransformer). Implemented on transformers' SwinBackbone.
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 128
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 18, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [4, 8, 16, 32]
    cfg.MODEL.SWIN.WINDOW_SIZE = 12
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.QKV_BIAS = True
    cfg.MODEL.SWIN.QK_SCALE = None
    cfg.MODEL.SWIN.DROP_RATE = 0.0
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    cfg.MODEL.SWIN.APE = False
    cfg.MODEL.SWIN.PATCH_NORM = True
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SWIN.USE_CHECKPOINT = False
    # "sdpa" reproduces the official fp64 outputs to ~1e-15; "eager" computes softmax in fp32.
    cfg.MODEL.SWIN.ATTN_IMPLEMENTATION = "sdpa"


def _add_mask_former_config(cfg):
    # Pixel decoder (MSDeformAttnPixelDecoder), Mask2Former names. (Mask2Former's SEM_SEG_HEAD.NAME,
    # MASK_FORMER.TRANSFORMER_IN_FEATURE / ENC_LAYERS / SIZE_DIVISIBILITY, INPUT.SEG_PAD_VALUE and
    # INPUT.DATASET_MAPPER_NAME are not options here: PSALM has one head, one decoder input, no
    # transformer encoder in the decoder, square padding to INPUT.IMAGE_SIZE and one mapper.)
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 256
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 6
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    # hard-coded to 1024 in the official code (Mask2Former upstream: 1024 as well)
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = 1024
    # Multi-scale deformable attention implementation:
    #   "auto": the compiled kernel (torch-ms-deform-attn) when importable, else the PyTorch
    #           reference; the choice is logged once. "pytorch": always the reference.
    #   "kernel": the compiled kernel, error if it is not installed.
    cfg.MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL = "auto"

    # Transformer decoder (masked attention), Mask2Former names.
    cfg.MODEL.MASK_FORMER = CN()
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "PSALMMultiScaleMaskedTransformerDecoder"
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 2.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 5.0
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 5.0
    cfg.MODEL.MASK_FORMER.NHEADS = 8
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.0
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    # DEC_LAYERS counts the prediction stages as in Mask2Former: DEC_LAYERS - 1 decoder layers.
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 10
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 256
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False
    # point-sampled mask losses / matcher
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 112 * 112
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75
    # category-task inference (Mask2Former semantics and thresholds)
    cfg.MODEL.MASK_FORMER.TEST = CN()
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.8
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.8
    cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    cfg.MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE = 100


def _add_psalm_model_config(cfg):
    cfg.MODEL.PSALM = CN()
    # --- vision encoder
    cfg.MODEL.PSALM.FREEZE_BACKBONE = True
    # True: frozen Swin runs in eval mode (no DropPath). compat with the official training: False
    # (the official code left DropPath 0.3 active on the frozen backbone).
    cfg.MODEL.PSALM.BACKBONE_EVAL_MODE = True

    # --- vision-language projector
    cfg.MODEL.PSALM.PROJECTOR = CN()
    cfg.MODEL.PSALM.PROJECTOR.NAME = "swin_conv"  # "swin_conv" | "linear"
    cfg.MODEL.PSALM.PROJECTOR.IN_FEATURE = "res5"
    # official BasicBlock applies conv2 twice; the released weights need it (compat)
    cfg.MODEL.PSALM.PROJECTOR.CONV2_TWICE = True
    # "swin_conv" BasicBlock width (hard-coded 2048 in the official code; the fc maps it to the LLM size)
    cfg.MODEL.PSALM.PROJECTOR.MID_DIM = 2048

    # --- language model (transformers' PhiForCausalLM, no remote code)
    cfg.MODEL.PSALM.LLM = CN()
    # Local directory of an HF Phi checkpoint/config (e.g. phi-1_5). Empty: build from the fields below.
    cfg.MODEL.PSALM.LLM.NAME_OR_PATH = ""
    cfg.MODEL.PSALM.LLM.VOCAB_SIZE = 50297
    cfg.MODEL.PSALM.LLM.HIDDEN_SIZE = 2048
    cfg.MODEL.PSALM.LLM.INTERMEDIATE_SIZE = 8192
    cfg.MODEL.PSALM.LLM.NUM_HIDDEN_LAYERS = 24
    cfg.MODEL.PSALM.LLM.NUM_ATTENTION_HEADS = 32
    cfg.MODEL.PSALM.LLM.PARTIAL_ROTARY_FACTOR = 0.5
    cfg.MODEL.PSALM.LLM.ROPE_THETA = 10000.0
    cfg.MODEL.PSALM.LLM.MAX_POSITION_EMBEDDINGS = 2048
    cfg.MODEL.PSALM.LLM.HIDDEN_ACT = "gelu_new"
    cfg.MODEL.PSALM.LLM.LAYER_NORM_EPS = 1e-5
    cfg.MODEL.PSALM.LLM.ATTN_IMPLEMENTATION = "sdpa"  # "sdpa" | "eager"
    cfg.MODEL.PSALM.LLM.GRADIENT_CHECKPOINTING = False
    cfg.MODEL.PSALM.LLM.FREEZE = False
    # Local tokenizer directory (HF tokenizer files). Nothing is downloaded.
    cfg.MODEL.PSALM.TOKENIZER = ""
    cfg.MODEL.PSALM.MODEL_MAX_LENGTH = 2048

    # --- input schema
    cfg.MODEL.PSALM.NUM_MASK_TOKENS = 100  # must equal MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    cfg.MODEL.PSALM.PROMPT_STYLE = "official"  # exact official strings (compat)
    cfg.MODEL.PSALM.SEG_TOKEN = "[SEG]"
    cfg.MODEL.PSALM.PAD_TOKEN = "[PAD]"
    # Category prompts: shuffle the class order per training sample (official), restored after pooling.
    cfg.MODEL.PSALM.SHUFFLE_CLASSES_TRAIN = True

    # --- conditions
    # "mean": mean over the whole refer span incl. its [SEG] (official, compat);
    # "last": the hidden state of the span's trailing [SEG] token (paper).
    cfg.MODEL.PSALM.REFER_POOLING = "mean"
    # "sample_points": official 256 bilinear point samples on the projector map (seeded here);
    # "mask_average": exact mask-average pooling of the bilinearly upsampled map.
    cfg.MODEL.PSALM.REGION_POOLING = "sample_points"
    cfg.MODEL.PSALM.REGION_NUM_POINTS = 256
    cfg.MODEL.PSALM.REGION_SEED = 0

    # --- training
    cfg.MODEL.PSALM.LM_LOSS_WEIGHT = 1.0
    # --- initial weights of a training run (read by the trainer when it does not resume; evaluation and
    # the predictor load MODEL.WEIGHTS only). docs/TRAINING.md "Initial weights", MODEL_ZOO.md.
    cfg.MODEL.PSALM.INIT = CN()
    # entries [file, prefix, prefix, ...]: the model keys under each prefix come from that file (a .pth /
    # .safetensors with our key names, e.g. tools/convert_mask2former.py / convert_phi.py output or a
    # training run's model_final.pth). A non-empty MODEL.WEIGHTS is one more entry for prefix "" (every
    # key). Every model key must come from exactly one source (an entry, MODEL.PSALM.LLM.NAME_OR_PATH's
    # weights, or RANDOM below); anything else (uncovered, covered twice, missing from its file,
    # unexpected, mis-shaped) is an error that lists the keys.
    cfg.MODEL.PSALM.INIT.WEIGHTS = []
    # fnmatch patterns of model keys that start from their initialisation on purpose (new in this stage);
    # keys that a converter lists as absent by design ("allowed_missing" in its output) count as such too
    cfg.MODEL.PSALM.INIT.RANDOM = []
    # fnmatch patterns of FROZEN keys that may stay random because this stage never uses them (stage 1:
    # the mask side). Any other frozen key left random is an error: it would never learn.
    cfg.MODEL.PSALM.INIT.FROZEN_RANDOM = []
    # True: this run trains from scratch on purpose; every key not given by an entry starts random
    # (the synthetic main job)
    cfg.MODEL.PSALM.INIT.FROM_SCRATCH = False
    # Default task for inference when a batch does not say (see psalm.modeling.tasks).
    cfg.MODEL.PSALM.TEST_TASK = "panoptic"


def _add_extensions_config(cfg):
    # Beyond the paper and the official code: research extensions (psalm/modeling/extensions, docs/DESIGN.md
    # "Extensions beyond the paper"). These keys are read only by the extensions' own classes, which a config
    # selects by name: MODEL.META_ARCHITECTURE "ExtendedPSALM" and, for the scoring-head options,
    # MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME "ExtendedPSALMDecoder". All off by default (the official
    # model); setting one while the official classes are selected is an error.
    cfg.MODEL.EXTENSIONS = CN()
    # the class / refer / region heads also read a feature map pooled under each query's own (detached)
    # predicted mask: "mask_features" (the pixel decoder's stride-4 output) or a backbone feature ("res2",
    # ...); "" = off. Gives the scoring heads the object's appearance (e.g. colour) directly.
    cfg.MODEL.EXTENSIONS.HEAD_MASK_POOLING = ""
    # the same heads also read each query's own soft mask resampled on a k x k grid over its box (its
    # silhouette, scale- and position-normalised); 0 = off. Mean-pooled features carry colour but hardly shape.
    cfg.MODEL.EXTENSIONS.HEAD_MASK_SHAPE_GRID = 0
    # score referring / gres sentences through the category path (class_projector + the decoder's
    # class_head) instead of their own refer_projector + refer_head (which the model then does not have),
    # so what the category task learns about names serves referring.
    cfg.MODEL.EXTENSIONS.REFER_AS_CLASS = False
    # referring / interactive: also -CLASS_WEIGHT * sigmoid(score) in the matching cost, as the class term
    # of category tasks (official PSALM and the paper: mask cost only for these tasks)
    cfg.MODEL.EXTENSIONS.MATCH_WITH_SCORES = False


def extension_options_set(cfg) -> list:
    """The ``MODEL.EXTENSIONS`` keys of ``cfg`` that differ from their defaults (off), sorted."""
    defaults = CN()
    defaults.MODEL = CN()
    _add_extensions_config(defaults)
    return sorted(k for k, v in cfg.MODEL.EXTENSIONS.items() if v != defaults.MODEL.EXTENSIONS[k])


def _add_input_config(cfg):
    # Resize the long side to IMAGE_SIZE, pad right/bottom to IMAGE_SIZE x IMAGE_SIZE.
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.PAD_VALUE = 128.0
    # visual prompts rasterised as disks (official: point radius 10, scribble radius 5)
    cfg.INPUT.POINT_RADIUS = 10
    cfg.INPUT.SCRIBBLE_RADIUS = 5
    # which prompt types interactive training samples draw from (uniformly per annotation)
    cfg.INPUT.INTERACTIVE_PROMPT_TYPES = ["point", "scribble", "box", "mask"]


def _add_data_config(cfg):
    # One task per data set in DATASETS.TRAIN: panoptic | instance | semantic | referring |
    # interactive | instruction | caption.
    cfg.DATASETS.TRAIN_TASKS = []
    # sampling weights of the data sets in DATASETS.TRAIN (paper: equal)
    cfg.DATASETS.TRAIN_RATIOS = []
    # a task curriculum: from iteration TRAIN_RATIO_STEPS[i] on, sample with TRAIN_RATIOS_AFTER_STEPS[i]
    # (one list of weights per step) instead of TRAIN_RATIOS
    cfg.DATASETS.TRAIN_RATIO_STEPS = []
    cfg.DATASETS.TRAIN_RATIOS_AFTER_STEPS = []
    cfg.DATASETS.TEST_TASKS = []
    # "random": one task per iteration drawn with TRAIN_RATIOS (paper); "round_robin": official.
    cfg.DATALOADER.TASK_SAMPLING = "random"
    cfg.DATALOADER.ROUND_ROBIN_PERIOD = 16
    # the built-in synthetic data set (psalm_synthetic_*; psalm/data/synthetic.py), generated on
    # first use. ROOT "": $PSALM_SYNTHETIC_DIR or ./datasets/psalm_synthetic. A root holds ONE spec (its
    # manifest.json): a config with other SYNTHETIC values needs a ROOT of its own (an error says so)
    cfg.DATASETS.SYNTHETIC = CN()
    cfg.DATASETS.SYNTHETIC.ROOT = ""
    cfg.DATASETS.SYNTHETIC.SEED = 0
    cfg.DATASETS.SYNTHETIC.IMAGE_SIZE = 128
    cfg.DATASETS.SYNTHETIC.NUM_TRAIN = 400
    cfg.DATASETS.SYNTHETIC.NUM_VAL = 40  # psalm_synthetic_val_*: the dev split (every choice is made there)
    # psalm_synthetic_test_*: reported figures only, drawn from its own seed (psalm/data/synthetic.py)
    cfg.DATASETS.SYNTHETIC.NUM_TEST = 40
    cfg.DATASETS.SYNTHETIC.TEST_SEED = 2026
    # half-extent ranges of "small" / "large" objects as fractions of IMAGE_SIZE
    cfg.DATASETS.SYNTHETIC.SMALL_RADIUS = [0.08, 0.10]
    cfg.DATASETS.SYNTHETIC.LARGE_RADIUS = [0.15, 0.19]


def _add_solver_config(cfg):
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BETAS = (0.9, 0.999)
    cfg.SOLVER.EPS = 1e-8
    # update kernel: "auto" (fused, except under FSDP) | "fused" | "foreach" | "for_loop"
    cfg.SOLVER.OPTIMIZER_IMPL = "auto"
    # bf16 | fp16 autocast on GPU when SOLVER.AMP.ENABLED
    cfg.SOLVER.AMP.PRECISION = "bf16"
    # "ddp" | "fsdp" (full sharding) | "zero" (ZeroRedundancyOptimizer: optimizer-state sharding)
    cfg.SOLVER.SHARDING = "ddp"
    # PSALM trains without weight decay (paper Table 16); detectron2's default is 1e-4
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    # single-task batches leave the other tasks' heads without gradient
    cfg.SOLVER.DDP_FIND_UNUSED_PARAMETERS = True
    cfg.SOLVER.FSDP = CN()
    # class names of the sub-modules that become their own FSDP unit (then the root)
    cfg.SOLVER.FSDP.WRAP_MODULES = ["PhiDecoderLayer", "SwinStage"]
    cfg.SOLVER.FSDP.RESHARD_AFTER_FORWARD = True
    # fnmatch patterns of the parameters to train (empty: whatever the model leaves trainable);
    # e.g. stage 1: ["projector.*"]
    cfg.SOLVER.TRAINABLE_PARAMETERS = []
    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE also accepts "full_model" (one norm over all gradients)
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    # keep at most this many periodic checkpoints (0: all), counting those of earlier runs in OUTPUT_DIR
    # (a resumed run prunes them too); model_final is always kept. Saves are atomic, so 2 always leaves
    # an intact previous checkpoint (the full model is ~24 GB per file)
    cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP = 2
    # console / metrics.json / TensorBoard period in iterations
    cfg.SOLVER.LOG_PERIOD = 20


def _add_test_config(cfg):
    cfg.TEST.PSALM = CN()
    # generalized referring: union of query masks with score > threshold
    cfg.TEST.PSALM.GREF_SCORE_THRESHOLD = 0.6
    # when no query passes: "top1" (official, never empty) or "empty" (explicit no-target)
    cfg.TEST.PSALM.GREF_NO_TARGET = "top1"
    # (no protocol / prompt-type keys: the data set decides. RefCOCO's protocol is in its name,
    # refcoco_unc_val (per sentence) or refcoco_unc_val_per_ref (official); COCO-Interactive's prompt
    # type is its metadata prompt_type, coco_interactive_val_{point,scribble,box,mask})
    # ground-truth polygons -> masks in our referring / gres / interactive evaluators:
    # "coco" (pycocotools, standard) | "official" (cv2.fillPoly after int32 truncation, as the
    # official evaluation scripts; use it to reproduce their numbers exactly)
    cfg.TEST.PSALM.GT_POLYGON_RASTERIZER = "coco"
    cfg.TEST.PSALM.MAX_NEW_TOKENS = 128
    # Inference precision (PSALMPredictor, tools/benchmark.py, every evaluation: psalm.engine.evaluation): "auto" = bf16 autocast on CUDA, fp32 on
    # CPU; "fp32"; "bf16" (autocast, CUDA or CPU); "fp16" (autocast, CUDA only).
    cfg.TEST.PSALM.DTYPE = "auto"
    # images per inference batch of the test loader (per process), in tools/train_net.py (--eval-only and
    # periodic) and tools/eval_zero_shot.py alike (psalm.engine.evaluation)
    cfg.TEST.PSALM.IMS_PER_BATCH = 4
    # video object segmentation by propagation (psalm.inference.video, the official DAVIS protocol)
    cfg.TEST.PSALM.VIDEO = CN()
    # per object: the first of its TOP_K best queries not taken by an earlier object
    cfg.TEST.PSALM.VIDEO.TOP_K = 10
    # the memory (frame encoding + predicted masks) moves on only if no two masks have a larger IoU
    cfg.TEST.PSALM.VIDEO.MEMORY_IOU_THRESHOLD = 0.4
    # compat only: reset the prompts from frame-0 GT when the CURRENT frame's GT object count differs
    # from the memory (the official evaluation; reads ground truth of later frames)
    cfg.TEST.PSALM.VIDEO.OFFICIAL_GT_RESET = False


def add_psalm_config(cfg):
    """Add every PSALM option to a detectron2 config (in place) and return it.

    Call it once on ``detectron2.config.get_cfg()`` before ``merge_from_file``.
    """
    if hasattr(cfg.MODEL, "PSALM"):
        return cfg
    cfg.MODEL.META_ARCHITECTURE = "PSALM"
    cfg.MODEL.BACKBONE.NAME = "PSALMSwinTransformer"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.INPUT.FORMAT = "RGB"
    _add_swin_config(cfg)
    _add_mask_former_config(cfg)
    _add_psalm_model_config(cfg)
    _add_extensions_config(cfg)
    _add_input_config(cfg)
    _add_data_config(cfg)
    _add_solver_config(cfg)
    _add_test_config(cfg)
    return cfg


def get_psalm_cfg(config_file=None, opts=None):
    """A fresh config with PSALM options, optionally merged with a YAML file and ``opts``."""
    from detectron2.config import get_cfg

    cfg = add_psalm_config(get_cfg())
    if config_file:
        cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg
