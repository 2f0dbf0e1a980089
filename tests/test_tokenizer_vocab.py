"""Real-size tokenizers against the model's vocabulary (issue #14): ``[SEG]`` / ``[PAD]`` ids and the
length must match the checkpoint's embedding rows, never silently shift."""
import pytest

from psalm.config import get_psalm_cfg
from psalm.modeling.llm import REAL_VOCAB_MIN, build_tokenizer

BASE = 50295  # phi-1_5: 50257 GPT-2 tokens + 38 whitespace tokens; <|endoftext|> = 50256


def _phi_like_tokenizer(directory, pad_token=None):
    """A word-level tokenizer with phi-1_5's base size and <|endoftext|> at 50256 (written in the HF format)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(BASE)}
    vocab["<|endoftext|>"] = 50256
    del vocab["w50256"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token=pad_token)
    assert len(fast) == BASE
    fast.save_pretrained(str(directory))
    return directory


def _cfg(tok_dir, vocab=50297):
    cfg = get_psalm_cfg()
    cfg.MODEL.PSALM.TOKENIZER = str(tok_dir)
    cfg.MODEL.PSALM.LLM.VOCAB_SIZE = vocab
    return cfg


def test_official_layout_loads(tmp_path):
    tok = build_tokenizer(_cfg(_phi_like_tokenizer(tmp_path / "phi")))
    assert len(tok) == 50297 and tok.pad_token_id == 50295 and tok.convert_tokens_to_ids("[SEG]") == 50296


def test_tokenizer_with_its_own_pad_token_is_refused(tmp_path):
    """[SEG] would take id 50295, the official [PAD] row, and the model would read the wrong embedding."""
    d = _phi_like_tokenizer(tmp_path / "phi_pad", pad_token="<|endoftext|>")
    with pytest.raises(ValueError, match=r"already had a pad token.*\[SEG\] took the id of the official \[PAD\] row"):
        build_tokenizer(_cfg(d))
    # consistent with a model trained on this tokenizer's 50296 rows
    tok = build_tokenizer(_cfg(d, vocab=50296))
    assert tok.convert_tokens_to_ids("[SEG]") == 50295


def test_real_vocabulary_has_no_spare_rows(tmp_path):
    with pytest.raises(ValueError, match="it has 50297 tokens, the model's vocabulary .* 50400"):
        build_tokenizer(_cfg(_phi_like_tokenizer(tmp_path / "phi"), vocab=50400))
    assert REAL_VOCAB_MIN == 50257


def test_tiny_vocabulary_may_keep_spare_rows(tmp_path):
    from psalm.data.tokenizer import save_tiny_tokenizer

    d = save_tiny_tokenizer(tmp_path / "tiny", num_merges=100)
    tok = build_tokenizer(_cfg(d, vocab=1000))
    assert len(tok) < 1000
    with pytest.raises(ValueError, match="smaller than"):
        build_tokenizer(_cfg(d, vocab=100))


def test_demo_readme_paths_are_what_the_converter_writes():
    """demo/README.md's MODEL.WEIGHTS / MODEL.PSALM.TOKENIZER are the files tools/convert_official.py
    writes for the --output that MODEL_ZOO.md uses."""
    import inspect
    import pathlib
    import re

    from psalm.checkpoint.official import convert_official_release

    repo = pathlib.Path(__file__).resolve().parents[1]
    zoo = (repo / "MODEL_ZOO.md").read_text()
    out = re.search(r"tools/convert_official\.py --release \S+ --output (\S+)", zoo).group(1)
    name = inspect.signature(convert_official_release).parameters["checkpoint_name"].default
    demo = (repo / "demo" / "README.md").read_text()
    # the paper-model commands (paths under checkpoints/; placeholders such as W.pth / TOK are not paths)
    weights = set(re.findall(r"MODEL\.WEIGHTS (checkpoints/\S+)", demo))
    tokenizers = set(re.findall(r"MODEL\.PSALM\.TOKENIZER (checkpoints/\S+)", demo))
    models = set(re.findall(r"--model (checkpoints/\S+)", demo))
    assert weights == {f"{out}/{name}"}, weights
    assert tokenizers == {out}, tokenizers  # the converter copies the release's tokenizer into --output
    assert models <= {out}, models  # a model directory: the converter's output
