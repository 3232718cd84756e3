"""What a run prints at its end: the one-screen text summary and its JSON form."""

from __future__ import annotations

from ..card import teacher_text
from ..perplexity import EvalResult
from ..progress import emit, json_mode, table


def summary(recipe: dict) -> str:
    """The one-screen report at the end of a run."""
    sp = recipe["sparsity"]
    layers = sp["layers"]
    cfg = recipe["config"]
    rows = [
        ("model", recipe["input"]["model"]),
        *([("input", recipe["input"]["dequantized"].removeprefix("input "))] if recipe["input"].get("dequantized")
          else []),
        ("method", f"{cfg['method']} ({cfg['pattern']})" if cfg["pattern"] == "experts"  # no weight norm involved
         else f"{cfg['method']} ({cfg['pattern'] if cfg.get('target_params') is None else 'target ' + str(cfg['target_params'])}, {cfg['norm']})"),
        ("matrices pruned", f"{sp['matrices_pruned']} in {len(layers)} decoder layers"),
        ("sparsity", f"{sp['overall']:.4%} achieved, {sp['target_mean']:.4%} targeted" if "structured" not in recipe
         else f"{sp['overall']:.2%} of the decoder linears' weights removed ("
              + (recipe["structured"]["description"] if "mix" in recipe["structured"]
                 else f"--sparsity {cfg['sparsity']} of the units") + ")"),
        ("per layer", f"min {min(layers):.2%}, max {max(layers):.2%}"),
    ]
    if sp.get("vision"):
        v = sp["vision"]
        rows.append(("vision", f"{v['matrices_pruned']} linears of {', '.join(v['parts'])} by {v['criterion']}, "
                               f"{v['overall']:.4%} achieved"))
    if sp.get("not_pruned"):
        rows.append(("not pruned", f"{', '.join(sp['not_pruned'])} (outside the language model, unchanged)"))
    ft = recipe.get("finetune")
    if ft:
        rows.append(("fine-tune", f"{ft['mode']}, {ft['config']['steps']} steps"
                                  f"{' per layer' if ft['mode'] == 'blockwise' else ''} on {ft['data']}, "
                                  f"{ft['mask_changes']} weights changed mask"))
    if "eval" in recipe:
        ev = recipe["eval"]
        text = f"{ev['dense']['perplexity']:.3f} dense -> {ev['pruned']['perplexity']:.3f} pruned (x{ev['ratio']:.3f})"
        ft_eval = (ft or {}).get("eval", {})
        if "after" in ft_eval:
            text += f" -> {ft_eval['after']['perplexity']:.3f} fine-tuned"
            if "recovered" in ft_eval:
                text += f" ({ft_eval['recovered']:.1%} of the gap recovered)"
        rows.append(("perplexity", f"{text}; {ev['data']}, {ev['windows']} x {ev['seqlen']} tokens"))
    seconds, peak = recipe["wall_time_s"], recipe["peak_rss_mb"]
    if ft:
        seconds, peak = seconds + ft["wall_time_s"], max(peak, ft["peak_rss_mb"])
    if "structured" in recipe:
        rows.append(("structure", structure_line(recipe["structured"])))
    rows += [
        ("time", f"{seconds:.1f} s on {recipe['device']}"),
        ("peak memory", f"{peak:.0f} MB resident"),
        ("output", recipe["output"]),
    ]
    save = recipe.get("save")
    if save:
        rows.insert(-1, ("saved", f"{save['format']}, {save['bytes'] / 1e6:.1f} MB "
                                  f"({save['bytes'] / save['dense_bytes']:.2f} x the dense tensors)"))
    if recipe.get("plots", {}).get("sparsity"):
        rows.insert(-1, ("plot", f"{recipe['output']}/{recipe['plots']['sparsity']}"))
    return table(rows)


def structure_line(st: dict) -> str:
    """What a structured prune changed: config sizes and the parameter count."""
    changes = ", ".join(f"{k} {v['before']} -> {v['after']}" for k, v in st["config"].items()
                        if not isinstance(v["after"], list) and v["before"] != v["after"])
    p = st["parameters"]
    return f"{changes}; parameters {p['before']:,} -> {p['after']:,} ({1 - p['after'] / p['before']:.1%} fewer)"


def summary_data(recipe: dict) -> dict:
    """The summary's values for scripts (``--log-format json``)."""
    ev = recipe.get("eval", {})
    return {"model": recipe["input"]["model"], "output": recipe["output"], "method": recipe["config"]["method"],
            "pattern": recipe["config"]["pattern"], "sparsity": recipe["sparsity"]["overall"],
            "target_sparsity": recipe["sparsity"]["target_mean"],
            "perplexity_dense": ev.get("dense", {}).get("perplexity"),
            "perplexity_pruned": ev.get("pruned", {}).get("perplexity"),
            "perplexity_finetuned": recipe.get("finetune", {}).get("eval", {}).get("after", {}).get("perplexity"),
            "wall_time_s": recipe["wall_time_s"], "peak_rss_mb": recipe["peak_rss_mb"]}


def report(text: str, data: dict, quiet: bool) -> None:
    """The final summary: a table on stdout, or a ``summary`` JSON event in JSON mode."""
    if json_mode():  # scripts get the summary even with --quiet
        emit({"event": "summary", "level": "info", **data})
    elif not quiet:
        print(text)


def eval_summary(result: "EvalResult") -> str:
    """The one-screen report of `llmprune eval`."""
    rows = [
        ("model", result.model),
        ("data", f"{result.data}: {result.windows} windows x {result.seqlen} tokens ({result.tokens} predicted)"),
        ("perplexity", f"{result.perplexity:.4f}"),
        ("mode", f"{result.mode} on {result.device}, {result.dtype}, batch {result.batch_size}"),
        ("time", f"{result.seconds:.1f} s"),
    ]
    for task, metrics in result.tasks.items():
        rows.append((task, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())))
    return table(rows)


def finetune_summary(recipe: dict) -> str:
    """The one-screen report of `llmprune finetune`."""
    ft, sp = recipe["finetune"], recipe["sparsity"]
    cfg = ft["config"]
    per_layer = " per layer" if ft["mode"] == "blockwise" else ""
    rows = [
        ("model", ft["input"]["model"]),
        ("mode", f"{ft['mode']}, {ft['processes']} process(es) on {ft['device']}, {ft['precision']}"),
        ("training", f"{cfg['steps']} steps{per_layer} x {cfg['batch_size']} x {cfg['grad_accum']} windows of "
                     f"{ft['seqlen']} tokens from {ft['data']}, {cfg['optim']}, lr {cfg['lr']}"),
    ]
    if "teacher" in ft:
        rows.append(("teacher", teacher_text(ft["teacher"])))
    loss = ft.get("loss") or {}
    if "first" in loss:
        rows.append(("loss", f"{loss['start_mean']:.4f} -> {loss['end_mean']:.4f} (first and last tenth of the steps)"))
    if "mse_before_mean" in loss:
        rows.append(("layer mse", f"{loss['mse_before_mean']:.4g} -> {loss['mse_after_mean']:.4g} (mean), "
                                  f"lower in {loss['improved_layers']} of {len(ft['layers'])} layers"))
    rows.append(("sparsity", f"{sp['overall']:.4%} of the pruned matrices, {ft['mask_changes']} weights changed mask"))
    if "eval" in ft:
        ev = ft["eval"]
        text = f"{ev['before']['perplexity']:.3f} -> {ev['after']['perplexity']:.3f} ({ev['data']}, {ev['windows']} x {ev['seqlen']} tokens)"
        if "recovered" in ev:
            text += f"; dense {ev['dense']['perplexity']:.3f}, {ev['recovered']:.1%} of the gap recovered"
        rows.append(("perplexity", text))
    rows += [
        ("time", f"{ft['wall_time_s']:.1f} s"),
        ("peak memory", f"{ft['peak_rss_mb']:.0f} MB resident"),
        ("output", recipe["output"]),
    ]
    return table(rows)
