"""The ablation of the central claim (cfebm.ablation): the variants are what they say, and
each stops at the same compute."""

from dataclasses import replace

import pytest
from fixtures_models import digits_config

from cfebm.ablation import VARIANTS, run_ablation, variant_config
from cfebm.config import ConfigError
from cfebm.data import PyramidStore
from cfebm.features import FeatureTrainConfig, LabelledImages, save_feature_net, train_feature_net
from cfebm.metrics import domain_extractor


def test_variants_change_only_what_they_ablate():
    base = digits_config()
    assert variant_config(base, "coarse_to_fine") == base
    no_c2f = variant_config(base, "no_coarse_sampling")
    assert no_c2f.sampler.coarse_to_fine is False and no_c2f.model == base.model
    direct = variant_config(base, "finest_direct")
    assert direct.model.resolutions == (8,)
    assert direct.sampler.steps == base.sampler.steps * base.model.num_stages
    assert direct.model.base_width == base.model.base_width
    with pytest.raises(ConfigError, match="not in"):
        variant_config(base, "bogus")


@pytest.fixture(scope="module")
def extractor(digits_data, tmp_path_factory):
    store = PyramidStore(digits_data)
    train = LabelledImages({8: store.read("train", 8)}, store.labels("train"))
    cfg = FeatureTrainConfig(epochs=2, batch_size=64, width=8, feature_dim=16, seed=0)
    path = str(tmp_path_factory.mktemp("features") / "features.pt")
    save_feature_net(train_feature_net(train, cfg, [10]), path, "cfebm-test-cnn")
    return domain_extractor(path)


def test_every_variant_stops_at_the_budget_and_is_scored(digits_data, extractor, one_thread):
    base = digits_config()
    base = replace(base, train=replace(base.train, fade_images=640, stable_images=640))
    base = replace(base, sampler=replace(base.sampler, steps=4))
    seen = []
    results = run_ablation(
        base,
        PyramidStore(digits_data),
        extractor,
        VARIANTS,
        num_samples=32,
        num_reference=64,
        log=lambda line: None,
        done=lambda name, cfg, result: seen.append(name),
    )
    assert seen[0] == "coarse_to_fine" and sorted(seen) == sorted(VARIANTS)
    budget = results["coarse_to_fine"]["gflops"]
    for name, r in results.items():
        # stopped within one training step of the budget (a step is far below 10% of it)
        assert budget <= r["gflops"] < 1.1 * budget, (name, r["gflops"], budget)
        assert r["resolution"] == 8 and r["fid"] > 0 and 0 < len(r["curve"]) <= 4 + 1
        assert r["curve"][-1]["gflops"] == pytest.approx(r["gflops"])
    # the same compute buys different images: the direct chain is longer per step
    assert results["finest_direct"]["images"] != results["coarse_to_fine"]["images"]


def test_without_coarse_to_fine_a_budget_is_needed(digits_data, extractor):
    with pytest.raises(ConfigError, match="budget_gflops"):
        run_ablation(digits_config(), PyramidStore(digits_data), extractor, ["finest_direct"])
