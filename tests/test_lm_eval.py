"""lm-evaluation-harness (`local-completions`) against `nanoseek serve`, end to end: a multiple-choice task
written locally (benchmarks/lm_eval_local.py), scored through the server's echo + logprobs, equals the
log-likelihoods nanoseek's model computes itself."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_lm_eval_scores_equal_nanoseeks_own(model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval_local import run
    r = run(str(model_dir), n_docs=12, workdir=str(tmp_path))
    assert r["docs"] == 12 and r["choices"] == 48
    assert r["max_abs_loglik_diff"] < 1e-4, r
    assert r["lm_eval_acc"] == r["nanoseek_acc"], r
