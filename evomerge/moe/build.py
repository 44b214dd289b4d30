"""The live mixture of experts: built once from a base and its experts, re-materialized per MoE recipe, exported.

:class:`MoeModel` holds one ``MixtralForCausalLM`` or ``Qwen2MoeForCausalLM`` (the recipe's architecture; see
:mod:`evomerge.moe.arch` for which bases map to which) whose attention, norms, embeddings and head are the base's,
and keeps each expert's MLP tensors (as read). A recipe (:class:`~evomerge.recipe.moe.MoeRecipe`) over the same models
is written into it in place by :meth:`MoeModel.materialize`: the routers (prompt gates computed once per gate mode and
prompt set, then scaled and mixed per candidate, :func:`~evomerge.moe.gates.router_rows`), ``experts_per_token``,
and per layer either the experts' MLPs or one dense MLP merged from them by any evomerge method (a
:class:`~evomerge.engine.MergeEngine` over the base and the experts, made on first use): a Mixtral holds it in every
expert slot (Mixtral has no dense layers), a Qwen2-MoE runs it as a plain MLP (``mlp_only_layers``: no router, no
shared expert, one MLP's parameters in the written model). Only layers whose content changed are written again.

Tensors as mergekit-moe writes them (``mergekit/moe/mixtral.py``, ``qwen.py``): non-MLP tensors of the base cast to
the output dtype (Qwen2-MoE's q/k/v biases zeros where the base has none); per layer ``experts.gate_up_proj[e] =
cat(gate_proj, up_proj)`` and ``experts.down_proj[e] = down_proj · residual_scale`` of expert ``e`` (scaled in its
stored dtype, then cast); ``mlp.gate.weight`` the router rows; for Qwen2-MoE ``mlp.shared_expert.*`` the shared
expert's MLP (its ``down_proj`` scaled the same way) and ``mlp.shared_expert_gate.weight`` its gate row, computed
with the experts' rows (from its prompts, or the random draw's last row: mergekit draws (layers, experts + 1, hidden)).
The gate rows are checked as mergekit-moe checks them: each distinct warning
(:func:`~evomerge.moe.gates.degenerate_warning`) is logged once per live model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from evomerge.checkpoint import TOKENIZER_FILES, Checkpoint, save_hf_dir
from evomerge.engine.device import compute_device
from evomerge.engine.plan import live_dtype, plan_params
from evomerge.modelcard import Provenance, provenance_files
from evomerge.moe.arch import MLP_PARTS, MOE_CLASSES, MoeError, mlp_name, moe_config, open_moe_inputs
from evomerge.moe.gates import PromptGates, degenerate_warning, random_rows, router_rows
from evomerge.recipe import MoeExpert, MoeRecipe, Recipe, SourceSpec, layer_values
from evomerge.recipe.schema import PROMPT_MODES, model_labels

__all__ = ["MoeModel"]

log = logging.getLogger(__name__)

# Qwen2-MoE's attention biases: zeros where the base has none (mergekit/moe/qwen.py)
_ZERO_BIASES = ("q_proj.bias", "k_proj.bias", "v_proj.bias")


class MoeModel:
    """A live MoE (``MixtralForCausalLM`` or ``Qwen2MoeForCausalLM``, the recipe's architecture) assembled from
    ``recipe``'s base, experts and shared expert; later recipes over the same models are written into it by
    :meth:`materialize` (the one given here is materialized at once)."""

    def __init__(self, recipe: MoeRecipe, *, device: str | torch.device | None = None, allow_pickle: bool = False,
                 materialize: bool = True) -> None:
        import transformers

        self.inputs = open_moe_inputs(recipe, allow_pickle=allow_pickle)
        self.base, self.experts = recipe.base, [e.model for e in recipe.experts]
        self.shared = [e.model for e in recipe.shared_experts]
        self.architecture = self.inputs.architecture
        self._check_dense(recipe)
        self.allow_pickle = allow_pickle
        self.device = compute_device(device)
        self.dtype = live_dtype(recipe.dtype, self.inputs.base)
        self.num_layers = self.inputs.num_layers
        config = moe_config(self.inputs, recipe.experts_per_token, self.dtype)
        model_class = getattr(transformers, MOE_CLASSES[self.architecture].name)
        self.model = model_class(config).to(self.device, self.dtype).eval()
        self._load_base()
        self._prompt_gates = PromptGates(self.inputs.base.path, self.num_layers,
                                         lambda: self.inputs.base.get("model.embed_tokens.weight"))
        # each layer's MoE block and, for a Qwen2-MoE's dense layers, its plain MLP (made on first use); what each holds
        self._blocks = [layer.mlp for layer in self.model.model.layers]
        self._plain: dict[int, torch.nn.Module] = {}
        self._content: dict[tuple[int, str], object] = {}
        self._dense_engine: object = None
        self._checked_gates: set[tuple] = set()  # gate rows checked (degenerate_warning), and the warnings logged
        self._warned: set[str] = set()
        if materialize:
            self.materialize(recipe)

    # ------------------------------------------------------------------------------------------- building
    def _load_base(self) -> None:
        """The base's non-MLP tensors into the live model; Qwen2-MoE's q/k/v biases a base has none of are zeros."""
        params = dict(self.model.named_parameters())
        base, name_of_class = self.inputs.base, MOE_CLASSES[self.architecture].name
        written = set()
        for name in base.names:
            if ".mlp." in name or name.endswith(".inv_freq"):  # rotary tables: the model rebuilds them
                continue
            if name not in params:
                if name == "lm_head.weight" and self.model.config.tie_word_embeddings:
                    continue
                raise MoeError(f"base {base.path}: tensor {name!r} has no place in {name_of_class}")
            with torch.no_grad():
                params[name].copy_(base.get(name).to(self.dtype))
            written.add(name)
        for name, param in params.items():
            if ".mlp." in name or name in written:
                continue
            if not name.endswith(_ZERO_BIASES):
                raise MoeError(f"base {base.path} has no {name!r}, which {name_of_class} needs")
            with torch.no_grad():
                param.zero_()

    def _check_models(self, recipe: MoeRecipe) -> None:
        shared = [e.model for e in recipe.shared_experts]
        if recipe.base != self.base or [e.model for e in recipe.experts] != self.experts or shared != self.shared:
            raise MoeError(f"this MoE model was built from base {self.base}, experts {self.experts} and shared experts "
                           f"{self.shared}; the recipe names base {recipe.base}, experts "
                           f"{[e.model for e in recipe.experts]} and shared experts {shared}: build a new MoeModel "
                           "for other models")
        if (recipe.dtype is not None and live_dtype(recipe.dtype, self.inputs.base) != self.dtype):
            raise MoeError(f"this MoE model holds {self.dtype}; the recipe asks for {recipe.dtype}: build a new "
                           "MoeModel for another dtype")
        self._check_dense(recipe)

    def _check_dense(self, recipe: MoeRecipe) -> None:
        """The dense merge's method and values against the registry, from file headers (before any tensor work)."""
        dense = recipe.dense_layers
        if dense is None:
            return
        base = self.inputs.base
        if dense.layers and dense.layers[-1] >= base.num_layers:
            raise MoeError(f"dense_layers.layers names layer {dense.layers[-1]}, but the base has {base.num_layers} "
                           f"layers (0-{base.num_layers - 1})")
        names = [mlp_name(i, part) for i in dense.layers for part in MLP_PARTS]
        method, _ = plan_params(self._dense_recipe(recipe), names, base.num_layers)
        if method.statistic:
            raise MoeError(f"dense_layers.method {method.name!r} needs data statistics (calibration), which MoE "
                           "recipes do not carry; choose a method without them (linear, ties, ...)")

    def _gate_rows(self, recipe: MoeRecipe) -> Tensor:
        """(layers, experts + shared experts, hidden) rows of the recipe's gate mode, the shared expert's last, as
        mergekit-moe computes them together (``mergekit/scripts/moe.py``): prompt rows computed once per expert and
        prompt set (:class:`~evomerge.moe.gates.PromptGates`), random rows drawn from the seed. Each new set of rows
        is checked once (:func:`~evomerge.moe.gates.degenerate_warning`)."""
        gated = [*recipe.experts, *recipe.shared_experts]
        mode = "hidden" if recipe.gate_mode == "hidden_last" else recipe.gate_mode
        if mode in PROMPT_MODES:
            rows = self._prompt_gates.rows(mode, gated)
            key: tuple = (mode, *((tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in gated))
        else:
            rows = random_rows(recipe.seed, (self.num_layers, len(gated), self.model.config.hidden_size),
                               uniform=mode == "uniform_random")
            key = (mode, recipe.seed)
        if key not in self._checked_gates:
            self._checked_gates.add(key)
            labels = model_labels([e.model for e in gated])
            warning = degenerate_warning(rows, [f"expert {i} ({lb})" for i, lb in enumerate(labels[:len(self.experts)])]
                                         + [f"the shared expert ({lb})" for lb in labels[len(self.experts):]])
            if warning is not None and warning not in self._warned:
                self._warned.add(warning)
                log.warning(warning)
        return rows

    @staticmethod
    def _mlp(checkpoint: Checkpoint, spec: MoeExpert, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """gate_proj, up_proj and down_proj · residual_scale of ``layer`` in an expert's checkpoint (as stored)."""
        gate, up, proj = (checkpoint.get(mlp_name(layer, part)) for part in MLP_PARTS)
        return gate, up, proj * spec.residual_scale if spec.residual_scale != 1.0 else proj

    def _expert_mlp(self, layer: int, recipe: MoeRecipe) -> tuple[Tensor, Tensor]:
        """(experts, 2·intermediate, hidden) and (experts, hidden, intermediate): the experts' own MLPs."""
        gate_up, down = [], []
        for spec, checkpoint in zip(recipe.experts, self.inputs.experts):
            gate, up, proj = self._mlp(checkpoint, spec, layer)
            gate_up.append(torch.cat([gate, up], dim=0))
            down.append(proj)
        return torch.stack(gate_up), torch.stack(down)

    def _dense_recipe(self, recipe: MoeRecipe) -> Recipe:
        dense = recipe.dense_layers
        assert dense is not None
        weights = dense.weights
        sources = [SourceSpec(model=path, parameters={} if weights is None else {"weight": weights[i]})
                   for i, path in enumerate(self.experts)]
        return Recipe(method=dense.method, base=self.base, sources=sources, parameters=dense.parameters,
                      seed=recipe.seed)

    def _dense_mlp(self, layer: int, merged: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        gate, up, proj = (merged[mlp_name(layer, part)] for part in MLP_PARTS)
        n = len(self.experts)
        return torch.cat([gate, up], dim=0).expand(n, -1, -1), proj.expand(n, -1, -1)

    def _merged_mlps(self, recipe: MoeRecipe, layers: list[int]) -> dict[str, Tensor]:
        """The MLP tensors of ``layers`` in the dense merge of the experts (the base's other tensors are unused)."""
        from evomerge.engine import MergeEngine

        if self._dense_engine is None:
            self._dense_engine = MergeEngine(list(dict.fromkeys([self.base, *self.experts])), device=self.device,
                                             dtype=self.dtype, allow_pickle=self.allow_pickle)
        engine: MergeEngine = self._dense_engine  # type: ignore[assignment]
        engine.materialize(self._dense_recipe(recipe))
        params = dict(engine.model.named_parameters())
        return {mlp_name(layer, part): params[mlp_name(layer, part)].detach()
                for layer in layers for part in MLP_PARTS}

    # ---------------------------------------------------------------------------------------- materialize
    def _plain_mlp(self, layer: int) -> torch.nn.Module:
        """``layer``'s plain MLP (a Qwen2-MoE's ``mlp_only_layers``), made on first use and kept."""
        if layer not in self._plain:
            from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP

            self._plain[layer] = Qwen2MoeMLP(self.model.config).to(self.device, self.dtype).eval()
        return self._plain[layer]

    def _wanted(self, recipe: MoeRecipe) -> dict[int, tuple[str, object]]:
        """Per layer, the module it runs (``block``: the MoE block, ``plain``: a Qwen2-MoE's dense layer) and what that
        module must hold (compared with what it holds to write only what changed)."""
        dense = recipe.dense_layers
        dense_layers = set(dense.layers) if dense is not None else set()
        dense_key = None if dense is None else self._dense_recipe(recipe).model_dump_json()
        residual = tuple(e.residual_scale for e in recipe.experts)
        shared = tuple(e.residual_scale for e in recipe.shared_experts)
        plain = self.architecture == "qwen2_moe"  # Mixtral has no dense layers: the merged MLP in every expert slot
        return {i: ("plain", dense_key) if plain and i in dense_layers else
                ("block", (("dense", dense_key) if i in dense_layers else ("experts", residual), shared))
                for i in range(self.num_layers)}

    def materialize(self, recipe: MoeRecipe) -> list[int]:
        """Write ``recipe`` into the live model in place; returns the layers whose MLPs were written again. A
        Qwen2-MoE's dense layers are plain MLPs (``mlp_only_layers``): such a layer runs its plain MLP instead of its
        MoE block (each module is kept with what it holds, and written again only when that changes)."""
        self._check_models(recipe)
        for block in self._blocks:
            block.gate.top_k = recipe.experts_per_token
            if hasattr(block, "top_k"):  # Mixtral's block keeps a copy of its own
                block.top_k = recipe.experts_per_token
        self.model.config.num_experts_per_tok = recipe.experts_per_token
        gates = self._gate_rows(recipe)
        n = len(self.experts)
        rows = router_rows(gates[:, :n], layer_values(recipe.router_scale, self.num_layers), recipe.random_weight,
                           recipe.seed)
        wanted = self._wanted(recipe)
        changed = [i for i, (kind, content) in wanted.items() if self._content.get((i, kind)) != content]
        dense_layers = set(recipe.dense_layers.layers) if recipe.dense_layers is not None else set()
        to_merge = sorted(dense_layers & set(changed))
        merged = self._merged_mlps(recipe, to_merge) if to_merge else {}
        with torch.no_grad():
            for i, layer in enumerate(self.model.model.layers):
                kind, content = wanted[i]
                if kind == "plain":
                    layer.mlp = self._plain_mlp(i)
                    if i in changed:
                        for part in MLP_PARTS:
                            getattr(layer.mlp, part).weight.copy_(merged[mlp_name(i, part)].to(self.dtype))
                else:
                    layer.mlp = block = self._blocks[i]
                    block.gate.weight.copy_(rows[i].to(self.dtype))
                    if self.shared:  # the shared expert's sigmoid gate: its row as computed, not scaled or mixed
                        block.shared_expert_gate.weight.copy_(gates[i, n:].to(self.dtype))
                    if i in changed:
                        gate_up, down = self._dense_mlp(i, merged) if i in dense_layers else \
                            self._expert_mlp(i, recipe)
                        block.experts.gate_up_proj.copy_(gate_up.to(self.dtype))
                        block.experts.down_proj.copy_(down.to(self.dtype))
                        if self.shared:
                            mlp = self._mlp(self.inputs.shared[0], recipe.shared_experts[0], i)
                            for part, tensor in zip(MLP_PARTS, mlp):
                                getattr(block.shared_expert, part).weight.copy_(tensor.to(self.dtype))
                if i in changed:
                    self._content[(i, kind)] = content
        if self.architecture == "qwen2_moe":
            self.model.config.mlp_only_layers = [i for i, (kind, _) in wanted.items() if kind == "plain"]
        return changed

    # --------------------------------------------------------------------------------------------- output
    def state_dict(self) -> dict[str, Tensor]:
        """The live model's tensors under its class's names (CPU copies)."""
        return {n: t.detach().to("cpu", copy=True) for n, t in self.model.state_dict().items()}

    def export(self, out: str | Path, *, force: bool = False, max_shard_size: int = 2 * 1024**3,
               provenance: Provenance | None = None) -> Path:
        """Write the live MoE as an HF dir (atomic, :func:`~evomerge.checkpoint.save_hf_dir`) with the base's
        tokenizer files and ``provenance``'s model card, recipes and metadata (:mod:`evomerge.modelcard`);
        ``AutoModelForCausalLM.from_pretrained`` loads it."""
        base = self.inputs.base.path
        tokenizer = base if any((base / f).is_file() for f in TOKENIZER_FILES) else None
        return save_hf_dir(self.state_dict(), out, config=self.model.config, tokenizer_dir=tokenizer, force=force,
                           max_shard_size=max_shard_size, **provenance_files(provenance))

