"""The model card of an output folder (and later: compressed save, push to the Hub)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def input_card_metadata(folder: Path) -> dict:
    """YAML front matter of the input's own README.md, if it has one."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _layer_table(recipe: dict) -> str:
    rows = ["| layer | sparsity |", "|---:|---:|"]
    for i, s in enumerate(recipe["sparsity"]["layers"]):
        rows.append(f"| {i} | {s:.2%} |")
    return "\n".join(rows)


def _chart_link(recipe: dict) -> list[str]:
    """The per-layer sparsity chart saved beside the model, when the run drew one."""
    chart = recipe.get("plots", {}).get("sparsity")
    return [f"![Sparsity per decoder layer]({chart})", ""] if chart else []


def _eval_section(recipe: dict) -> list[str]:
    """Dense vs pruned perplexity, when the run measured it."""
    ev = recipe.get("eval")
    if not ev or "pruned" not in ev:
        return []
    tuned = recipe.get("finetune", {}).get("eval", {}).get("after")
    return [
        "## Perplexity",
        "",
        f"On `{ev['data']}`, {ev['windows']} windows of {ev['seqlen']} tokens (lower is better):",
        "",
        "| model | perplexity |",
        "|---|---:|",
        f"| dense (input) | {ev['dense']['perplexity']:.3f} |",
        f"| pruned{'' if tuned else ' (this model)'} | {ev['pruned']['perplexity']:.3f} |",
        *([f"| pruned and fine-tuned (this model) | {tuned['perplexity']:.3f} |"] if tuned else []),
        f"| ratio pruned / dense | {ev['ratio']:.3f} |",
        "",
    ]


def finetune_section(recipe: dict) -> list[str]:
    """What the mask-preserving fine-tune did, when there was one."""
    ft = recipe.get("finetune")
    if not ft:
        return []
    loss = ft.get("loss", {})
    lines = [
        "## Fine-tune",
        "",
        f"{ft['mode']} mode, {ft['config']['steps']} steps{' per layer' if ft['mode'] == 'blockwise' else ''} on "
        f"{ft['data']} ({ft['windows']} windows of {ft['seqlen']} tokens), {ft['config']['optim']}, "
        f"lr {ft['config']['lr']}; every pruned weight stayed exactly zero "
        f"({recipe['sparsity']['overall']:.4%} of the pruned matrices).",
    ]
    if "first" in loss:
        lines.append(f"Training loss {loss['start_mean']:.4f} -> {loss['end_mean']:.4f}.")
    if "eval" in ft:
        ev = ft["eval"]
        lines.append(f"Perplexity on {ev['data']} ({ev['windows']} x {ev['seqlen']} tokens): "
                     f"{ev['before']['perplexity']:.3f} -> {ev['after']['perplexity']:.3f}.")
    return [*lines, ""]


def model_card(recipe: dict, base_model: str | None, input_meta: dict) -> str:
    """README.md for an output folder: Hub metadata, the recipe, per-layer sparsity, the command."""
    cfg = recipe["config"]
    meta: dict = {}
    if base_model:
        meta["base_model"] = base_model
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    if input_meta.get("license"):
        meta["license"] = input_meta["license"]
    if input_meta.get("language"):
        meta["language"] = input_meta["language"]
    meta["tags"] = ["pruned", "sparse", "llmprune", cfg["method"]]
    front = yaml.safe_dump(meta, sort_keys=False).strip()
    overall = recipe["sparsity"]["overall"]
    source = base_model or recipe["input"]["model"]
    lines = [
        f"---\n{front}\n---",
        f"# {source} pruned to {overall:.1%} sparsity",
        "",
        f"This model is [{source}]({'https://huggingface.co/' + source if base_model else source}) with "
        f"{overall:.1%} of the weights of its decoder layers' linear layers set to zero by "
        f"[llmprune](https://pypi.org/project/llmprune/) ({cfg['method']}, {cfg['pattern']}). "
        "It loads with plain `AutoModelForCausalLM.from_pretrained`; the zeros are stored densely.",
        "",
        "## Recipe",
        "",
        "| option | value |",
        "|---|---|",
    ]
    for key in ("method", "pattern", "norm", "sparsity", "ratios", "schedule", "dtype", "true_sequential"):
        if cfg.get(key) is not None:
            lines.append(f"| {key} | {cfg[key]} |")
    if "calibration" in recipe:
        c = recipe["calibration"]
        lines.append(f"| calibration | {c['nsamples']} x {c['seqlen']} tokens of {c['data']}, seed {c['seed']} |")
    lines += [
        f"| matrices pruned | {recipe['sparsity']['matrices_pruned']} |",
        f"| overall sparsity (pruned matrices) | {overall:.4%} |",
        "",
        *_eval_section(recipe),
        *finetune_section(recipe),
        "## Sparsity per decoder layer",
        "",
        *_chart_link(recipe),
        _layer_table(recipe),
        "",
        "## Reproduce",
        "",
        "```",
        recipe.get("command") or "",
        "```",
        "",
        f"llmprune {recipe['versions']['llmprune']}, torch {recipe['versions']['torch']}, "
        f"transformers {recipe['versions']['transformers']}. The full recipe is in `llmprune.json`.",
        "",
    ]
    return "\n".join(lines)
