"""FSDP mixed precision from the config: bf16 training all-gathers bf16 parameters, reduces fp32 gradients."""
import os

import pytest
import torch

from psalm.config import get_psalm_cfg
from psalm.engine.distributed import fsdp_mixed_precision_policy


def _cfg(enabled=True, precision="bf16"):
    cfg = get_psalm_cfg()
    cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.PRECISION, cfg.SOLVER.SHARDING = enabled, precision, "fsdp"
    return cfg


def test_policy_follows_the_training_precision():
    policy = fsdp_mixed_precision_policy(_cfg(), torch.device("cuda"))  # a device object: no GPU needed
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert policy.output_dtype is None and policy.cast_forward_inputs
    assert fsdp_mixed_precision_policy(_cfg(), torch.device("cpu")) is None  # AMP is GPU-only: fp32 on CPU
    assert fsdp_mixed_precision_policy(_cfg(precision="fp16"), "cuda") is None  # autocast + GradScaler
    assert fsdp_mixed_precision_policy(_cfg(enabled=False), "cuda") is None


def _tiny_llm_cfg():
    cfg = _cfg()
    llm = cfg.MODEL.PSALM.LLM
    llm.VOCAB_SIZE, llm.HIDDEN_SIZE, llm.INTERMEDIATE_SIZE, llm.NUM_HIDDEN_LAYERS, llm.NUM_ATTENTION_HEADS = (
        97, 64, 128, 2, 4)
    return cfg


class _LMLoss(torch.nn.Module):
    """The FSDP root, as PSALM's meta-arch is: its forward runs the LLM and the LM loss."""

    def __init__(self, llm):
        super().__init__()
        self.llm = llm

    def forward(self, embeds, labels):
        from psalm.modeling.llm import causal_lm_loss

        hidden = self.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return causal_lm_loss(self.llm, hidden, labels), hidden.dtype


def _fsdp_job(out_dir):
    """In each of 2 gloo processes: one forward + backward of a tiny Phi, sharded per decoder layer,
    with the bf16 policy of the config and without a policy."""
    from detectron2.utils import comm

    from psalm.engine.distributed import fsdp_shard
    from psalm.modeling.llm import build_llm

    cfg = _tiny_llm_cfg()
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 10, 64, generator=g)
    labels = torch.randint(0, 97, (2, 10), generator=g)
    labels[:, :6] = -100
    result = {}
    for name, policy in (("bf16", fsdp_mixed_precision_policy(cfg, torch.device("cuda"))), ("fp32", None)):
        torch.manual_seed(0)  # the same weights on both ranks and in both runs
        model = fsdp_shard(cfg, _LMLoss(build_llm(cfg)), policy)
        seen = []
        model.llm.model.layers[0].mlp.fc1.register_forward_pre_hook(lambda m, inp: seen.append(m.weight.dtype))
        loss, hidden_dtype = model(embeds, labels)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        result[name] = {"loss": loss.detach().float(), "unsharded_dtype": str(seen[0]),
                        "hidden_dtype": str(hidden_dtype),
                        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                        "grad_dtypes": sorted({str(gr.dtype) for gr in grads.values()}), "grads": grads}
    torch.save(result, os.path.join(out_dir, f"rank{comm.get_rank()}.pt"))


@pytest.mark.slow
def test_two_process_gloo_fsdp_step_with_the_bf16_policy(tmp_path):
    """Slow only because each spawned process imports torch + detectron2 (~5 s)."""
    from psalm.engine import launch

    launch(_fsdp_job, 2, args=(str(tmp_path),))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    bf, fp = r0["bf16"], r0["fp32"]
    assert bf["unsharded_dtype"] == "torch.bfloat16" and fp["unsharded_dtype"] == "torch.float32"
    assert bf["hidden_dtype"] == "torch.bfloat16"
    assert bf["param_dtypes"] == ["torch.float32"]  # the sharded master parameters stay fp32
    assert bf["grad_dtypes"] == ["torch.float32"] == fp["grad_dtypes"]  # reduced in fp32
    for name in ("bf16", "fp32"):
        assert torch.equal(r0[name]["loss"], r1[name]["loss"])
        for k, gr in r0[name]["grads"].items():
            assert torch.equal(gr, r1[name]["grads"][k]), (name, k)
    torch.testing.assert_close(bf["loss"], fp["loss"], rtol=2e-2, atol=0)
    assert not torch.equal(bf["loss"], fp["loss"])  # the bf16 run did compute in bf16
    for k, gr in fp["grads"].items():
        cos = torch.nn.functional.cosine_similarity(bf["grads"][k].flatten(), gr.flatten(), dim=0)
        assert cos > 0.99, (k, float(cos))
