"""PixelLM tokenizer loading: the added tokens strip whitespace like the official (4.31 slow) tokenizer,
and ``required=False`` only tolerates a directory without a tokenizer."""
import pytest


def test_added_pixellm_tokens_strip_surrounding_whitespace(pixellm_tok_dir):
    from pixellm.modeling.tokenizer import load_pixellm_tokenizer

    tok = load_pixellm_tokenizer(pixellm_tok_dir)
    spaced = tok("ASSISTANT: [SEG0] [SEG1] [SEG2]", add_special_tokens=False).input_ids
    plain = tok("ASSISTANT:[SEG0][SEG1][SEG2]", add_special_tokens=False).input_ids
    assert spaced == plain, tok.convert_ids_to_tokens(spaced)
    seg = tok.convert_tokens_to_ids(["[SEG0]", "[SEG1]", "[SEG2]"])
    assert spaced[-3:] == seg
    im = tok("USER: <im_start>x<im_end>\n What", add_special_tokens=False).input_ids
    assert im == tok("USER:<im_start>x<im_end>What", add_special_tokens=False).input_ids


def test_required_false_only_tolerates_a_missing_tokenizer(tmp_path):
    from pixellm.modeling.tokenizer import load_pixellm_tokenizer

    assert load_pixellm_tokenizer(tmp_path, required=False) is None
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_pixellm_tokenizer(tmp_path, required=True)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="cannot load the tokenizer"):
        load_pixellm_tokenizer(tmp_path, required=False)
