import json

import pytest
import torch

from conftest import nanoseek_cli
from nanoseek.common import UserError
from nanoseek.distributed.eplb import (balanced_packing, contiguous, imbalance, load_records, main, rank_loads,
                                       rebalance, replicate)

# the example of deepseek-ai/EPLB's README: 2 layers, 12 experts in 4 groups, 16 slots, 2 nodes x 4 ranks
README_LOAD = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def lognormal(L, E, seed=0):
    return torch.randn(L, E, generator=torch.Generator().manual_seed(seed), dtype=torch.double).exp()


def check_placement(p, L, E, R):
    assert p.phy2log.shape == (L, R) and p.logcnt.shape == (L, E)
    assert (p.logcnt >= 1).all() and (p.logcnt.sum(-1) == R).all()          # every expert placed, R slots used
    for l in range(L):
        assert sorted(p.phy2log[l].tolist()) == sorted(e for e in range(E) for _ in range(int(p.logcnt[l, e])))
        for e in range(E):
            slots = p.log2phy[l, e]
            n = int(p.logcnt[l, e])
            assert (slots[n:] == -1).all() and (p.phy2log[l, slots[:n]] == e).all()


def test_readme_example_hand_checkable():
    p = rebalance(README_LOAD, num_replicas=16, num_groups=4, num_nodes=2, num_ranks=8)
    check_placement(p, 2, 12, 16)
    # slot for slot the README's output (ranks of 2 slots, rank-major)
    assert p.phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    # layer 0 by hand: group loads 262, 330, 116, 325 -> node 0 {1, 2} = 446, node 1 {3, 0} = 587; node 0's
    # 2 extra slots go to 165 and 104 (165/2 = 82.5 > 104/2 = 52 > 61 ...), node 1's to 183 and 132
    assert p.logcnt[0].tolist() == [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]
    # hierarchical: every replica of a group's experts sits on one node (slots 0-7 node 0, 8-15 node 1)
    for l in range(2):
        node_of = {}
        for slot, e in enumerate(p.phy2log[l].tolist()):
            assert node_of.setdefault(e // 3, slot // 8) == slot // 8
    per_layer, _ = imbalance(README_LOAD, p.phy2log, 8)
    assert per_layer.tolist() == pytest.approx([1.2081, 1.2422], abs=1e-4)      # the spec: 1.21-1.24
    assert rank_loads(README_LOAD, p.phy2log, 8).sum(-1).tolist() == README_LOAD.double().sum(-1).tolist()


def test_balanced_packing_and_replication_by_hand():
    # 8 7 6 5 4 3 2 1 into 2 packs of 4: 8|7, 6->B 13, 5->A 13, 4->A 17, 3->B 16, 2->B 18 (full), 1->A 18
    assert balanced_packing([8, 7, 6, 5, 4, 3, 2, 1], 2) == [[0, 3, 4, 7], [1, 2, 5, 6]]       # 18 / 18: optimal
    # the count limit binds: the 10 must share its pack with one 1, so 11 / 2 is the best there is
    assert balanced_packing([1, 10, 1, 1], 2) == [[1, 3], [0, 2]]
    # 6 3 1 over 6 slots, 3 extra: 6 -> 3 per copy; 3 vs 3, the first wins -> 2; then the 3 -> 1.5: max 2
    assert replicate([6, 3, 1], 6) == [3, 2, 1]


def test_eplb_beats_contiguous_on_skewed_load():
    load = lognormal(8, 64)         # 8 layers, 64 experts, 4 groups on 2 nodes x 4 ranks
    figs = {"contiguous": imbalance(load, contiguous(64, 8, 8).phy2log, 8)[1],
            "eplb": imbalance(load, rebalance(load, 64, 4, 2, 8).phy2log, 8)[1],
            "eplb+8": imbalance(load, rebalance(load, 72, 4, 2, 8).phy2log, 8)[1],
            "global+8": imbalance(load, rebalance(load, 72, 1, 1, 8).phy2log, 8)[1]}
    # measured: contiguous 1.757, eplb 1.140, eplb+8 1.049, global+8 1.005 (no group-on-node constraint)
    assert figs["contiguous"] > 1.7
    assert figs["eplb"] < 1.15 and figs["eplb+8"] < 1.06 and figs["global+8"] < 1.01


def test_global_policy_placement():
    load = lognormal(3, 12, seed=1)
    p = rebalance(load, 18, num_groups=3, num_nodes=2, num_ranks=6)      # 3 groups do not split over 2 nodes
    check_placement(p, 3, 12, 18)
    assert (imbalance(load, p.phy2log, 6)[0] < imbalance(load, contiguous(12, 6, 3).phy2log, 6)[0]).all()


def test_uniform_load_is_perfect():
    load = torch.full((2, 16), 5.0)
    load[1] = 0.0                                    # a layer that routed nothing counts as balanced
    for phy2log in (contiguous(16, 4, 2).phy2log, rebalance(load, 16, 4, 2, 4).phy2log):
        per_layer, mean = imbalance(load, phy2log, 4)
        assert per_layer.tolist() == [1.0, 1.0] and mean == 1.0


@pytest.mark.parametrize("load, args, name", [
    (README_LOAD, (10, 4, 2, 2), "num_replicas"),         # fewer slots than experts
    (README_LOAD, (18, 4, 2, 8), "num_replicas"),         # 18 slots on 8 ranks
    (README_LOAD, (16, 5, 1, 8), "num_groups"),           # 5 groups of 12 experts
    (README_LOAD, (16, 4, 3, 8), "num_ranks"),            # 8 ranks on 3 nodes
    (README_LOAD, (16, 4, 0, 8), "num_nodes"),
    (README_LOAD[0], (16, 4, 2, 8), "load_LE"),           # 1-D
    (-README_LOAD, (16, 4, 2, 8), "load_LE"),             # negative loads
])
def test_bad_input_names_the_argument(load, args, name):
    with pytest.raises(UserError, match=name):
        rebalance(load, *args)


def test_cli_synthetic_writes_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    res = main(["--synthetic", "--layers", "3", "--experts", "16", "--ranks", "2", "--groups", "4",
                "--redundant", "2", "--out", str(out)])
    assert "mean" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res)) and saved["policy"] == "global"
    assert len(saved["phy2log"]) == 3 and len(saved["phy2log"][0]) == 18 and saved["slots_per_rank"] == 9
    figs = saved["max_over_mean"]
    assert list(figs) == ["contiguous", "eplb", "eplb+2"]
    assert figs["eplb+2"]["mean"] <= figs["eplb"]["mean"] <= figs["contiguous"]["mean"]


def test_cli_reads_a_run_and_reports_errors(tmp_path):
    (tmp_path / "expert_load.json").write_text(json.dumps(
        {"layers": [1, 2], "load": README_LOAD.tolist(), "steps": 7}))
    res = main(["--run", str(tmp_path), "--ranks", "4", "--nodes", "2", "--groups", "4"])   # 12 + 4 slots
    assert res["layers"] == [1, 2] and (tmp_path / "eplb.json").exists()
    bad = nanoseek_cli("eplb", "--run", tmp_path, "--ranks", "4", "--redundant", "3")
    assert bad.returncode == 2 and "--ranks" in bad.stderr
    assert "nearest: 12 (--redundant 0) or 16 (--redundant 4)" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    ("{not json", "expected"),
    (json.dumps({"layers": [0], "steps": 1}), "expected"),                                  # no "load"
    (json.dumps({"layers": [0, 1], "load": [[1, 2], [3]], "steps": 1}), "expected"),        # ragged
    (json.dumps({"layers": [0], "load": [[1, 2], [3, 4]], "steps": 1}), "one non-empty row"),
    (json.dumps({"layers": [0], "load": [[1, -2]], "steps": 1}), ">= 0"),
])
def test_load_records_errors(tmp_path, content, match):
    if content is not None:
        (tmp_path / "expert_load.json").write_text(content)
    with pytest.raises(UserError, match=match):
        load_records(tmp_path)


def test_load_records_roundtrip(tmp_path):
    f = tmp_path / "expert_load.json"
    f.write_text(json.dumps({"layers": [3, 4], "load": README_LOAD.tolist(), "steps": 9}))
    load, layers, steps = load_records(f)
    assert torch.equal(load, README_LOAD.double()) and layers == [3, 4] and steps == 9
