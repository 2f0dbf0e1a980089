"""PromptBuilder, the tiny tokenizer and the tokenizer loader (golden parity: psalm_e2e)."""

import json

import pytest
import torch

from psalm.modeling import tasks
from psalm.modeling.llm import load_tokenizer
from psalm.data.prompt import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    SEG_TOKEN_INDEX,
    PromptBuilder,
    merge_sentences,
)
from psalm.data.tokenizer import build_tiny_tokenizer, save_tiny_tokenizer

SENTENCES = ["the person in red on the left", "red figure"]
CLASSES = ["person", "car", "tree-merged"]


@pytest.fixture(scope="module")
def golden(golden_dir):
    from safetensors.torch import load_file

    d = golden_dir / "psalm_e2e"
    return {
        "t": load_file(str(d / "tensors.safetensors")),
        "m": json.loads((d / "manifest.json").read_text()),
        "tok": load_tokenizer(d / "tokenizer"),
    }


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return load_tokenizer(save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _golden_prompts(builder):
    return {
        "referring": builder.build("referring", sentences=SENTENCES),
        "panoptic": builder.build("panoptic", class_names=CLASSES),
        "region": builder.build("interactive", num_regions=2),
    }


@pytest.mark.golden
def test_golden_prompts_and_token_ids(golden):
    t, m = golden["t"], golden["m"]
    prompts = _golden_prompts(PromptBuilder(golden["tok"]))
    for name, p in prompts.items():
        assert p.text == m["tasks"][name]["prompt"], name
        assert torch.equal(p.input_ids, t[f"{name}.input_ids"][0]), name
        assert torch.equal(p.labels, t[f"{name}.labels"][0]), name
        assert len(p.input_ids) == m["tasks"][name]["seq_len_before_splice"]
    assert torch.equal(prompts["referring"].refer_token_ids, t["referring.token_refer_id"])
    assert prompts["referring"].refer_token_ids.tolist() == m["tasks"]["referring"]["token_refer_id"]
    pan = prompts["panoptic"]
    assert torch.equal(pan.class_name_ids, t["panoptic.class_name_ids"][0])
    assert torch.equal(pan.cls_indices, t["panoptic.cls_indices"][0])
    assert pan.num_classes == 4 and pan.class_order.tolist() == [0, 1, 2, 3]
    assert prompts["region"].num_regions == 2
    # official per-sample index masks before splicing: 1 at the placeholder
    assert torch.equal((pan.input_ids == -202).long(), t["panoptic.class_name_embedding_indices"][0])
    assert torch.equal((prompts["referring"].input_ids == -204).long(), t["referring.refer_embedding_indices"][0])


@pytest.mark.golden
def test_other_tasks_use_the_official_wording(golden):
    b = PromptBuilder(golden["tok"])
    pan = b.build("panoptic", class_names=CLASSES)
    for task in ("instance", "semantic"):  # official eval scripts use the panoptic sentence
        assert torch.equal(b.build(task, class_names=CLASSES).input_ids, pan.input_ids)
    ref = b.build("referring", sentences=SENTENCES)
    assert torch.equal(b.build("gres", sentences=SENTENCES).input_ids, ref.input_ids)
    assert merge_sentences(SENTENCES) == " the person in red on the left. red figure."
    text = b.render("interactive", num_regions=3)
    assert "This is all regions:  <region>, <region>, <region>.\n [/INST] \n[SEG]<seg> <|endoftext|>" in text


@pytest.mark.golden
def test_shuffled_classes_record_the_order(golden):
    b = PromptBuilder(golden["tok"])
    plain = b.build("panoptic", class_names=CLASSES)
    gen = torch.Generator().manual_seed(3)
    shuf = b.build("panoptic", class_names=CLASSES, shuffle_classes=True, generator=gen)
    order = shuf.class_order
    assert sorted(order.tolist()) == [0, 1, 2, 3] and order.tolist() != [0, 1, 2, 3]
    assert torch.equal(shuf.input_ids, plain.input_ids)  # the sentence does not depend on the order
    for i, span in enumerate(shuf.class_token_ids):
        assert torch.equal(span, plain.class_token_ids[int(order[i])])
    restored = [shuf.class_token_ids[int(j)] for j in shuf.restore_index]
    assert all(torch.equal(a, c) for a, c in zip(restored, plain.class_token_ids))
    # same generator state -> same order
    again = b.build("panoptic", class_names=CLASSES, shuffle_classes=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.class_order, order)


def test_conversation_labels_cover_exactly_the_answers(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer)
    conv = [
        {"from": "human", "value": "What is in the picture?\n<image>"},
        {"from": "gpt", "value": "A red car."},
        {"from": "human", "value": "Where is it?"},
        {"from": "gpt", "value": "On the left."},
    ]
    p = b.build("instruction", conversation=conv)
    assert p.text.startswith("[INST] <<SYS>>\n") and "<image>\nWhat is in the picture? [/INST]" in p.text
    assert p.text.endswith(
        " A red car. <|endoftext|><|endoftext|>[INST] Where is it? [/INST] On the left. <|endoftext|>"
    )
    assert (p.input_ids == IMAGE_TOKEN_INDEX).sum() == 1
    supervised = p.input_ids[p.labels != IGNORE_INDEX]
    assert tiny_tokenizer.decode(supervised) == " A red car. <|endoftext|> On the left. <|endoftext|>"
    # generation prompt: no answer, ends with [/INST], nothing supervised
    g = b.build("instruction", conversation=conv[:3], add_generation_prompt=True)
    assert g.text.endswith("[INST] Where is it? [/INST]") and bool((g.labels == IGNORE_INDEX).all())
    # a conversation without <image> gets it at the start of the first human turn
    c = b.build("caption", conversation=[{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A cat."}])
    assert "<</SYS>>\n\n<image>\nDescribe. [/INST] A cat. <|endoftext|>" in c.text


def test_segmentation_labels_supervise_the_answer_only(tiny_tokenizer):
    p = PromptBuilder(tiny_tokenizer).build("referring", sentences=["a dog"])
    sup = p.labels != IGNORE_INDEX
    assert p.input_ids[sup][-3:].tolist() == [
        SEG_TOKEN_INDEX,
        *tiny_tokenizer.encode(" <|endoftext|>", add_special_tokens=False),
    ]
    answer = p.input_ids[sup][p.input_ids[sup] >= 0]
    assert tiny_tokenizer.decode(answer) == " \nSure, the segmentation result is  <|endoftext|>"


def test_bad_inputs_raise(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer, model_max_length=64)
    with pytest.raises(ValueError, match="unknown task"):
        b.build("detection")
    with pytest.raises(ValueError, match="class_names"):
        b.build("panoptic", class_names=[])
    with pytest.raises(ValueError, match="sentences"):
        b.build("referring", sentences=[])
    with pytest.raises(ValueError, match="region"):
        b.build("interactive", num_regions=0)
    with pytest.raises(ValueError, match="MODEL_MAX_LENGTH"):
        b.build("panoptic", class_names=["a"])  # the segmentation prompt is longer than 64 ids
    long = b.build(
        "instruction", conversation=[{"from": "human", "value": "hi " * 100}, {"from": "gpt", "value": "ok"}]
    )
    assert len(long.input_ids) == 64  # language prompts are truncated (official collator)
    with pytest.raises(ValueError, match="alternate"):
        b.build("instruction", conversation=[{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])


def test_tasks_module():
    assert tasks.is_category_task("semantic") and not tasks.is_category_task("gres")
    assert tasks.condition_type("gres") == "sentence" and tasks.condition_type("caption") is None
    assert tasks.condition_type("interactive") == "region"
    assert set(tasks.ALL_TASKS) == set(tasks.SEGMENTATION_TASKS) | set(tasks.LM_TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.check_task("Panoptic")


def test_tiny_tokenizer_round_trip_and_determinism(tmp_path):
    tok = build_tiny_tokenizer()
    texts = [
        "".join(chr(c) for c in range(32, 127)),
        "[INST] <<SYS>>\n\tTabs, new\nlines  and   spaces; x=1+2 <image> [/INST]",
        "the person in red on the left. red figure.",
    ]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    n = len(tok)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == n - 3 == tok.eos_token_id
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == n - 2
    assert tok.convert_tokens_to_ids("[SEG]") == n - 1
    assert tok.encode(" <|endoftext|>", add_special_tokens=False) == [220, n - 3]  # GPT-2 byte order: space = 220
    assert tok.encode("\n[SEG]", add_special_tokens=False) == [198, n - 1]
    # merges make prompts shorter than one token per byte
    assert len(tok.encode(texts[2], add_special_tokens=False)) < len(texts[2]) // 2
    a, b = save_tiny_tokenizer(tmp_path / "a"), save_tiny_tokenizer(tmp_path / "b")
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    loaded = load_tokenizer(a)
    assert len(loaded) == n and loaded.encode(texts[1], add_special_tokens=False) == tok.encode(
        texts[1], add_special_tokens=False
    )


def test_load_tokenizer_adds_pad_then_seg(tmp_path):
    base = build_tiny_tokenizer(add_psalm_tokens=False)
    assert base.pad_token is None
    base.save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    n = len(base)
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == n
    assert tok.convert_tokens_to_ids("[SEG]") == n + 1 and len(tok) == n + 2
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="MODEL.PSALM.TOKENIZER"):
        load_tokenizer("")
