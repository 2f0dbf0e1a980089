import pytest
import torch

from psalm.checkpoint import IncompatibleKeysError, load_strict


def _net():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_exact_state_dict_loads():
    src, dst = _net(), _net()
    report = load_strict(dst, src.state_dict())
    assert report.ok
    assert torch.equal(dst[0].weight, src[0].weight)


def test_every_kind_of_problem_is_reported_and_nothing_is_loaded():
    dst = _net()
    before = dst[1].weight.clone()
    sd = _net().state_dict()
    del sd["0.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["1.weight"] = torch.zeros(5, 4)
    with pytest.raises(IncompatibleKeysError) as e:
        load_strict(dst, sd)
    r = e.value.report
    assert r.missing == ["0.bias"] and r.unexpected == ["extra.weight"]
    assert r.mismatched == [("1.weight", (5, 4), (2, 4))]
    assert "0.bias" in str(e.value) and "extra.weight" in str(e.value)
    assert torch.equal(dst[1].weight, before)


def test_allowed_exceptions_by_name_and_pattern():
    dst = _net()
    sd = _net().state_dict()
    del sd["0.bias"]
    sd["dead.query_feat"] = torch.zeros(2)
    report = load_strict(dst, sd, allow_missing=["0.bias"], allow_unexpected=["dead.*"])
    assert report.allowed_missing == ["0.bias"] and report.allowed_unexpected == ["dead.query_feat"]
