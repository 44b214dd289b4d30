"""Run configuration of ``evomerge search`` / ``evomerge soup`` (one YAML file, the paths it names relative to it;
an MoE template's own model paths are a recipe's, relative to the working directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.recipe import CalibrationData, MoeExpert, MoeRecipe, RecipeError
from evomerge.recipe.schema import closest, one_line
from evomerge.yamlfile import load_yaml


class ConfigError(ValueError):
    """A run config that cannot be used; one line naming each bad key and the fix."""


SamplerName = Literal["auto", "cmaes", "tpe", "gp", "random", "nsga2"]
PrunerName = Literal["none", "halving", "hyperband", "wilcoxon"]


class RunConfig(BaseModel):
    """What a search or soup run needs: models, space, evaluators, sampler, budget, storage.

    The models are ``base`` and ``sources``, or for a mixture-of-experts search (an MoE space, ``kind: moe``) an MoE
    ``template`` recipe whose base and experts they are. ``evaluator`` is a spec for
    :func:`evomerge.evaluate.build_evaluator` scored on the validation split during the search; ``test_evaluator``
    (default: the same spec with ``split: test``) scores the best recipe and the baselines at the end.
    The test split is never used for selection.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="study name")
    base: str | None = None
    sources: list[str] = Field(default_factory=list, description="the models merged (not with template)")
    template: str | None = Field(None, description="an MoE search's template: an MoE recipe file (kind: moe, or a "
                                                   "mergekit-moe config) whose base and experts are the run's models "
                                                   "(not with base / sources); its model paths are a recipe's, "
                                                   "relative to the working directory")
    space: str | None = Field(None, description="search space YAML (search only)")
    evaluator: dict[str, Any]
    test_evaluator: dict[str, Any] | None = None
    sampler: SamplerName = "auto"
    pruner: PrunerName = "none"
    fidelities: list[float] = Field(default_factory=lambda: [1.0])
    n_trials: int = Field(30, ge=1)
    timeout: float | None = Field(None, gt=0)
    storage: str | None = Field(None, description="Optuna storage URL; default sqlite:///<out>/study.db")
    heartbeat_s: int = Field(30, ge=1, description="seconds between the heartbeats of a running trial")
    grace_s: int = Field(90, ge=1, description="a RUNNING trial silent this long (its process died) is failed and "
                                               "retried with the same parameters; must exceed heartbeat_s")
    trial_timeout_s: float | None = Field(None, gt=0, description="a trial whose evaluation runs longer fails "
                                                                  "(TrialFault); default: no limit")
    out: str | None = Field(None, description="run dir; default runs/<name>")
    seed: int = Field(0, description="the sampler's seed and every recipe's; with a template that sets one: its")
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="every recipe's dtype (default: the models'); with a template that sets one: its")
    baselines: bool = True
    calibration: CalibrationData | None = Field(None, description="text for Fisher / RegMean statistics")
    multi_objective: bool = Field(False, description="optimize the evaluator's metric vector (NSGA-II by default)")
    accept: Literal[">", ">="] = Field(">", description="greedy soup acceptance (soup only)")
    confirm_top: int = Field(0, ge=0, description="after the budget, re-score the k best trials on "
                             "`confirm_evaluator` and pick the result among them by that score (search only; 0: off)")
    confirm_evaluator: dict[str, Any] | None = Field(
        None, description="the confirmation evaluator; default: the search's evaluator without its `limit`")
    callbacks: list[str] = Field(default_factory=list, description="Optuna callbacks, 'module:factory' entries: "
                                 "factory() returns a callback(study, frozen_trial) called after every trial")

    @model_validator(mode="after")
    def _models(self) -> RunConfig:
        if self.template is None and not self.sources:
            raise ValueError("sources: list the models to merge (or, for an MoE search, give 'template': an MoE "
                             "recipe file)")
        if self.template is not None and (self.sources or self.base):
            raise ValueError("template: an MoE search takes its base and experts from the template; remove "
                             "'base' and 'sources'")
        return self

    @model_validator(mode="after")
    def _fidelities(self) -> RunConfig:
        f = self.fidelities
        if not f or any(not 0 < x <= 1 for x in f) or f != sorted(f) or f[-1] != 1.0:
            raise ValueError(f"fidelities must increase within (0, 1] and end at 1.0, got {f}")
        if self.pruner in ("halving", "hyperband") and len(f) < 2:
            raise ValueError(f"pruner '{self.pruner}' needs at least two fidelities, e.g. [0.25, 0.5, 1.0]")
        return self

    @model_validator(mode="after")
    def _confirm(self) -> RunConfig:
        if not self.confirm_top:
            return self
        if self.multi_objective:
            raise ValueError("confirm_top re-ranks one objective; it does not apply to a multi_objective search")
        if self.confirm_evaluator is None and "limit" not in self.evaluator:
            raise ValueError("confirm_top re-scores on every validation doc, but the evaluator has no `limit`: the "
                             "scores would not change; give the evaluator a `limit` or set confirm_evaluator")
        return self

    @model_validator(mode="after")
    def _heartbeat(self) -> RunConfig:
        from evomerge.search.storage import check_heartbeat  # the one home of the rule (storages check it too)

        check_heartbeat(self.heartbeat_s, self.grace_s)
        return self

    @model_validator(mode="after")
    def _template_settings(self) -> RunConfig:
        """An MoE template's ``seed`` / ``dtype`` hold where the run config (or ``--seed``) sets none; where both set
        one, they must agree: a run config's value silently replacing the template's would build another MoE than
        the template describes."""
        if self.template is None:
            return self
        try:
            template = self.moe_template()
        except OSError as exc:
            raise ValueError(f"template: cannot read {self.template}: {exc.strerror or exc}") from None
        assert template is not None
        for key in ("seed", "dtype"):
            if key not in template.model_fields_set:
                continue
            ours, theirs = getattr(self, key), getattr(template, key)
            if key not in self.model_fields_set:
                setattr(self, key, theirs)
            elif ours != theirs:
                raise ValueError(f"{key}: the run sets {ours}, its template {self.template} sets {theirs}: remove "
                                 f"{key} from one of them (or give both the same value)")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RunConfig:
        """Read a run config; relative model/space/out/template/task paths are taken relative to the file's dir.
        ConfigError (one line) for an invalid one."""
        path = Path(path)
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a run config is a YAML mapping")
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(_absolute(data, path.parent))
        except ValidationError as err:
            valid = list(cls.model_fields)
            hint = one_line(err, "config", lambda key: f"unknown key{closest(key, valid)}")
            raise ConfigError(f"{path}: {hint}") from None

    @property
    def run_dir(self) -> Path:
        return Path(self.out or Path("runs") / self.name)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.run_dir / 'study.db').resolve()}"

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys([*([self.base] if self.base else []), *self.sources]))

    def confirm_spec(self) -> dict[str, Any]:
        """The evaluator that re-scores the best trials (``confirm_top``): ``confirm_evaluator``, else the search's
        own without its ``limit`` (every validation doc; still the validation split, so selection stays off test)."""
        if self.confirm_evaluator:
            return self.confirm_evaluator
        return {k: v for k, v in self.evaluator.items() if k != "limit"}

    def moe_template(self) -> MoeRecipe | None:
        """The MoE template recipe (None without ``template``) as its file says (its ``seed`` / ``dtype`` too: the
        run's are reconciled with them at validation). Its relative model paths are taken from the working
        directory, as those of every recipe file are (``evomerge merge`` of the same file reads the same models;
        mergekit reads its configs so), and made absolute here, so that the study records where they are; the path
        of the template file itself, like every path the run config names, is relative to the run config. RecipeError
        (one line) for a file that is not an MoE recipe or names a model dir that is not there."""
        if self.template is None:
            return None
        from evomerge.recipe import load_recipe
        from evomerge.recipe.io import relative_path_hint
        from evomerge.recipe.schema import recipe_kind

        recipe = load_recipe(self.template)
        if not isinstance(recipe, MoeRecipe):
            raise RecipeError(f"template {self.template}: a {recipe_kind(recipe)} recipe; an MoE search's template is "
                              "an MoE recipe (kind: moe) or a mergekit-moe config")
        missing = [p for p in recipe.model_paths() if not Path(p).expanduser().exists()]
        if missing:
            raise RecipeError(f"template {self.template}: no model dir {missing[0]}{relative_path_hint(missing[0])}")
        root = Path.cwd()

        def fix(expert: MoeExpert) -> MoeExpert:
            return expert.model_copy(update={"model": _relative_to(root, expert.model)})

        return recipe.model_copy(update={"base": _relative_to(root, recipe.base),
                                         "experts": [fix(e) for e in recipe.experts],
                                         "shared_experts": [fix(e) for e in recipe.shared_experts]})

    def test_spec(self) -> dict[str, Any]:
        """The final evaluator: ``test_evaluator``, else the search's lm-eval spec on the test split (other
        evaluator types have no split: they are re-used as they are unless ``test_evaluator`` is given)."""
        if self.test_evaluator:
            return self.test_evaluator
        if self.evaluator.get("type") == "lm_eval":
            return {**self.evaluator, "split": "test"}
        return self.evaluator


def _relative_to(root: Path, path: Any) -> Any:
    """``path`` taken relative to ``root`` when it is a relative path string, as it is otherwise."""
    return str((root / path).resolve()) if isinstance(path, str) and not Path(path).is_absolute() else path


def _absolute(data: dict[str, Any], root: Path) -> dict[str, Any]:
    def fix(p: Any) -> Any:
        return _relative_to(root, p)

    out = dict(data)
    for key in ("base", "space", "out", "template"):
        if out.get(key):
            out[key] = fix(out[key])
    out["sources"] = [fix(s) for s in out.get("sources", [])]
    for key in ("evaluator", "test_evaluator"):
        spec = out.get(key)
        if isinstance(spec, dict):
            spec = dict(spec)
            if "include_path" in spec:
                paths = spec["include_path"]
                spec["include_path"] = [fix(p) for p in (paths if isinstance(paths, list) else [paths])]
            if "path" in spec:
                spec["path"] = fix(spec["path"])
            out[key] = spec
    return out
