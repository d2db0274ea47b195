import json

from conftest import nanoseek_cli
from nanoseek.config import load_preset
from nanoseek.info import model_info


def test_v3_counts_match_the_release():
    info = model_info(load_preset("v3"))
    assert info["total_params"] == 671_026_419_200
    assert info["mtp_params"] == 11_610_068_224
    assert info["kv_cache_bytes_per_token"] == 70_272
    assert 37.5e9 < info["activated_params"] < 37.6e9
    assert 36.6e9 < info["activated_params_no_embedding"] < 36.7e9


def test_v2_lite_total():
    assert model_info(load_preset("v2-lite"))["total_params"] == 15_706_484_224


def test_cli_json_and_bad_preset():
    out = nanoseek_cli("info", "v3", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["total_params"] == 671_026_419_200
    bad = nanoseek_cli("info", "v9")
    assert bad.returncode == 2 and "unknown preset" in bad.stderr and "Traceback" not in bad.stderr
