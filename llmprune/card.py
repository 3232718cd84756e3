"""The model card (README.md) of an output: Hub metadata, the recipe, perplexity, per-layer
sparsity, how to load it and the command that reproduces it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from . import sparse
from .config import PruneConfig
from .source import Source


def base_model_id(model: str, source: Source) -> str | None:
    """The Hub id the output derives from, when there is one: the Hub input itself, else the local
    input's own card (``base_model``), else the ``_name_or_path`` its config was saved with. Never a
    local path."""
    if model.startswith("packaged:"):
        return source.info.get("base_model") or "HuggingFaceTB/SmolLM2-135M-Instruct"
    if "commit" in source.info:
        return model
    for candidate in (input_card_metadata(source.folder).get("base_model"), _name_or_path(source.folder)):
        if isinstance(candidate, str) and is_hub_id(candidate):
            return candidate
    return None


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub repo id rather than a local path."""
    return bool(HUB_ID.match(text)) and not Path(text).expanduser().is_absolute() and not text.startswith(".")


def _name_or_path(folder: Path) -> str | None:
    try:
        value = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def public(value: str) -> str:
    """A command-line value as a published card may show it: a local path becomes its bare name."""
    path = Path(value).expanduser()
    if value.startswith(("/", "~", ".")) or path.is_absolute() or path.exists():
        return Path(value.rstrip("/")).name or value
    return value


def reproduce_command(recipe: dict) -> str:
    """The ``llmprune`` command that reproduces a prune recipe, local paths shown by their names only."""
    try:
        cfg = PruneConfig.from_dict(recipe["config"])
    except Exception:  # a recipe of another version whose options this one no longer accepts
        return recipe.get("command") or ""
    return shlex.join(["llmprune", *cfg.cli_args(public)])


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
        f"On `{public(ev['data'])}`, {ev['windows']} windows of {ev['seqlen']} tokens (lower is better):",
        "",
        "| model | perplexity |",
        "|---|---:|",
        f"| dense (input) | {ev['dense']['perplexity']:.3f} |",
        f"| pruned{'' if tuned else ' (this model)'} | {ev['pruned']['perplexity']:.3f} |",
        *([f"| pruned and fine-tuned (this model) | {tuned['perplexity']:.3f} |"] if tuned else []),
        f"| ratio pruned / dense | {ev['ratio']:.3f} |",
        "",
    ]


def teacher_text(teacher: dict) -> str:
    """How a distillation fine-tune's teacher ran, and its memory, in one phrase."""
    text = f"{teacher['loss']} from {teacher['model']} at temperature {teacher['temperature']}"
    if teacher.get("hidden_weight"):
        text += f" + {teacher['hidden_weight']} x hidden-state MSE"
    if teacher["mode"] == "live":
        held = teacher.get("weights_bytes", teacher.get("memory_estimate_bytes", 0))
        return f"{text}; the teacher ran beside the student ({held / 1e9:.2f} GB of weights)"
    if teacher.get("reused"):
        return f"{text}; its top-{teacher['k']} distribution read from an earlier precompute"
    return (f"{text}; its top-{teacher['k']} distribution precomputed layer by layer in {teacher['seconds']} s "
            f"({teacher['file_bytes'] / 1e6:.1f} MB on disk, peak resident memory {teacher['peak_rss_mb']:.0f} MB)")


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
        f"{public(str(ft['data']))} ({ft['windows']} windows of {ft['seqlen']} tokens), {ft['config']['optim']}, "
        f"lr {ft['config']['lr']}; every pruned weight stayed exactly zero "
        f"({recipe['sparsity']['overall']:.4%} of the pruned matrices).",
    ]
    if "teacher" in ft:
        lines.append(f"Loss: {teacher_text(ft['teacher'])}.")
    if "first" in loss:
        lines.append(f"Training loss {loss['start_mean']:.4f} -> {loss['end_mean']:.4f}.")
    if "eval" in ft:
        ev = ft["eval"]
        lines.append(f"Perplexity on {public(str(ev['data']))} ({ev['windows']} x {ev['seqlen']} tokens): "
                     f"{ev['before']['perplexity']:.3f} -> {ev['after']['perplexity']:.3f}.")
    return [*lines, ""]


def _save_format(recipe: dict) -> str:
    return (recipe.get("save") or {}).get("format", "dense")


def _storage_sentence(recipe: dict) -> str:
    save = recipe.get("save") or {}
    if _save_format(recipe) != sparse.FORMAT:
        return "It loads with plain `AutoModelForCausalLM.from_pretrained`; the zeros are stored densely."
    return (f"The weights are stored in llmprune's compressed `{sparse.FORMAT}` format: "
            f"{save['bytes'] / 1e6:.1f} MB instead of {save['dense_bytes'] / 1e6:.1f} MB dense.")


def _loading_section(recipe: dict) -> list[str]:
    """How to load a sparse-bitmask output (nothing to say for a dense one)."""
    if _save_format(recipe) != sparse.FORMAT:
        return []
    return [
        "## Loading",
        "",
        "Every path below gives weights bit-identical to the dense save (`pip install llmprune`):",
        "",
        "```python",
        "import llmprune  # registers the format with transformers",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(REPO_OR_FOLDER)  # an ordinary dense model",
        "model = llmprune.load(FOLDER)  # the same, without transformers' quantizer hooks",
        "```",
        "",
        "For runtimes that do not import llmprune (vLLM, llama.cpp converters, TGI), write a dense "
        "Hugging Face checkpoint first: `llmprune decompress FOLDER DENSE_FOLDER`.",
        "",
    ]


def _dequantized(recipe: dict) -> list[str]:
    """A quantized input's line (FP8, MXFP4): what was dequantized, and that the output is not quantized."""
    line = (recipe.get("input") or {}).get("dequantized")
    if not line:
        return []
    return ["", f"{line[0].upper()}{line[1:]} on read; these weights are not quantized."]


def _intro(recipe: dict, source: str, link: str, overall: float) -> list[str]:
    cfg = recipe["config"]
    by = f"[llmprune](https://pypi.org/project/llmprune/) ({cfg['method']}, {cfg['pattern']})"
    st = recipe.get("structured")
    if st and "mix" in st:
        how = f"--target-params {cfg['target_params']}" if cfg.get("target_params") is not None else cfg["pattern"]
        by = f"[llmprune](https://pypi.org/project/llmprune/) ({cfg['method']}, {how})"
        p = st["parameters"]
        target = f" for a target of {st['search']['target']:,} parameters" if st.get("search") else ""
        return [f"# {source} shrunk to {p['after'] / p['before']:.1%} of its parameters", "",
                f"This model is {link} with {st['description']} removed by {by}{target}, units ranked by "
                f"{st['importance']}: a smaller dense model, {p['before']:,} -> {p['after']:,} parameters. "
                "It loads with plain `AutoModelForCausalLM.from_pretrained`."]
    if st:
        p = st["parameters"]
        removed = f"{st['ratio']:.0%} of its {cfg['pattern']}"
        if cfg["pattern"] == "hidden":  # the width is rounded to what the config accepts: say what was removed
            width = st["config"]["hidden_size"]
            removed = f"{1 - width['after'] / width['before']:.1%} of its hidden width ({width['before']} -> {width['after']})"
        return [f"# {source} with {cfg['pattern']} pruned ({1 - p['after'] / p['before']:.1%} fewer parameters)", "",
                f"This model is {link} with {removed} removed by {by}, ranked by "
                f"{st['importance']}: a smaller dense model, {p['before']:,} -> {p['after']:,} parameters. "
                "It loads with plain `AutoModelForCausalLM.from_pretrained`."]
    return [f"# {source} pruned to {overall:.1%} sparsity", "",
            f"This model is {link} with {overall:.1%} of the weights of its decoder layers' linear layers set to "
            f"zero by {by}. " + _storage_sentence(recipe)]


def _vision_rows(vision: dict | None) -> list[str]:
    """--prune-vision: the recipe table's row for the vision linears."""
    if not vision:
        return []
    return [f"| vision linears | {vision['matrices_pruned']} of {', '.join(vision['parts'])} pruned by "
            f"{vision['criterion']} ({vision['why']}), {vision['overall']:.4%} sparse |"]


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
    if _save_format(recipe) == sparse.FORMAT:
        meta["tags"].append(sparse.FORMAT)
    front = yaml.safe_dump(meta, sort_keys=False).strip()
    overall = recipe["sparsity"]["overall"]
    source = base_model or public(recipe["input"]["model"])
    link = f"[{source}](https://huggingface.co/{source})" if base_model else f"`{source}`"
    lines = [
        f"---\n{front}\n---",
        *_intro(recipe, source, link, overall),
        *_dequantized(recipe),
        "",
        *_loading_section(recipe),
        "## Recipe",
        "",
        "| option | value |",
        "|---|---|",
    ]
    for key in ("method", "pattern", "target_params", "norm", "sparsity", "ratios", "schedule", "dtype",
                "true_sequential"):
        if key == "norm" and cfg.get("pattern") == "experts":  # experts are ranked on calibration data only
            continue
        if cfg.get(key) is not None:
            lines.append(f"| {key} | {public(str(cfg[key])) if key == 'ratios' else cfg[key]} |")
    if "calibration" in recipe:
        c = recipe["calibration"]
        lines.append(f"| calibration | {c['nsamples']} x {c['seqlen']} tokens of {public(c['data'])}, seed {c['seed']} |")
    lines += [
        f"| matrices pruned | {recipe['sparsity']['matrices_pruned']} |",
        f"| overall sparsity (pruned matrices) | {overall:.4%} |",
        *_vision_rows(recipe["sparsity"].get("vision")),
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
        reproduce_command(recipe),
        "```",
        "",
        f"llmprune {recipe['versions']['llmprune']}, torch {recipe['versions']['torch']}, "
        f"transformers {recipe['versions']['transformers']}. The full recipe is in `llmprune.json`.",
        "",
    ]
    return "\n".join(lines)


def finetune_card(folder: Path, recipe: dict) -> str:
    """The input's card (when it has one) with a fine-tune section and the command appended."""
    base = (folder / "README.md").read_text(errors="replace").rstrip() + "\n" if (folder / "README.md").is_file() \
        else f"# {recipe['input'].get('model', folder.name)}, fine-tuned keeping its sparsity\n"
    return base + "\n".join(["", *finetune_section(recipe), "```", recipe["finetune"].get("command") or "", "```", ""])
