"""The report of an exposure-bias study: summary statistics over seeds, plots and ``report.md``.

``summarise(cfg, runs)`` turns the per-run results into means and 95% CIs over seeds (and paired
comparisons against the first method); ``write_report(cfg, results, out_dir)`` writes
``results.json``, the PNG plots (matplotlib, the ``plot`` extra) and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING

import numpy as np
import yaml

from arjax.train.exposure import metrics
from arjax.train.exposure.metrics import mean_ci

if TYPE_CHECKING:
    from arjax.train.exposure.study import StudyConfig


def jsonable(x):
    """Plain JSON values, floats rounded to 5 significant digits (the report folder stays small)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(f"{float(x):.5g}")
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_report(cfg: StudyConfig, results: dict, out_dir: str) -> None:
    """results.json (compact, 5 significant digits: the report folder stays small), the plots and report.md."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(jsonable(results), f, separators=(",", ":"))
    plots = make_plots(cfg, results["runs"], results["summary"], out_dir)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(render_report(cfg, results, plots))


# ----------------------------------------------------------------------------- summary


def _curve_ci(curves: list) -> dict:
    """Per-position mean and 95% half-width over seeds of equally long curves."""
    a = np.asarray([[np.nan if v is None else v for v in c] for c in curves], np.float64)  # [S, L]
    stats = [mean_ci(a[:, j]) for j in range(a.shape[1])]
    return {"mean": [s[0] for s in stats], "ci": [s[1] for s in stats]}


def _masked(e: dict) -> dict:
    """ExAccErr curve with None where eps(l) is (numerically) zero: the ratio is undefined there."""
    curve = [
        x if (x is not None and le is not None and abs(le) > metrics.DEGENERATE * (i + 1)) else None
        for i, (x, le) in enumerate(zip(e["ex_acc_err"], e["l_eps"]))
    ]
    return {**e, "ex_acc_err": curve}


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else float("nan")  # TV ratios are 0/0 for the oracle itself


def summarise(cfg: StudyConfig, runs: list) -> dict:
    """Means and 95% CIs over seeds for every method (x decoding), and CI-checked comparisons."""
    L = cfg.data.length - cfg.eval.prompt_len  # generated positions
    quarter = max(1, L // 4)
    out = {}
    for name in dict.fromkeys(r["method"] for r in runs):
        rs = [r["eval"] for r in runs if r["method"] == name]
        s = {
            "n_seeds": len(rs),
            "nll_test": mean_ci([r["nll_test"] for r in rs]),
            "forward_kl_per_token": mean_ci([r["forward_kl_per_token"] for r in rs]),
            "kl_teacher_forced": _curve_ci([r["teacher_forced"]["kl"] for r in rs]),
            "decodings": {},
        }
        for dec in cfg.decodings:
            ds = [r["decodings"][dec.name] for r in rs]
            ex = {}
            for loss in cfg.eval.ex_losses:
                e = [_masked(d["ex"][loss]) for d in ds]
                ex_L = np.asarray([x["ex_acc_err"][-1] for x in e], np.float64)
                ex_q = np.asarray([x["ex_acc_err"][quarter - 1] for x in e], np.float64)
                # Mean per-position gap between the free-running and the teacher-forced loss.
                gap = [np.mean(np.asarray(d["free_running"][loss]) - np.asarray(d["teacher_forced"][loss])) for d in ds]
                # Against the oracle decoded alike; undefined wherever the ordinary ExAccErr is (a vanishing loss).
                vs = [d["ex_vs_oracle_decoded"] for d in ds]
                vs = (
                    [
                        {
                            loss: {
                                "ex_acc_err": [
                                    a if b is not None else None for a, b in zip(v[loss]["ex_acc_err"], x["ex_acc_err"])
                                ]
                            }
                        }
                        for v, x in zip(vs, e)
                    ]
                    if vs[0]
                    else vs
                )
                at_L_vs = mean_ci([v[loss]["ex_acc_err"][-1] for v in vs]) if vs[0] else None
                ex[loss] = {
                    "at_L_vs_oracle_decoded": at_L_vs,
                    "curve_vs_oracle_decoded": _curve_ci([v[loss]["ex_acc_err"] for v in vs]) if vs[0] else None,
                    "curve": _curve_ci([x["ex_acc_err"] for x in e]),
                    "at_L": mean_ci(ex_L),
                    "at_quarter": mean_ci(ex_q),
                    "growth": mean_ci(ex_L - ex_q),
                    "gap": mean_ci(gap),
                }
            s["decodings"][dec.name] = {
                "ex": ex,
                "nll_oracle": mean_ci([d["nll_oracle"] for d in ds]),
                "kl_free_running": _curve_ci([d["free_running"]["kl"] for d in ds]),
                "eb_c_tv_at_end": mean_ci([_nanmean(d["eb_c"]["tv"][-quarter:]) for d in ds]),
                "reverse_kl_per_token": mean_ci([d["reverse_kl_per_token"] for d in ds])
                if ds[0]["reverse_kl_per_token"] is not None
                else None,
                "seq_rep_2": mean_ci([d["repetition"]["seq_rep_2"] for d in ds]),
                "rep_4": mean_ci([d["repetition"]["rep_4"] for d in ds]),
                "valid_rate": mean_ci([d["valid_rate"] for d in ds]) if ds[0].get("valid_rate") is not None else None,
                # Per-position top-1 agreement with the oracle, averaged over positions, on each roll-in.
                "agree_teacher_forced": mean_ci([np.mean(d["teacher_forced"]["agree"]) for d in ds]),
                "agree_free_running": mean_ci([np.mean(d["free_running"]["agree"]) for d in ds]),
                "quarter": quarter,
            }
        out[name] = s
    # Scheduled sampling vs teacher forcing, paired by seed: difference in the free-running gap.
    tf = cfg.methods[0].name
    comparisons = {}
    for m in cfg.methods[1:]:
        for dec in cfg.decodings:
            pairs = []
            for seed in cfg.seeds:
                a = next(r["eval"]["decodings"][dec.name] for r in runs if r["method"] == tf and r["seed"] == seed)
                b = next(r["eval"]["decodings"][dec.name] for r in runs if r["method"] == m.name and r["seed"] == seed)
                pairs.append((a, b))
            for loss in cfg.eval.ex_losses:
                comparisons[f"{m.name} - {tf} [{dec.name}, {loss}]"] = {
                    "ex_acc_err_at_L": mean_ci(
                        [b["ex"][loss]["ex_acc_err"][-1] - a["ex"][loss]["ex_acc_err"][-1] for a, b in pairs]
                    ),
                    "R_at_L": mean_ci([b["ex"][loss]["R"][-1] - a["ex"][loss]["R"][-1] for a, b in pairs]),
                    "l_eps_at_L": mean_ci([b["ex"][loss]["l_eps"][-1] - a["ex"][loss]["l_eps"][-1] for a, b in pairs]),
                }
    return {"methods": out, "comparisons": comparisons}


# ----------------------------------------------------------------------------- plots


def make_plots(cfg: StudyConfig, runs: list, summary: dict, out_dir: str) -> list[str]:
    import matplotlib  # the optional "plot" extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = cfg.data.length - cfg.eval.prompt_len
    ls = np.arange(1, L + 1)
    methods = summary["methods"]
    files = []

    def band(ax, curve, label, **kw):
        m, c = np.asarray(curve["mean"], float), np.asarray(curve["ci"], float)
        (line,) = ax.plot(ls, m, label=label, **kw)
        if np.isfinite(c).any():
            ax.fill_between(ls, m - c, m + c, color=line.get_color(), alpha=0.2)

    losses = cfg.eval.ex_losses
    fig, axes = plt.subplots(
        len(losses), len(cfg.decodings), figsize=(4.2 * len(cfg.decodings), 3.2 * len(losses)), squeeze=False
    )
    for row, loss in zip(axes, losses):
        for ax, dec in zip(row, cfg.decodings):
            for name, s in methods.items():
                band(ax, s["decodings"][dec.name]["ex"][loss]["curve"], name, ls="--" if name == "oracle" else "-")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set(title=f"{dec.name}, loss {loss}", xlabel="generation length l", ylabel="ExAccErr(l) [%]")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    files.append(_save(fig, out_dir, "ex_acc_err.png"))

    first = next(s for n, s in methods.items() if n != "oracle")
    if first["decodings"][cfg.decodings[0].name]["ex"][losses[0]]["curve_vs_oracle_decoded"] is not None:
        fig, axes = plt.subplots(1, len(cfg.decodings), figsize=(4.2 * len(cfg.decodings), 3.2), squeeze=False)
        for ax, dec in zip(axes[0], cfg.decodings):
            for name, s in methods.items():
                if name != "oracle":
                    band(ax, s["decodings"][dec.name]["ex"][losses[0]]["curve_vs_oracle_decoded"], name)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set(
                title=f"{dec.name}, loss {losses[0]}, vs oracle decoded alike",
                xlabel="generation length l",
                ylabel="ExAccErr(l) [%]",
            )
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        files.append(_save(fig, out_dir, "ex_acc_err_vs_oracle_decoded.png"))

    fig, ax = plt.subplots(figsize=(5, 3.4))
    free_dec = next((d for d in cfg.decodings if d.is_ancestral), cfg.decodings[0])
    for name, s in methods.items():
        if name == "oracle":
            continue
        band(ax, s["kl_teacher_forced"], f"{name} teacher-forced")
        band(ax, s["decodings"][free_dec.name]["kl_free_running"], f"{name} free-running ({free_dec.name})", ls=":")
    ax.set(
        xlabel="generated position l (after the prompt)", ylabel="KL(o || m) per token [nats]", title="per-position KL"
    )
    ax.legend(fontsize=6)
    fig.tight_layout()
    files.append(_save(fig, out_dir, "kl_per_position.png"))

    ss_runs = [r for r in runs if r["history"] and any(g < 1.0 for g in r["history"]["gold_prob"])]
    if ss_runs:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for r in ss_runs:
            h = r["history"]
            (line,) = ax.plot(h["step"], 1 - np.asarray(h["gold_prob"]), label=f"{r['method']} s{r['seed']} scheduled")
            ax.plot(
                h["step"], h["mix_rate"], ls=":", color=line.get_color(), label=f"{r['method']} s{r['seed']} realised"
            )
        ax.set(
            xlabel="training step", ylabel="fraction of inputs fed by the model", title="schedule vs realised mixing"
        )
        ax.legend(fontsize=5)
        fig.tight_layout()
        files.append(_save(fig, out_dir, "mixing_rate.png"))

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name in methods:
        rs = [r["eval"] for r in runs if r["method"] == name]
        for dec, marker in zip(cfg.decodings, "os^dv*"):
            ax.scatter(
                [r["nll_test"] for r in rs],
                [r["decodings"][dec.name]["nll_oracle"] for r in rs],
                marker=marker,
                s=18,
                label=f"{name} / {dec.name}",
            )
    ax.set(
        xlabel="NLL-test (teacher-forced, nats/token)",
        ylabel="NLL-oracle of samples (nats/token)",
        title="NLL-oracle vs NLL-test",
    )
    ax.legend(fontsize=6)
    fig.tight_layout()
    files.append(_save(fig, out_dir, "nll_oracle_vs_nll_test.png"))
    return files


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(os.path.join(out_dir, name), dpi=80)
    plt.close(fig)
    return name


# ----------------------------------------------------------------------------- report


def _fmt(mc, digits=3, pct=False) -> str:
    if mc is None:
        return "-"
    m, h = mc
    if m is None or not math.isfinite(m):
        return "-"
    u = "%" if pct else ""
    if h is None or not math.isfinite(h):
        return f"{m:.{digits}f}{u}"
    return f"{m:.{digits}f} ± {h:.{digits}f}{u}"


def _verdict(mc) -> str:
    m, h = mc
    if not (math.isfinite(m) and math.isfinite(h)):
        return "undetermined (one run)"
    if m - h > 0:
        return "positive (95% CI excludes 0)"
    if m + h < 0:
        return "negative (95% CI excludes 0)"
    return "not distinguishable from 0 (95% CI includes 0)"


def render_report(cfg: StudyConfig, results: dict, plots: list[str]) -> str:
    s = results["summary"]
    L = cfg.data.length - cfg.eval.prompt_len
    lines = [
        f"# Exposure-bias study: {cfg.name}",
        "",
        f"Oracle: `{cfg.oracle.kind}` (entropy {results['oracle_entropy_per_token']:.3f} nats/token); "
        f"{cfg.data.n_train} training and {cfg.data.n_test} test sequences of {cfg.data.length} tokens; "
        f"free running continues a {cfg.eval.prompt_len}-token oracle prompt for l = 1..{L} tokens; "
        f"{len(cfg.seeds)} seeds x {len(cfg.methods)} methods x {len(cfg.decodings)} decodings; "
        f"{cfg.eval.n_rollouts} free-running roll-outs per model and decoding (jitted decoder); "
        f"ran in {results['seconds'] / 60:.1f} min on `{results['jax_backend']}`.",
        "",
        "Numbers are mean ± 95% CI half-width over seeds (Student t). ExAccErr(l) = (R(l) / (l eps(l)) - 1) x 100% "
        f"with per-step losses {', '.join(f'`{x}`' for x in cfg.eval.ex_losses)} "
        "(exact definitions in `arjax.train.exposure.metrics`: "
        "`regret` = oracle NLL of the decoder's token minus that of the oracle decoded the same way, "
        "zero for a perfect model; "
        "`kl` = KL(o||m) at the context, zero for a perfect model; "
        "`oracle_nll` = expected oracle NLL of the token the decoder "
        "emits, which also moves with how predictable the visited contexts are). "
        '"vs oracle decoded alike" replaces eps\'s '
        "oracle roll-in (oracle samples) by the oracle decoded with the same strategy, so that the shift caused by the "
        "decoding strategy itself is not counted as exposure bias. "
        "The `oracle` row decodes the oracle itself (one run, no CI): what decoding alone does with a perfect model.",
        "",
        "## Teacher-forced quality",
        "",
        "| method | NLL-test | forward KL / token |",
        "|---|---|---|",
    ]
    for name, m in s["methods"].items():
        lines.append(f"| {name} | {_fmt(m['nll_test'])} | {_fmt(m['forward_kl_per_token'])} |")
    first = next(iter(s["methods"].values()))
    q = first["decodings"][cfg.decodings[0].name]["quarter"]
    for dec in cfg.decodings:
        head = ["method"]
        for loss in cfg.eval.ex_losses:
            head += [
                f"ExAccErr@{q} [{loss}]",
                f"ExAccErr@{L} [{loss}]",
                f"growth {q}->{L} [{loss}]",
                f"free - TF per step [{loss}]",
                f"ExAccErr@{L} vs oracle decoded alike [{loss}]",
            ]
        head += [
            "top-1 agreement TF",
            "top-1 agreement free",
            "NLL-oracle",
            "EB-C (TV, last quarter)",
            "seq-rep-2",
            "rep-4",
            "valid roll-outs",
        ]
        lines += [
            "",
            f"## Decoding `{dec.name}` (temperature {dec.temperature}, top-k {dec.top_k}, top-p {dec.top_p})",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for name, m in s["methods"].items():
            d = m["decodings"][dec.name]
            row = [name]
            for loss in cfg.eval.ex_losses:
                e = d["ex"][loss]
                row += [
                    _fmt(e["at_quarter"], 1, True),
                    _fmt(e["at_L"], 1, True),
                    _fmt(e["growth"], 1, True),
                    _fmt(e["gap"]),
                    _fmt(e["at_L_vs_oracle_decoded"], 1, True),
                ]
            row += [
                _fmt(d["agree_teacher_forced"]),
                _fmt(d["agree_free_running"]),
                _fmt(d["nll_oracle"]),
                _fmt(d["eb_c_tv_at_end"], 2),
                _fmt(d["seq_rep_2"]),
                _fmt(d["rep_4"]),
                _fmt(d.get("valid_rate")),
            ]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## What the numbers say (each statement is the sign of a 95% CI over seeds)", ""]
    for name, m in s["methods"].items():
        if name == "oracle":
            continue
        for dec in cfg.decodings:
            for loss in cfg.eval.ex_losses:
                e = m["decodings"][dec.name]["ex"][loss]
                lines.append(
                    f"- `{name}`, `{dec.name}`, loss `{loss}`: "
                    f"ExAccErr@{L} = {_fmt(e['at_L'], 1, True)} is {_verdict(e['at_L'])}; "
                    f"its growth from l={q} to l={L} ({_fmt(e['growth'], 1, True)}) is {_verdict(e['growth'])}."
                )
    for key, c in s["comparisons"].items():
        lines.append(
            f"- {key}, paired by seed: "
            f"ΔExAccErr@{L} = {_fmt(c['ex_acc_err_at_L'], 1, True)}, {_verdict(c['ex_acc_err_at_L'])}; "
            f"ΔR({L}) (free running) = {_fmt(c['R_at_L'])}, {_verdict(c['R_at_L'])}; "
            f"Δ l·eps({L}) (teacher forced) = {_fmt(c['l_eps_at_L'])}, {_verdict(c['l_eps_at_L'])}."
        )
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += [
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(jsonable(dataclasses.asdict(cfg)), sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
