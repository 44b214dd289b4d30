"""Tiny PEFT LoRA adapters on a tiny random Llama (tests/tiny_models.py), and the full checkpoints PEFT's
merge_and_unload makes of them: the reference the adapter sources are compared with."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import save_tiny

#: Adapters covering what a source adapter may hold: two plain ones of one rank (for LoraHub), rsLoRA with rank /
#: alpha patterns, and one with a LoRA embedding and a saved module (modules_to_save).
ADAPTERS: dict[str, dict[str, object]] = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "rslora": {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "o_proj", "gate_proj"],
               "rank_pattern": {"gate_proj": 3}, "alpha_pattern": {r"layers\.1\.self_attn\.o_proj": 7}},
    "plain2": {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "up_proj"]},
    "saved": {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "down_proj", "embed_tokens"],
              "modules_to_save": ["lm_head"]},
}


def _model_class(name: str) -> type:
    import transformers

    return getattr(transformers, name)


def save_adapter(base: Path, out: Path, seed: int, model_class: str = "LlamaForCausalLM", **config: object) -> Path:
    """A LoRA adapter on ``base`` with seeded random factors (B too, so that ΔW ≠ 0), saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_model_class(model_class).from_pretrained(base), LoraConfig(**config))  # type: ignore
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(out)
    return out


def merged_full(base: Path, adapter: Path, out: Path, model_class: str = "LlamaForCausalLM") -> Path:
    """PEFT's own merge of ``adapter`` into ``base`` (merge_and_unload), saved as a full checkpoint."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_model_class(model_class).from_pretrained(base), adapter).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    return out


def lora_family(root: Path) -> dict[str, Path]:
    """The base, each adapter of :data:`ADAPTERS` and its merged full checkpoint (``<name>_full``), and a full
    fine-tune ``ft`` (base + noise) for mixed recipes."""
    paths = {"base": save_tiny(root / "base", 0), "ft": None}
    paths["ft"] = save_tiny(root / "ft", 100, noise_of=paths["base"])
    for i, (name, config) in enumerate(ADAPTERS.items()):
        paths[name] = save_adapter(paths["base"], root / name, 10 + i, **config)
        paths[f"{name}_full"] = merged_full(paths["base"], paths[name], root / f"{name}_full")
    return paths  # type: ignore[return-value]
