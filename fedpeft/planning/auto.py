"""The planner's IO half: the plan of a config (the model built and its adapter injected to
count uploaded coordinates, the data read) and the settings it fills in for a user-level run
given only ``--clients`` and ``--epsilon`` (:mod:`fedpeft.planning.forecast` does the maths)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fedpeft.planning import forecast
from fedpeft.planning.forecast import PLANNED_SETTINGS, ModelShape, Plan, choose_settings, config_plan


def plan_for_config(cfg: Any) -> Plan:  # RunConfig
    """The plan of a resolved config without training: the model is built and the adapter
    injected to count the uploaded coordinates; the data is read but not tokenised."""
    from fedpeft.adapters import build_adapter
    from fedpeft.layout import honest_upload_layout
    from fedpeft.pipeline import BuildEnv, Pipeline
    from fedpeft.engine.workspace import adapter_spec
    from fedpeft.privacy.calibration import default_delta, noise_multiplier_for
    from fedpeft.strategy import STRATEGIES
    from fedpeft.tasks import get_task

    task = get_task(cfg.task)
    splits = task.load_splits(cfg)
    adapter = build_adapter(cfg.adapter, adapter_spec(cfg))
    model = adapter.inject(task.base_model(cfg, splits))
    # what an honest client uploads after its pipeline stages (e.g. without FedSA-LoRA's B)
    pipeline = Pipeline.build(BuildEnv(cfg, STRATEGIES.get(cfg.strategy), "client"))
    layout = pipeline.client_layout(honest_upload_layout(adapter, model)(None), None)
    delta = z = None
    if cfg.dp == "user":
        delta = cfg.delta if cfg.delta is not None else default_delta(cfg.clients)
        z = cfg.noise_multiplier or noise_multiplier_for(cfg.epsilon, delta, cfg.cohort / cfg.clients, cfg.rounds,
                                                         cfg.accountant)
    return config_plan(cfg, layout, len(splits.train), delta, z)


def auto_plan(values: dict[str, Any], check: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """``values`` (the user's settings) with the planner's choices filled in when it is a
    user-level DP run given none of :data:`PLANNED_SETTINGS` — or only ``--adapter``: then it
    chooses among that adapter's candidates (layers, rank, recipe, cohort, rounds); unchanged
    otherwise. The reasons are kept in ``planned`` (a RunConfig field, so they reach
    results.json). ``check`` turns settings into a validated RunConfig
    (:func:`fedpeft.settings.validate`)."""
    dp = values.get("dp")
    given = [k for k in PLANNED_SETTINGS if k in values]
    if values.get("epsilon") is None or dp not in (None, "user") or given not in ([], ["adapter"]):
        return values
    from fedpeft.tasks import DEFAULT_TASK, get_task

    if not get_task(values.get("task", DEFAULT_TASK)).planned:
        return values  # the candidates were measured on the classification task only
    candidates = tuple(c for c in forecast.CANDIDATES if c.settings["adapter"] == values.get("adapter", c.settings["adapter"]))
    if not any(c.measured for c in candidates):
        return values  # no measured recipe for this adapter: the user's flags and defaults decide
    # an adapter that changes the encoder was asked for by name: it may take longer than the probe
    budget = forecast.ADAPTER_TIME_BUDGET_S if "adapter" in values else forecast.TIME_BUDGET_S
    from transformers import AutoConfig

    from fedpeft.config import DEFAULT_DATASET, DEFAULT_MODEL
    from fedpeft.data.sources import load_splits
    from fedpeft.model.loading import resolve_model_path
    from fedpeft.privacy.calibration import default_delta

    # the user's own values first: a bad one gets its one-line error, not a planner failure
    base = check({k: v for k, v in values.items() if k != "planned"})
    splits = load_splits(values.get("dataset", DEFAULT_DATASET), base.text_column, base.label_column,
                         base.test_fraction, base.max_test_examples)
    mc = AutoConfig.from_pretrained(resolve_model_path(values.get("model", DEFAULT_MODEL)))
    shape = ModelShape(mc.hidden_size, mc.num_hidden_layers, splits.num_labels)
    delta = base.delta if base.delta is not None else default_delta(base.clients)
    try:
        chosen, why = choose_settings(base.clients, float(values["epsilon"]), delta, base.accountant,
                                      len(splits.train), shape, budget_s=budget, candidates=candidates)
    except ValueError:  # nothing feasible (e.g. ε too small for any (q, T)): the run's own
        return values   # calibration then says why in one line
    return {**values, **chosen, "planned": json.dumps(why)}
