"""``var-lab eval`` and ``var-lab reference-stats``: sample a VAR across every rank and score it with torch-fidelity.

Protocol (the release's, all configurable): ``--per-class 50`` images of every class (50,000 for ImageNet), cfg 1.5,
top-k 900, top-p 0.96. Image ``i`` has class ``floor(i * C / N)`` (class-balanced, class-major order as the release
samples them). Images are generated in global batches ``[j * B, (j + 1) * B)``; batch ``j`` runs on rank ``j % W``
with a generator seeded from ``(seed, j * B)``, so one process or any number of processes produce the same images for
the same seed and batch size. Every rank extracts the Inception features of its own images on its GPU right after
sampling; only features (and a few grid images) are gathered, then rank 0 computes the metrics.

Outputs (rank 0): ``metrics.json`` (written before anything is logged, so nothing is lost if the tracking store is
down), ``grid.png`` (a few classes x a few samples), optional ``images/{i:06d}.png`` (the release's sample folder
layout, written by every rank) and ``samples.npz`` (ADM format: ``arr_0`` uint8 N x H x W x 3, ``arr_1`` labels).
MLflow: ``eval/fid``, ``eval/kid``, ``eval/precision``, ``eval/recall`` and ``eval/is`` (when the weights have the
classifier) at the checkpoint's training step in the checkpoint's run, or in a new run tagged ``var_lab.kind=eval``
for a released checkpoint; params ``eval.cfg``, ``eval.top_k``, ``eval.top_p``, ``eval.num_samples``,
``eval.reference``; the grid and metrics.json as artifacts under ``eval/``.

Multi-GPU: ``torchrun --nproc-per-node 8 -m var_lab.cli eval ...`` (or ``var-lab`` under any launcher that sets
``RANK``/``WORLD_SIZE``); an already initialised ``torch.distributed`` process group (Lightning DDP) is used as is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from var_lab.gpu import out_of_memory_message, require_cuda
from var_lab.inputs import ArgumentParser, BadInputError, check_output_dir, positive_int, report
from var_lab.metrics.evaluation import (  # noqa: F401 - the evaluation core, re-exported for callers of var-lab eval
    METRIC_NAMES,
    EvalResult,
    GeneratedSet,
    SamplingConfig,
    batch_ranges,
    batch_seed,
    class_balanced_labels,
    distributed_context,
    evaluate_var,
    gather_generated,
    grid_indices,
    sample_and_extract,
    save_grid,
    save_npz_distributed,
    training_images,
    write_npz,
)
from var_lab.metrics.fid import (
    DatasetImages,
    FolderImages,
    ImageSource,
    InceptionFeatures,
    MetricOptions,
    NpzImages,
    ReferenceStats,
    reference_statistics,
)
from var_lab.models.checkpoints import WEIGHT_CHOICES
from var_lab.ranks import init_from_env

# --------------------------------------------------------------------------------------------------------------------
# MLflow


def mlflow_metrics(result: EvalResult) -> dict[str, float]:
    """``eval/*`` metric names of the MLflow contract (plus the standard deviations of KID and IS)."""
    names = {"fid": "eval/fid", "kid": "eval/kid", "kid_std": "eval/kid_std", "precision": "eval/precision"}
    names |= {"recall": "eval/recall", "is": "eval/is", "is_std": "eval/is_std"}
    return {names[k]: float(v) for k, v in result.metrics.items() if k in names}


def eval_params(sampling: SamplingConfig, result: EvalResult) -> dict[str, str]:
    return {
        "eval.cfg": str(sampling.cfg),
        "eval.top_k": str(sampling.top_k),
        "eval.top_p": str(sampling.top_p),
        "eval.num_samples": str(sampling.num_samples),
        "eval.reference": result.reference[:500],
    }


def log_to_mlflow(
    result: EvalResult,
    sampling: SamplingConfig,
    *,
    tracking_uri: str,
    step: int,
    run_id: Optional[str] = None,
    experiment: str = "var-lab-eval",
    run_name: Optional[str] = None,
    tags: Optional[dict[str, str]] = None,
    params: Optional[dict[str, Any]] = None,
    spool_dir: Optional[Union[str, Path]] = None,
) -> str:
    """Log an evaluation into ``run_id`` (a training run) or into a new run of ``experiment``.

    It writes the way a training run does (:func:`var_lab.tracking.deliver_or_spool`): when the store is down, the
    metrics, params and artifacts are kept in ``<spool_dir>/mlflow_spool.jsonl`` and ``var-lab sync`` delivers them.
    A new run needs the store up to get its id. MLflow params are immutable: an ``eval.*`` param already logged in the
    run with another value (a second evaluation with other settings) is recorded as the tag ``<param>:step<step>``
    instead, with a warning.

    Args:
        spool_dir: where an outage's records are kept (default: the folder of ``metrics.json``, else the current one).

    Returns:
        The run id.
    """
    from mlflow.tracking import MlflowClient

    from var_lab.tracking import (
        REJECTED_FILENAME,
        SPOOL_FILENAME,
        TAG_KIND,
        deliver_or_spool,
        get_or_create_experiment,
        logged_params,
        normalize_tracking_uri,
    )

    tracking_uri = normalize_tracking_uri(tracking_uri)
    new_run = run_id is None
    if new_run:
        experiment_id = get_or_create_experiment(tracking_uri, experiment)
        run_tags = {TAG_KIND: "eval", **(tags or {})}
        run_id = MlflowClient(tracking_uri).create_run(experiment_id, run_name=run_name, tags=run_tags).info.run_id
        existing: Optional[dict[str, str]] = {}
    else:
        existing = logged_params(tracking_uri, run_id)  # fails clearly when the run is not in this store
    wanted = {k: str(v) for k, v in (params or {}).items()} | eval_params(sampling, result)
    # With the store down the params cannot be compared now; a changed one is then refused at delivery, with both
    # values, in mlflow_spool.rejected.jsonl.
    known = existing or {}
    changed = {k: v for k, v in wanted.items() if k in known and known[k] != v}
    if changed:
        print(
            f"var-lab eval: run {run_id} already has {', '.join(f'{k}={known[k]}' for k in changed)}; "
            f"MLflow params are immutable, so this evaluation's values are tags '<param>:step{step}'",
            file=sys.stderr,
        )

    def record(kind: str, **fields: Any) -> dict:
        return {"uri": tracking_uri, "run_id": run_id, "type": kind, **fields}

    timestamp = int(time.time() * 1000)
    records = [record("param", key=k, value=v) for k, v in wanted.items() if k not in known]
    records += [record("tag", key=f"{k}:step{step}", value=v) for k, v in changed.items()]
    records += [
        record("metric", key=k, value=v, step=step, timestamp=timestamp) for k, v in mlflow_metrics(result).items()
    ]
    records += [
        record("artifact", path=str(result.files[key]), artifact_path=f"eval/step{step}")
        for key in ("grid", "metrics_json")
        if key in result.files
    ]
    if new_run:
        records.append(record("status", status="FINISHED", end_time=timestamp))
    if spool_dir is None:
        spool_dir = Path(result.files["metrics_json"]).parent if "metrics_json" in result.files else Path.cwd()
    delivery = deliver_or_spool(records, Path(spool_dir) / SPOOL_FILENAME)
    if delivery.remaining:
        print(
            f"var-lab eval: the MLflow store at {tracking_uri} is unreachable ({delivery.error}); "
            f"{delivery.remaining} records of run {run_id} are kept in {delivery.path}: deliver them with "
            f"`var-lab sync --output-dir {Path(spool_dir)}`",
            file=sys.stderr,
        )
    if delivery.rejected:
        print(
            f"var-lab eval: the store refused {delivery.rejected} records of run {run_id}; they and the reasons are in "
            f"{Path(spool_dir) / REJECTED_FILENAME}",
            file=sys.stderr,
        )
    return run_id


# --------------------------------------------------------------------------------------------------------------------
# Command line


def add_reference_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reference (one of; default: the checkpoint's training images)")
    group.add_argument(
        "--reference",
        help="shorthand: an .npz file, an image folder, 'train' (the checkpoint's training images) or fashion_mnist",
    )
    group.add_argument("--reference-npz", help="ADM-style reference batch .npz (arr_0 uint8 NHWC; optional mu/sigma)")
    group.add_argument("--reference-folder", help="folder of reference images (searched recursively)")
    group.add_argument(
        "--reference-data",
        choices=("fashion_mnist", "folder"),
        help="a var-lab dataset with the training pipeline's deterministic transform",
    )
    parser.add_argument("--reference-root", help="root of --reference-data (default: Fashion-MNIST from Debian)")
    parser.add_argument(
        "--reference-split", default="train", choices=("train", "val"), help="split of a dataset reference"
    )
    parser.add_argument(
        "--reference-resolution",
        type=int,
        help="resize/crop reference images to this side (default: the generated images' side)",
    )
    parser.add_argument(
        "--reference-limit",
        type=int,
        help="at most this many reference images (a fixed subset; 0: all). Default: all of an .npz or folder, "
        "and as many as generated for a dataset (FID of N vs N)",
    )
    parser.add_argument("--cache-dir", help="reference statistics cache (default: $VAR_LAB_CACHE/fid_reference)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")


def reference_source(
    args: argparse.Namespace,
    resolution: Optional[int],
    default_data: Optional[dict] = None,
    default_limit: Optional[int] = None,
) -> ImageSource:
    """The reference images chosen by the flags, else the training images of ``default_data``.

    Args:
        args: parsed flags of :func:`add_reference_args`.
        resolution: side of the generated images (folders and datasets are brought to it).
        default_data: the run's ``data`` config (dict), for the default reference.
        default_limit: reference images of a dataset when ``--reference-limit`` is not given.

    Raises:
        ValueError: conflicting flags, or no reference available (says which flags to use).
        FileNotFoundError: a missing file or folder.
    """
    npz, folder, data = args.reference_npz, args.reference_folder, args.reference_data
    given = [flag for flag, value in (("--reference", args.reference), ("--reference-npz", npz),
             ("--reference-folder", folder), ("--reference-data", data)) if value]  # fmt: skip
    if len(given) > 1:
        raise ValueError(f"give one reference, got {', '.join(given)}")
    use_training = not given or args.reference in ("train", "data")
    if args.reference and not use_training:
        spec = Path(args.reference).expanduser()
        if args.reference == "fashion_mnist":
            data = "fashion_mnist"
        elif spec.suffix == ".npz":
            npz = args.reference
        elif spec.is_dir():
            folder = args.reference
        else:
            raise ValueError(
                f"--reference {args.reference!r}: not an .npz file, an existing folder, 'train' or 'fashion_mnist'"
            )
    side = args.reference_resolution or resolution
    explicit_limit = args.reference_limit or None  # 0 means all
    dataset_limit = explicit_limit if args.reference_limit is not None else default_limit
    if npz:
        return NpzImages(npz, limit=explicit_limit)
    if folder:
        return FolderImages(folder, resolution=side, limit=explicit_limit)
    if data:
        return DatasetImages(data, args.reference_root, side or 32, args.reference_split, dataset_limit)
    images = training_images(default_data)
    if images is None:
        origin = f"the checkpoint's data.name is '{default_data.get('name')}'" if default_data else "no training data"
        raise ValueError(
            f"no reference images ({origin}): pass --reference-npz FILE (for ImageNet the ADM batch "
            "VIRTUAL_imagenet256_labeled.npz), --reference-folder DIR or --reference-data fashion_mnist|folder"
        )
    side = args.reference_resolution or images.get("resolution") or resolution
    return DatasetImages(images["name"], images["root"], side, args.reference_split, dataset_limit)


def _init_distributed(device_arg: Optional[str]) -> tuple[torch.device, bool]:
    """Start the process group from torchrun's environment when needed; returns (device, started_here)."""
    backend = "nccl" if torch.cuda.is_available() and device_arg != "cpu" else "gloo"
    # Rank 0 may spend minutes on the reference statistics while the others wait in a collective.
    started = init_from_env(backend, timeout=timedelta(hours=2))
    if device_arg:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return device, started


def _load_model(args: argparse.Namespace, device: torch.device):
    """(var, info, model_params) from --checkpoint or --release-var/--release-tokenizer."""
    from var_lab.models.checkpoints import load_var_model

    vqvae, var, info = load_var_model(
        args.checkpoint, args.release_var, args.release_tokenizer, args.depth, weights=args.model_weights
    )
    model_params: dict[str, Any] = {"eval.model_weights": info["weights"]}  # ema, raw or release
    if not args.checkpoint:
        model_params |= {
            **var.scaling_metadata(),
            "data.resolution": vqvae.resolution,
            "eval.checkpoint": str(Path(args.release_var).resolve()),
        }
    var.vqvae.to(device).eval()
    var.to(device).eval()
    return var, info, model_params


def _parse_metrics(text: str) -> tuple[str, ...]:
    items = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = set(items) - set(METRIC_NAMES) - {"auto"}
    if unknown:
        raise ValueError(f"--metrics: unknown {sorted(unknown)}; allowed: {', '.join(METRIC_NAMES)}")
    return items


def eval_main(argv: list[str]) -> int:
    """``var-lab eval``: class-balanced samples on every rank -> FID/KID/IS/precision/recall -> metrics.json, MLflow."""
    parser = ArgumentParser(prog="var-lab eval", description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model (one of)")
    model.add_argument("--checkpoint", help="a var-lab fit checkpoint (.ckpt)")
    model.add_argument("--release-var", help="a released var_d{16,20,24,30}.pth (with --release-tokenizer)")
    model.add_argument("--release-tokenizer", help="the released vae_ch160v4096z32.pth")
    model.add_argument("--depth", type=int, help="expected depth of --release-var")
    parser.add_argument("--per-class", type=positive_int, default=50, help="images per class (release protocol: 50)")
    parser.add_argument(
        "--num-samples", type=positive_int, help="total images instead of --per-class x classes (balanced)"
    )
    parser.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance ratio")
    parser.add_argument("--top-k", type=int, default=900, help="top-k sampling (0: off)")
    parser.add_argument("--top-p", type=float, default=0.96, help="top-p sampling (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (per batch: derived from seed and position)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per sampling batch per rank")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"), help="sampling on CUDA")
    parser.add_argument("--metrics", default="fid,kid,prc,auto", help="fid,kid,prc,is; auto adds IS when possible")
    parser.add_argument("--kid-subset-size", type=positive_int, default=1000, help="KID subset size (capped at N)")
    parser.add_argument("--weights", help="FID Inception weights (default: $TORCH_HOME/hub/checkpoints/...)")
    parser.add_argument(
        "--model-weights", default="ema", choices=WEIGHT_CHOICES,
        help="a checkpoint of a run with optim.ema_decay: its moving average (ema) or its trained weights (raw)",
    )  # fmt: skip
    parser.add_argument(
        "--feature-batch-size", type=positive_int, default=200, help="images per Inception forward pass"
    )
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: this rank's GPU, else the CPU)")
    parser.add_argument("--out", help="output folder (default: eval_<step>_cfg<cfg> next to the checkpoint)")
    parser.add_argument("--save-png", action="store_true", help="write images/{i:06d}.png (the release's layout)")
    parser.add_argument("--save-npz", action="store_true", help="write samples.npz (ADM format)")
    parser.add_argument("--grid-classes", type=int, default=8, help="classes in grid.png")
    parser.add_argument("--grid-per-class", type=int, default=8, help="samples per class in grid.png")
    parser.add_argument("--tracking-uri", help="MLflow store (default: the checkpoint's, else $MLFLOW_TRACKING_URI)")
    parser.add_argument("--experiment", default="var-lab-eval", help="experiment of new runs (released checkpoints)")
    parser.add_argument("--no-mlflow", action="store_true", help="only write metrics.json")
    add_reference_args(parser)
    args = parser.parse_args(argv)

    from var_lab.metrics.fid_weights import InceptionScoreUnavailableError, MissingInceptionWeightsError, weights_info

    require_cuda(args.device, "--device")
    device, started = _init_distributed(args.device)
    rank, world = distributed_context()
    try:
        from var_lab.models.checkpoints import check_model_paths

        # The model files first: a mistyped path is the cheaper fix, and is reported even without FID weights.
        check_model_paths(args.checkpoint, args.release_var, args.release_tokenizer)
        metrics = _parse_metrics(args.metrics)
        info_w = weights_info(args.weights)  # fails early, naming the command that installs the weights
        skipped: dict[str, str] = {}
        if "auto" in metrics:
            metrics = tuple(m for m in metrics if m != "auto")
            if info_w.has_classifier and "is" not in metrics:
                metrics += ("is",)
            elif not info_w.has_classifier:
                skipped["is"] = f"the weights {info_w.path} have no classifier (converted); IS needs the original"
                if rank == 0:
                    print(f"var-lab eval: Inception Score skipped: {skipped['is']}", file=sys.stderr)
        extractor = InceptionFeatures(
            args.weights, device=device, batch_size=args.feature_batch_size, with_logits="is" in metrics
        )
        var, info, model_params = _load_model(args, device)  # a bad checkpoint path is refused before it loads
        num_samples = args.num_samples if args.num_samples is not None else args.per_class * var.num_classes
        sampling = SamplingConfig(
            num_samples=num_samples,
            num_classes=var.num_classes,
            cfg=args.cfg,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            batch_size=args.batch_size,
        )
        step = int(info.get("global_step") or 0)
        if args.out:
            out = Path(args.out)
        elif args.checkpoint:
            out = Path(args.checkpoint).resolve().parent / f"eval_step{step}_cfg{args.cfg:g}_n{num_samples}"
        else:
            out = Path("eval_out") / f"release_d{var.depth}_cfg{args.cfg:g}_n{num_samples}"
        check_output_dir(out, "--out")
        fit_data = (info.get("fit_config") or {}).get("data")
        # Rank 0 checks the reference before hours of sampling; the statistics are computed (or read from the cache)
        # after sampling. The other ranks learn about a bad reference through the broadcast instead of hanging.
        source, problem = None, None
        if rank == 0:
            try:
                source = reference_source(args, var.vqvae.resolution, fit_data, default_limit=num_samples)
            except (FileNotFoundError, ValueError) as error:
                problem = str(error)
        if world > 1:
            shared = [problem]
            dist.broadcast_object_list(shared, src=0)
            problem = shared[0]
        if problem:
            raise ValueError(problem)

        def build_reference(resolution: int) -> ReferenceStats:
            return reference_statistics(source, extractor, cache_dir=args.cache_dir, use_cache=not args.no_cache)

        options = MetricOptions(kid_subset_size=args.kid_subset_size)
        if rank == 0:
            print(
                f"var-lab eval: {num_samples} images ({var.num_classes} classes) on {world} process(es), "
                f"cfg {args.cfg}, top-k {args.top_k}, top-p {args.top_p}, metrics {','.join(metrics)} -> {out}"
            )
        result = evaluate_var(
            var,
            sampling,
            build_reference,
            extractor=extractor,
            metrics=metrics,
            device=device,
            out_dir=out,
            save_png=args.save_png,
            save_npz=args.save_npz,
            grid_classes=args.grid_classes,
            grid_per_class=args.grid_per_class,
            precision=args.precision,
            options=options,
            skipped=skipped,
        )
        if rank == 0:
            print(json.dumps({"metrics": result.metrics, "seconds": result.seconds}, indent=2))
            if not args.no_mlflow:
                _log_cli_result(args, result, sampling, info, model_params, step, var)
    except BadInputError as error:
        return report("var-lab eval", error)  # one line, exit 2, as var_lab.cli does for the other commands
    except (MissingInceptionWeightsError, InceptionScoreUnavailableError, FileNotFoundError, ValueError) as error:
        print(f"var-lab eval: {error}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as error:
        print(out_of_memory_message("eval", error), file=sys.stderr)
        return 1
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def _log_cli_result(args, result: EvalResult, sampling, info: dict, model_params: dict, step: int, var) -> None:
    from var_lab.contract import TAG_POINT, TAG_SOURCE

    uri = args.tracking_uri or info.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        print("var-lab eval: no MLflow tracking URI (pass --tracking-uri); results are in metrics.json only")
        return
    run_id = info.get("mlflow_run_id") if args.checkpoint else None
    tags = {} if run_id else {TAG_POINT: f"depth={var.depth}", TAG_SOURCE: "release" if args.release_var else ""}
    try:
        run_id = log_to_mlflow(
            result,
            sampling,
            tracking_uri=uri,
            step=step,
            run_id=run_id,
            experiment=args.experiment,
            run_name=f"eval-d{var.depth}-cfg{args.cfg:g}",
            tags=tags,
            params=model_params,
        )
    except Exception as error:  # noqa: BLE001 - the store being down must not lose the computed numbers
        print(
            f"var-lab eval: could not log to MLflow at {uri} ({type(error).__name__}: {error}); the results are kept "
            f"in {result.files.get('metrics_json')}",
            file=sys.stderr,
        )
        raise ValueError(f"MLflow logging failed; results kept in {result.files.get('metrics_json')}") from error
    print(f"var-lab eval: logged eval/* at step {step} to MLflow run {run_id} ({uri})")


def reference_stats_main(argv: list[str]) -> int:
    """``var-lab reference-stats``: compute and cache reference statistics once (optionally export an .npz)."""
    parser = ArgumentParser(
        prog="var-lab reference-stats",
        description="Compute FID reference statistics (mean, covariance, features) once and cache them.",
    )
    add_reference_args(parser)
    parser.add_argument("--weights", help="FID Inception weights (default: $TORCH_HOME/hub/checkpoints/...)")
    parser.add_argument("--batch-size", type=int, default=200, help="images per Inception forward pass")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--export-npz", help="also write mu/sigma (and the features) to this .npz")
    args = parser.parse_args(argv)
    from var_lab.metrics.fid_weights import MissingInceptionWeightsError

    try:
        source: ImageSource = reference_source(args, args.reference_resolution)
        extractor = InceptionFeatures(args.weights, device=args.device, batch_size=args.batch_size)
        ref = reference_statistics(source, extractor, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    except (MissingInceptionWeightsError, FileNotFoundError, ValueError) as error:
        print(f"var-lab reference-stats: {error}", file=sys.stderr)
        return 1
    if args.export_npz:
        arrays = {"mu": ref.mu, "sigma": ref.sigma}
        if ref.features is not None:
            arrays["features"] = ref.features.numpy()
        np.savez(args.export_npz, **arrays)
    summary = {
        "reference": ref.description,
        "num_images": ref.num_images,
        "cache_file": ref.key.get("cache_file") if not args.no_cache else None,
        "export_npz": args.export_npz,
        "weights_sha256": ref.key["extractor"]["weights_sha256"],
    }
    print(json.dumps(summary, indent=2))
    return 0
