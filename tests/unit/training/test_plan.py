"""The AutoGluon trainer's model plan (``include/training/autogluon_tabular/plan.py``): a pure function of
rows, columns, classes, cores, the budget and the rows it scores; no training here."""

from __future__ import annotations

import pytest

from scripts import load_script

plan_py = load_script("include/training/autogluon_tabular/plan.py", "autogluon_tabular_plan")


def trees(plan) -> list[str]:
    """The tree models kept, in order (the cheap LR and KNN of rule 7 left aside)."""
    return [m.key for m in plan.models if m.key not in plan_py.CHEAP]


def test_plan_of_26_classes_on_20k_rows_keeps_every_model_within_its_limit_and_the_budget():
    plan = plan_py.plan_models(rows=14_000, columns=16, classes=26, cores=2, budget=90)
    assert plan.models[0].key == "GBM"  # the strongest fast model first
    assert trees(plan) == ["GBM"]
    assert set(plan.left_out) == {"CAT", "XGB", "XT", "RF"} and "26 classes > 10" in plan.left_out["CAT"]
    assert "leaf values" in plan.left_out["XT"]  # 26 values a leaf: a forest too big to load and predict fast
    for model in plan.models:
        assert model.estimated_seconds <= model.max_time_limit <= plan.fit_time_limit
    assert sum(m.max_time_limit for m in plan.models) <= plan.fit_time_limit + 0.1 < 90
    gbm = plan.models[0]
    assert gbm.size < plan_py.DEFAULT_SIZE["GBM"] and gbm.params["learning_rate"] == 0.1  # rounds cut to fit
    # What the estimate says those rounds cost, one tree per class and round.
    one_round = plan_py.estimate_seconds("GBM", 14_000, 16, 26, 2, 1)
    assert gbm.size * one_round <= gbm.max_time_limit


def test_plan_caps_forests_of_many_classes_by_leaf_values():
    plan = plan_py.plan_models(rows=3500, columns=16, classes=26, cores=2, budget=30)
    forests = {m.key: m for m in plan.models if m.key in ("XT", "RF")}
    assert set(forests) == {"XT", "RF"}
    for model in forests.values():
        leaves = 3500 // 2  # a tree has at most about half the rows as leaves (below FOREST_LEAVES here)
        assert model.size * leaves * 26 <= plan_py.FOREST_VALUES < (model.size + 1) * leaves * 26
        assert model.params["max_leaf_nodes"] == plan_py.FOREST_LEAVES and "leaf values" in model.reason


def test_plan_of_tiny_data_keeps_the_full_list_at_the_library_sizes():
    plan = plan_py.plan_models(rows=300, columns=9, classes=2, cores=2, budget=60)
    assert trees(plan) == list(plan_py.ORDER) and plan.left_out == {}
    assert plan.models[0].params == {"num_boost_round": plan_py.DEFAULT_SIZE["GBM"]}  # defaults, lr untouched


def test_plan_of_big_data_on_a_short_budget_keeps_lightgbm_alone_and_says_why():
    plan = plan_py.plan_models(rows=200_000, columns=100, classes=2, cores=2, budget=90)
    assert trees(plan) == ["GBM"]
    left_trees = {k: why for k, why in plan.left_out.items() if k not in plan_py.CHEAP}
    assert all("at its smallest" in why for why in left_trees.values()) and len(left_trees) == 4
    assert "too big for a cheap model" in plan.left_out["KNN"]  # 200,000 rows: it compares with every one


def test_plan_order_is_the_priority_and_each_model_gets_its_time_limit():
    plan = plan_py.plan_models(rows=5_000, columns=20, classes=3, cores=4, budget=120, excluded=["CAT", "NN_TORCH"])
    assert plan.left_out["CAT"] == "excluded by --excluded-model-types"
    hyperparameters = plan.hyperparameters()
    assert list(hyperparameters) == [m.key for m in plan.models] and trees(plan) == ["GBM", "XGB", "XT", "RF"]
    priorities = [h["ag_args"]["priority"] for h in hyperparameters.values()]
    assert priorities == sorted(priorities, reverse=True)
    assert [h["ag_args_fit"]["max_time_limit"] for h in hyperparameters.values()] == [
        m.max_time_limit for m in plan.models
    ]
    assert plan.lines()[0].startswith(
        "model plan: 5000 rows x 20 columns, 3 classes, 4 cores (of 4, load 0.0, 100% of a core each), budget 120s"
    )


def test_plan_on_a_busy_machine_fits_with_half_the_cores():
    idle = plan_py.plan_models(rows=5_000, columns=20, classes=3, cores=2, budget=60, load=1.5)
    busy = plan_py.plan_models(rows=5_000, columns=20, classes=3, cores=2, budget=60, load=8.0)
    assert idle.shape["cores"] == 2 and busy.shape["cores"] == 1 and busy.shape["machine_cores"] == 2
    assert {h["ag_args_fit"]["num_cpus"] for h in busy.hyperparameters().values()} == {1}
    assert busy.models[0].estimated_seconds == pytest.approx(2 * idle.models[0].estimated_seconds, rel=0.01) or (
        busy.models[0].size < idle.models[0].size  # one core: twice the estimate, or fewer rounds to fit the share
    )


def test_plan_leaves_time_for_a_refit_and_multiplies_estimates_by_bagging_folds():
    plain = plan_py.plan_models(rows=10_000, columns=10, classes=2, cores=2, budget=100)
    refit = plan_py.plan_models(rows=10_000, columns=10, classes=2, cores=2, budget=100, refit_full=True)
    assert refit.fit_time_limit == pytest.approx(plain.fit_time_limit * plan_py.REFIT_SHARE)
    assert plan_py.estimate_seconds("RF", 1000, 10, 2, 2, 100, folds=8) == pytest.approx(
        8 * plan_py.estimate_seconds("RF", 1000, 10, 2, 2, 100)
    )


@pytest.mark.parametrize("counts", [(0, 5, 2, 2, 60), (100, 5, 2, 0, 60), (100, 5, 2, 2, 0)])
def test_plan_refuses_counts_that_are_not_positive(counts):
    with pytest.raises(ValueError, match="must be > 0"):
        plan_py.plan_models(*counts)


# --------------------------------------------------------------------------- the scoring cost (rule 5)


def test_many_class_booster_is_capped_so_scoring_validation_and_test_fits_its_share():
    plan = plan_py.plan_models(rows=14_000, columns=16, classes=26, cores=2, budget=90, scored_rows=3000)
    gbm = plan.models[0]
    assert plan.shape["cores"] == 2 and plan.shape["scored_rows"] == 3000
    # The cap: validation + as many test rows, 26 trees a round, within SCORING_SHARE of the budget ...
    one_round = plan_py.predict_seconds("GBM", 6000, 26, 2, 1)
    assert gbm.size * one_round <= plan_py.SCORING_SHARE * 90 < (gbm.size + 1) * one_round
    assert gbm.scoring_seconds == pytest.approx(plan_py.predict_seconds("GBM", 6000, 26, 2, gbm.size), abs=0.01)
    assert "capped so that scoring 3,000 validation and as many test rows" in gbm.reason
    # ... which is fewer rounds than the fit time alone would allow.
    assert gbm.size < plan_py._size_for("GBM", plan.fit_time_limit, plan.shape)
    # Its time limit is its share less the validation scoring it pays for inside the fit.
    validation = plan_py.predict_seconds("GBM", 3000, 26, 2, gbm.size)
    trees_share = plan.fit_time_limit * (1 - plan_py.CHEAP_SHARE * 2)  # LR and KNN take theirs first
    assert gbm.max_time_limit == pytest.approx(trees_share - validation, abs=0.1)
    assert "3000 validation rows scored" in plan.lines()[0] and "scoring ~" in plan.lines()[1]
    # On a loaded machine the cap stays (the evaluate task runs later, at its own load); the fit shrinks.
    loaded = plan_py.plan_models(rows=14_000, columns=16, classes=26, cores=2, budget=90, load=3.0, scored_rows=3000)
    assert loaded.shape["core_share_percent"] == 50 and plan_py.effective_cores(loaded.shape) == 0.5
    assert loaded.models[0].size <= plan_py.scoring_cap("GBM", plan_py.SCORING_SHARE * 90, loaded.shape)
    # A model's fixed cost at half a core is twice MODEL_SECONDS; LightGBM's is the fit's own.
    assert plan_py.fixed_seconds(loaded.shape, "XT") == pytest.approx(2 * plan_py.MODEL_SECONDS)
    assert plan_py.fixed_seconds(loaded.shape, "GBM") == 0.0


def test_more_scored_rows_mean_fewer_rounds_and_binary_grows_one_tree_a_round():
    few = plan_py.plan_models(rows=14_000, columns=16, classes=26, cores=2, budget=90, scored_rows=1000)
    many = plan_py.plan_models(rows=14_000, columns=16, classes=26, cores=2, budget=90, scored_rows=6000)
    assert many.models[0].size < few.models[0].size
    assert plan_py.trees_of("GBM", 26, 10) == 260 and plan_py.trees_of("GBM", 2, 10) == 10
    assert plan_py.trees_of("RF", 26, 10) == 10  # a forest's tree holds every class in its leaves
    # Without a validation channel AutoGluon holds out part of the training rows: that many are scored.
    default = plan_py.plan_models(rows=10_000, columns=16, classes=2, cores=2, budget=90)
    assert default.shape["scored_rows"] == round(10_000 * plan_py.VALIDATION_SHARE)


def test_every_kept_model_pays_its_fit_and_validation_scoring_out_of_its_share():
    plan = plan_py.plan_models(rows=14_000, columns=10, classes=2, cores=2, budget=120, scored_rows=3000)
    assert trees(plan) == list(plan_py.ORDER)
    weights = sum(plan_py.WEIGHT[key] for key in trees(plan))
    for model in (m for m in plan.models if m.key not in plan_py.CHEAP):
        share = plan.fit_time_limit * (1 - 2 * plan_py.CHEAP_SHARE) * plan_py.WEIGHT[model.key] / weights
        assert model.estimated_seconds + model.scoring_seconds / 2 <= share + 0.1
        assert model.scoring_seconds <= plan_py.SCORING_SHARE * 120 * plan_py.WEIGHT[model.key] / weights + 0.01
    assert (
        sum(m.scoring_seconds for m in plan.models if m.key not in plan_py.CHEAP) <= plan_py.SCORING_SHARE * 120 + 0.05
    )


def test_a_model_whose_smallest_size_scores_too_slowly_is_left_out_and_says_so():
    # 200 classes: 50 rounds are 10,000 trees; scoring 50,000 validation and test rows would take minutes.
    plan = plan_py.plan_models(rows=20_000, columns=5, classes=200, cores=2, budget=600, scored_rows=25_000)
    assert trees(plan) == ["GBM"]  # LightGBM alone is kept, whatever it costs: it stops on time
    plan = plan_py.plan_models(rows=2000, columns=5, classes=8, cores=1, budget=60, scored_rows=5000)
    assert trees(plan) == ["GBM", "XT", "RF"]
    assert plan.left_out["XGB"].startswith("scoring validation and test rows would take ~2s at its smallest")
    plan = plan_py.plan_models(rows=2000, columns=5, classes=8, cores=1, budget=60, scored_rows=100_000)
    assert "to fit and score validation at its smallest" in plan.left_out["CAT"]


def test_plan_on_a_loaded_machine_divides_its_estimates_by_the_share_of_a_core_it_gets():
    idle = plan_py.plan_models(rows=124, columns=13, classes=3, cores=2, budget=20, load=0.5)
    loaded = plan_py.plan_models(rows=124, columns=13, classes=3, cores=2, budget=20, load=10.0)
    assert idle.shape["core_share_percent"] == 100 and loaded.shape["core_share_percent"] == round(100 * 2 / 11)
    assert len(trees(idle)) >= 4  # a small table on an idle machine: (nearly) every model
    # At a fifth of a core each model's fixed cost alone is ~2 s and its fit 5x longer: fewer models fit 16 s.
    assert trees(loaded)[0] == "GBM" and len(trees(loaded)) < len(trees(idle))
    assert loaded.left_out and all("at its smallest" in why for why in loaded.left_out.values())
    assert sum(m.max_time_limit for m in loaded.models) <= loaded.fit_time_limit
    assert loaded.models[0].max_time_limit > idle.models[0].max_time_limit  # fewer models: a bigger share each


def test_start_up_already_spent_comes_out_of_the_fit_share_down_to_a_floor():
    fresh = plan_py.plan_models(rows=1000, columns=5, classes=2, cores=2, budget=100)
    started = plan_py.plan_models(rows=1000, columns=5, classes=2, cores=2, budget=100, spent=12.5)
    late = plan_py.plan_models(rows=1000, columns=5, classes=2, cores=2, budget=100, spent=90)
    assert fresh.fit_time_limit == 100 * plan_py.FIT_SHARE and started.fit_time_limit == 100 * plan_py.FIT_SHARE - 12.5
    assert late.fit_time_limit == 100 * plan_py.MIN_FIT_SHARE


def test_cheap_linear_and_neighbour_models_follow_lightgbm_on_small_tables_only():
    plan = plan_py.plan_models(rows=1257, columns=64, classes=10, cores=2, budget=90, scored_rows=270)
    keys = [m.key for m in plan.models]
    assert keys[:3] == ["GBM", "LR", "KNN"]  # fitted right after LightGBM (priority order)
    cheap = {m.key: m for m in plan.models if m.key in plan_py.CHEAP}
    for model in cheap.values():
        assert model.params == {} and model.size == 1 and model.name == plan_py.CHEAP_NAMES[model.key]
        assert plan.fit_time_limit * plan_py.CHEAP_SHARE <= model.max_time_limit <= plan.fit_time_limit * 0.15 + 0.1
    assert "models=1" in plan.lines()[2]
    wide = plan_py.plan_models(rows=60_000, columns=400, classes=2, cores=2, budget=90, excluded=["LR"])
    assert not set(plan_py.CHEAP) & {m.key for m in wide.models}
    assert wide.left_out["LR"] == "excluded by --excluded-model-types" and "too big" in wide.left_out["KNN"]
