"""`rto inspect`: where does the DPO model put credit? Responses with each token coloured by its token reward.

Run: rto inspect model=<policy> ref=<SFT model> dpo=<DPO model> data.path=<prompts> [n=8]
For each response the policy samples, every token t gets the DPO token reward
z_t = dpo_scale * (log pi_dpo(y_t) - log pi_ref(y_t)) (clipped when dpo_clip is set; green > 0, red < 0) and,
in its tooltip, the policy's KL term log pi(y_t) - log pi_ref(y_t). Writes inspect.html, inspect.png and
tokens.json under output_dir/name.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

import rto_kernels
from rto.config import InspectConfig, ModelConfig
from rto.data import load_rows, tokenize_prompts
from rto.evaluate import generate, model_settings
from rto.models import PolicyModel, check_same_tokenizers, load_causal_lm, load_tokenizer


@torch.no_grad()
def response_logps(
    path: str, what: str, samples, temperature: float = 1.0, settings: ModelConfig | None = None
) -> list[list[float]]:
    """Log-probs of each sample's response tokens under the model at `path` (loaded under `settings`: revision
    and remote code, `hub_kwargs`)."""
    settings = settings if settings is not None else ModelConfig(path=path)
    model = PolicyModel(load_causal_lm(path, settings, what)).eval()
    out = []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, len(s.prompt_ids) :] = True
        logp = model(ids, torch.ones_like(ids), loss_mask=mask, temperature=temperature)["logp"]
        out.append(logp[0, len(s.prompt_ids) :].tolist())
    return out


def _colour(z: float, scale: float) -> str:
    r, g, b, a = _rgba(z, scale)
    return f"rgba({round(255 * r)},{round(255 * g)},{round(255 * b)},{a:.2f})"


def inspect_tokens(cfg: InspectConfig) -> str:
    settings = model_settings(cfg)
    tok = load_tokenizer(settings, "")
    check_same_tokenizers(tok, {"ref": cfg.ref, "dpo": cfg.dpo}, "the model's", settings)  # they score its token ids
    rows = load_rows(cfg.data.path, cfg.data.split, subset=cfg.data.subset)
    prompts, _ = tokenize_prompts(rows.select(range(min(cfg.n, len(rows)))), tok, cfg.data, cfg.data.path)
    sampling = dict(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    samples = generate(cfg.model, prompts, tok, settings=settings, **sampling)
    models = ((cfg.model, "model"), (cfg.ref, "ref"), (cfg.dpo, "dpo"))
    pol, ref, dpo = (response_logps(path, what, samples, settings=settings) for path, what in models)
    records = []
    for s, lp, lr, ld in zip(samples, pol, ref, dpo):
        z = rto_kernels.dpo_token_reward(torch.tensor(ld), torch.tensor(lr), scale=cfg.dpo_scale, clip=cfg.dpo_clip)
        prompt = tok.decode(s.prompt_ids, skip_special_tokens=True)
        kl = [p - r for p, r in zip(lp, lr)]
        tokens = tok.convert_ids_to_tokens(s.response_ids)
        records.append({"prompt": prompt, "tokens": tokens, "dpo_reward": z.tolist(), "kl": kl})
    out = Path(cfg.output_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokens.json").write_text(json.dumps(records, indent=1))
    scale = max((abs(v) for r in records for v in r["dpo_reward"]), default=1.0) or 1.0
    (out / "inspect.html").write_text(_html(records, scale))
    _png(records, scale, out / "inspect.png")
    return f"wrote {out / 'inspect.html'}, {out / 'inspect.png'} and {out / 'tokens.json'}"


HTML_HEAD = (
    "<html><head><meta charset='utf-8'><title>DPO token rewards</title><style>body{font-family:sans-serif}"
    "span{padding:2px 3px;margin:1px;border-radius:3px;display:inline-block}</style></head><body>"
)


def _html(records: list[dict], scale: float) -> str:
    legend = "green: positive, red: negative; full colour at"
    intro = f"<h2>DPO token reward per response token</h2><p>{legend} |z| = {scale:.3g}. Hover a token for its reward"
    parts = [HTML_HEAD, intro + " and KL term.</p>"]
    for r in records:
        spans = "".join(
            f"<span style='background:{_colour(z, scale)}' title='dpo reward {z:+.4f}, kl {k:+.4f}'>{html.escape(t)}"
            "</span>"
            for t, z, k in zip(r["tokens"], r["dpo_reward"], r["kl"])
        )
        total = f"<small>sum of DPO rewards {sum(r['dpo_reward']):+.4f}</small>"
        parts.append(f"<p><b>{html.escape(r['prompt'])}</b><br>{spans}<br>{total}</p>")
    return "\n".join(parts + ["</body></html>"])


def _png(records: list[dict], scale: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 0.6 * len(records) + 0.8))
    ax.set_axis_off()
    for i, r in enumerate(records):
        y = 1 - (i + 0.5) / len(records)
        ax.text(0.0, y, r["prompt"][-28:], fontsize=8, va="center", ha="left", family="monospace")
        x = 0.24
        for t, z in zip(r["tokens"], r["dpo_reward"]):
            box = dict(boxstyle="round,pad=0.2", fc=_rgba(z, scale), ec="none")
            ax.text(x, y, t, fontsize=8, va="center", ha="left", family="monospace", bbox=box)
            x += 0.012 * (len(t) + 1)
    ax.set_title(f"DPO token reward (green > 0, red < 0; full colour at |z| = {scale:.3g})", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _rgba(z: float, scale: float) -> tuple[float, float, float, float]:
    a = min(1.0, abs(z) / scale) if scale > 0 else 0.0
    return (0.0, 0.63, 0.24, a) if z >= 0 else (0.82, 0.16, 0.16, a)
