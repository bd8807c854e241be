"""``var-lab export``: a ``var-lab fit`` checkpoint in the released format, with its tokenizer and a model card.

The release (FoundationVision/VAR) ships bare state dicts: ``var_d{depth}.pth`` for the transformer and
``vae_ch160v4096z32.pth`` for the tokenizer. ``export`` writes the same two kinds of file, so that the release's
own loading code, and ``var_lab.models.release.load_release_var``, load them with ``strict=True``:

    var-lab export runs/depth=16/checkpoints/last.ckpt --out export/var_d16.pth

writes ``export/var_d16.pth``, ``export/vae.pth`` (the tokenizer the model was trained with) and
``export/var_d16.md``, a model card: architecture, tokenizer, data, steps, images and tokens seen, training compute,
the final metrics and the MLflow run they come from.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from var_lab.contract import COMPUTE_PFLOPS, EVAL_FID, VAL_LOSS, VAL_LOSS_TAIL
from var_lab.inputs import ArgumentParser, BadInputError
from var_lab.models.checkpoints import load_var_checkpoint

#: metrics shown on the card, in this order, when the run logged them
CARD_METRICS = (VAL_LOSS, VAL_LOSS_TAIL, "val/acc_mean", "train/loss", COMPUTE_PFLOPS, EVAL_FID, "eval/kid")


def export_checkpoint(
    checkpoint: Path, out: Path, tokenizer_out: Optional[Path] = None, meta: Optional[dict] = None
) -> dict[str, Any]:
    """Write the transformer and the tokenizer of ``checkpoint`` as released-format state dicts.

    Args:
        checkpoint: a ``.ckpt`` of ``var-lab fit``.
        out: the transformer's ``.pth``.
        tokenizer_out: the tokenizer's ``.pth`` (default: ``vae.pth`` next to ``out``).
        meta: the checkpoint's ``var_lab`` entry when the caller has already read the file (read here otherwise).

    Returns:
        What the model card needs: the models, the checkpoint's info, the file paths.
    """
    vqvae, var, info = load_var_checkpoint(checkpoint)
    tokenizer_out = tokenizer_out or out.with_name("vae.pth")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Plain tensors on the CPU, contiguous and detached, as the release stores them.
    torch.save({k: v.detach().cpu().contiguous() for k, v in var.state_dict().items()}, out)
    torch.save({k: v.detach().cpu().contiguous() for k, v in vqvae.state_dict().items()}, tokenizer_out)
    if meta is None:
        meta = torch.load(checkpoint, map_location="cpu", weights_only=False).get("var_lab", {})
    return {"var": var, "vqvae": vqvae, "info": info, "meta": meta, "out": out, "tokenizer_out": tokenizer_out}


def _run_record(info: dict) -> tuple[dict[str, str], dict[str, float], str]:
    """(params, latest metrics, a note) of the checkpoint's MLflow run; empty when it has none or it is out of reach."""
    run_id, uri = info.get("mlflow_run_id"), info.get("tracking_uri")
    if not run_id or not uri:
        return {}, {}, "the checkpoint names no MLflow run"
    try:
        from var_lab.tracking import store_clients

        run = store_clients()(uri).get_run(run_id)
    except Exception as error:  # noqa: BLE001 - a card without the run's metrics is still a card
        return {}, {}, f"MLflow run {run_id} at {uri} could not be read ({type(error).__name__}: {error})"
    return dict(run.data.params), dict(run.data.metrics), ""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _weights_row(info: dict, fit: dict) -> str:
    if info.get("weights") == "ema":
        return f"EMA of the weights (decay {fit.get('optim', {}).get('ema_decay')})"
    return "the trained weights (the run kept no EMA)"


def model_card(exported: dict[str, Any]) -> str:
    """A markdown model card for an export (see ``export_checkpoint``)."""
    var, vqvae, info, meta = exported["var"], exported["vqvae"], exported["info"], exported["meta"]
    fit = info.get("fit_config") or {}
    data, trainer = fit.get("data", {}), fit.get("trainer", {})
    params, metrics, note = _run_record(info)
    step_metrics = (meta.get("step_metrics") or {}).get("metrics", {})
    step = info.get("global_step", 0)
    global_batch = int(params.get("train.global_batch") or data.get("batch_size") or 0)
    counts = var.num_scaling_params() if hasattr(var, "num_scaling_params") else {}
    total = sum(p.numel() for p in var.parameters())
    flops_per_image = meta.get("flops_per_image")
    images = step * global_batch
    rows = [
        ("depth", var.depth),
        ("width C", var.C),
        ("heads", var.num_heads),
        ("parameters (all of the transformer)", total),
        *[(f"parameters: {name}", n) for name, n in counts.items() if name != "total"],
        ("classes", var.num_classes),
        ("scales (patch_nums)", " ".join(map(str, vqvae.patch_nums))),
        ("tokens per image L", var.L),
        ("codebook V x Cvae", f"{vqvae.vocab_size} x {vqvae.Cvae}"),
        ("resolution", vqvae.resolution),
    ]
    training = [
        ("data", f"{data.get('name', '?')} (root {data.get('root') or 'default'})"),
        ("optimizer steps", step),
        ("epochs started", info.get("epoch", 0) + 1),
        ("global batch", global_batch or "?"),
        ("images seen", images if global_batch else "?"),
        ("tokens seen", images * var.L if global_batch else "?"),
        ("precision", trainer.get("precision", "?")),
        ("weights", _weights_row(info, fit)),
    ]
    if flops_per_image and global_batch:
        training.append(("training compute (PFLOPs)", images * float(flops_per_image) / 1e15))
    lines = [
        f"# VAR depth {var.depth}: {exported['out'].name}",
        "",
        f"Exported {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by `var-lab export` from a `var-lab fit` "
        "checkpoint. Both files are bare state dicts in the released format (FoundationVision/VAR): "
        f"`{exported['out'].name}` (the transformer) and `{exported['tokenizer_out'].name}` (the multi-scale VQVAE "
        "it was trained with). Load them with `var_lab.models.release.load_release_var(path, vqvae=...)`; the "
        "tokenizer's architecture is in the table below, since the file does not hold it.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in rows],
        f"| tokenizer config | `{fit.get('tokenizer', {})}` |",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in training],
        "",
        "## Final metrics",
        "",
    ]
    shown = [(k, metrics[k]) for k in CARD_METRICS if k in metrics]
    if not shown:
        shown = [(k, step_metrics[k]) for k in CARD_METRICS if k in step_metrics]
        source = f"the checkpoint's last logged step ({note})" if shown else note
    else:
        source = f"MLflow run `{info['mlflow_run_id']}` at `{info['tracking_uri']}` (latest value of each)"
    lines += [f"From {source}.", ""]
    if shown:
        lines += ["| metric | value |", "|---|---|", *[f"| {k} | {_fmt(float(v))} |" for k, v in shown], ""]
    if info.get("mlflow_run_id"):
        lines += [f"MLflow run: `{info['mlflow_run_id']}` (tracking URI `{info.get('tracking_uri')}`).", ""]
    return "\n".join(lines)


def export_main(argv: list[str]) -> int:
    """``var-lab export CKPT --out var_dN.pth``: the released format, the tokenizer next to it, a model card."""
    parser = ArgumentParser(prog="var-lab export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a var-lab fit checkpoint (.ckpt)")
    parser.add_argument("--out", help="the transformer's .pth (default: var_d<depth>.pth next to the checkpoint)")
    parser.add_argument("--tokenizer-out", help="the tokenizer's .pth (default: vae.pth next to --out)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise BadInputError(f"checkpoint {checkpoint} does not exist; pass a .ckpt written by `var-lab fit`")
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)  # read once: d30 files are gigabytes
        depth = int(ckpt["hyper_parameters"]["config"]["model"]["depth"])
        meta = ckpt.get("var_lab", {})
        del ckpt
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise BadInputError(
            f"{checkpoint} is not a var-lab fit checkpoint ({type(error).__name__}: {error}); pass a .ckpt written "
            "by `var-lab fit`"
        ) from None
    out = Path(args.out) if args.out else checkpoint.parent / f"var_d{depth}.pth"
    tokenizer_out = Path(args.tokenizer_out) if args.tokenizer_out else out.with_name("vae.pth")
    card = out.with_suffix(".md")
    existing = [str(p) for p in (out, tokenizer_out, card) if p.exists()]
    if existing and not args.force:
        raise BadInputError(f"{', '.join(existing)} already exist; pass --force to overwrite, or another --out")
    exported = export_checkpoint(checkpoint, out, tokenizer_out, meta)
    card.write_text(model_card(exported))
    print(f"var-lab export: {out} (transformer, depth {depth}), {tokenizer_out} (tokenizer), {card} (model card)")
    return 0


if __name__ == "__main__":
    sys.exit(export_main(sys.argv[1:]))
