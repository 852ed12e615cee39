"""``mammo-node synth | train | prepare | evaluate | calibrate | model-info``
(registered by node.cli)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from inference.datasets import FORMATS  # torch-free: the readers only

if TYPE_CHECKING:
    from node.config import Config


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 512x256, got {text!r}") from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise argparse.ArgumentTypeError(
            f"image size must be positive multiples of 32, got {text!r}"
        )
    return h, w


def _clean_errors(
    name: str, fn: Callable[[argparse.Namespace], int]
) -> Callable[[argparse.Namespace], int]:
    """Run a command; a user error (missing file, bad value, checkpoint mismatch, no CUDA)
    is one line on stderr and exit status 2, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (OSError, ValueError) as exc:  # CheckpointError, PreprocessError are ValueErrors
            print(f"mammo-node {name}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"mammo-node {name}: interrupted", file=sys.stderr)
            return 130

    return run


def cmd_synth(args: argparse.Namespace) -> int:
    from inference.synthetic_dataset import write_synthetic_dataset

    rows, cols = args.size
    csv_path = write_synthetic_dataset(
        args.out,
        args.exams,
        seed=args.seed,
        rows=rows,
        cols=cols,
        progress=not args.quiet,
        artifacts=args.artifacts,
        density_phantoms=args.density_phantoms,
        film=args.film,
    )
    print(f"wrote {args.exams} synthetic exams to {args.out} ({csv_path.name})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from inference.distributed import launch, launched_by_torchrun

    if args.nproc and args.nproc > 1 and not launched_by_torchrun():
        return launch(args.nproc, _without_nproc(sys.argv[1:]))
    from inference.train import TrainArgs, train

    rank = int(os.environ.get("RANK", "0"))
    # Only rank 0 logs (and prints); the other ranks say only what goes wrong.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    intended = args.intended_use
    if args.synthetic_demo:
        from inference.checkpoint import NOT_CLINICAL

        intended = NOT_CLINICAL
    res = train(
        TrainArgs(
            data=args.data,
            out=args.out,
            fmt=args.format,
            task=args.task,
            arch=args.arch,
            weights=args.weights,
            diagnosis=not args.no_diagnosis,
            density=args.density,
            epochs=args.epochs,
            image_size=args.image_size,
            batch_size=args.batch_size,
            lr=args.lr,
            device=args.device,
            seed=args.seed,
            workers=args.workers,
            resume=args.resume,
            birads_weight=args.birads_weight,
            diagnosis_weight=args.diagnosis_weight,
            training_data=args.training_data,
            intended_use=intended,
            progress=not args.quiet,
            stop_after_epoch=args.stop_after_epoch,
            val_fraction=args.val_fraction,
            specificity=args.specificity,
            cache_dir=args.cache_dir,
            prefetch=args.prefetch,
            dropout=args.dropout,
            accumulate=args.accumulate,
            clip_grad=args.clip_grad,
            warmup_epochs=args.warmup_epochs,
            precision=args.precision,
            patience=args.patience,
        )
    )
    if res["rank"] == 0:
        print(f"checkpoint written: {res['checkpoint']}")
        if res["best"]:
            print(f"best by validation (epoch {res['best_epoch']}): {res['best']}")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--nproc":
            skip = True
        elif not x.startswith("--nproc="):
            out.append(x)
    return out


def cmd_prepare(args: argparse.Namespace) -> int:
    from inference.datasets.cache import prepare_cache

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    res = prepare_cache(
        args.data,
        args.format,
        args.image_size,
        cache_dir=args.cache_dir,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(
        f"cache {res['cache_dir']}: {res['built']} view(s) built, {res['cached']} already "
        f"there, {res['failed']} unreadable, {res['views']} in all "
        f"({res['seconds']:.1f} s, {res['workers']} process(es))"
    )
    return 0 if res["failed"] < res["views"] or not res["views"] else 2


def cmd_evaluate(args: argparse.Namespace) -> int:
    from inference.train import evaluate, format_table

    res = evaluate(
        args.data,
        args.checkpoint,
        fmt=args.format,
        split=args.split,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not (args.json or args.quiet),
        operating_point=args.operating_point,
        bootstrap=args.bootstrap,
        plots=args.plots,
        cache_dir=args.cache_dir,
    )
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(format_table(res, f"split {args.split} of {args.data}"))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from inference.train import calibrate

    op = calibrate(
        args.data,
        args.checkpoint,
        args.out,
        fmt=args.format,
        split=args.split,
        specificity=args.specificity,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.quiet,
        cache_dir=args.cache_dir,
        workers=args.workers,
    )
    print(
        f"operating point: exam score {op['score']:g} (specificity {op['specificity']:.3f}, "
        f"sensitivity {op['sensitivity']:.3f} on {op['n']} exams); written to {args.out}"
    )
    return 0


def cmd_model_info(
    args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Config]
) -> int:
    from inference.checkpoint import DEMO_CHECKPOINT, CheckpointError, read_info

    ckpt = args.checkpoint or load_config(args).inference.checkpoint or DEMO_CHECKPOINT
    try:
        info = read_info(ckpt)
    except CheckpointError as exc:
        print(f"mammo-node: {exc}", file=sys.stderr)
        return 2
    d = info.as_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    meta = d["metadata"]
    print(f"checkpoint : {d['path']}")
    print(f"sha256     : {d['sha256']}")
    print(f"task       : {meta.get('task')}  classes {meta.get('birads_classes')}")
    print(f"diagnosis  : {meta.get('diagnosis_classes') or 'no'}")
    print(f"input size : {meta.get('input_size')}")
    print(f"trained on : {meta.get('training_data')}")
    print(f"use        : {meta.get('intended_use')}")
    print(f"version    : {meta.get('version')}  created {meta.get('created')}")
    print("config     : " + json.dumps(meta.get("model_config"), sort_keys=True))
    for k in sorted(
        set(meta)
        - {
            "task",
            "birads_classes",
            "diagnosis_classes",
            "input_size",
            "training_data",
            "intended_use",
            "version",
            "created",
            "model_config",
            "format",
            "format_version",
        }
    ):
        print(f"{k:<11}: {meta[k]}")
    return 0


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_config: Callable[[argparse.ArgumentParser], None],
    load_config: Callable[[argparse.Namespace], Config],
) -> None:
    from inference.tasks import ARCHS, BIRADS_TASKS

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser(
        "synth",
        help="write synthetic phantom exams (VinDr layout)",
        formatter_class=fmt,
        description="Synthetic phantom exams in the VinDr-Mammo layout, with "
        "BI-RADS and diagnosis labels tied to synthetic lesions.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--exams", type=int, required=True, help="number of exams")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")
    p.add_argument(
        "--size", type=_size, default=(1024, 832), metavar="HxW", help="image size in pixels"
    )
    p.add_argument(
        "--density-phantoms",
        action="store_true",
        help="the phantoms' fibroglandular share follows their density label A-D "
        "(the bundled demo checkpoint was trained without)",
    )
    p.add_argument(
        "--artifacts",
        type=float,
        default=0.0,
        metavar="P",
        help="share of images with burned-in labels, markers, rulers, film edges "
        "or collimator shadows (0-1)",
    )
    p.add_argument(
        "--film",
        action="store_true",
        help="digitised screen film: grain, film edges, scanner borders, a label, a "
        "large dark background, no window, 4,400-4,700 x 2,600-2,900 (each "
        "image its own size; --size and --artifacts do not apply), 12/16 bits",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_clean_errors("synth", cmd_synth))

    p = sub.add_parser(
        "train",
        help="train a model on a data folder",
        formatter_class=fmt,
        description="Train the hybrid CNN-VSSM (or a baseline) on a data set "
        "and write a checked safetensors checkpoint.",
    )
    p.add_argument(
        "--data",
        required=True,
        help="data folder (VinDr layout) or CSV file / folder with labels.csv",
    )
    p.add_argument("--format", choices=FORMATS, default="vindr", help="data layout")
    p.add_argument(
        "--task", choices=list(BIRADS_TASKS), default="birads-5class", help="BI-RADS task"
    )
    p.add_argument(
        "--arch",
        choices=list(ARCHS),
        default="hybrid",
        help="encoder: CNN + VSS stages, CNN only, or VSS only",
    )
    p.add_argument(
        "--weights",
        choices=["shared", "separate"],
        default="shared",
        help="one encoder for all views or one per view type",
    )
    p.add_argument("--no-diagnosis", action="store_true", help="single-task: BI-RADS only")
    p.add_argument(
        "--density",
        choices=["auto", "on", "off"],
        default="auto",
        help="a BI-RADS density (A-D) head; auto: when the data has density labels",
    )
    p.add_argument("--birads-weight", type=float, default=1.0, help="BI-RADS loss weight")
    p.add_argument("--diagnosis-weight", type=float, default=1.0, help="diagnosis loss weight")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument(
        "--image-size",
        type=_size,
        default=(512, 256),
        metavar="HxW",
        help="model input size per view (e.g. 1024x512)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="exams per batch")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="seed (runs are deterministic)")
    p.add_argument(
        "--workers",
        type=int,
        default=-1,
        help="DataLoader workers per process (-1: the cores per process less one)",
    )
    p.add_argument(
        "--prefetch", type=int, default=2, help="batches each DataLoader worker loads ahead"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="preprocessing cache (default: DATA/.mammo-cache; mammo-node prepare builds it ahead)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel on this machine: N processes under torchrun "
        "(--standalone); under torchrun itself this is not needed",
    )
    p.add_argument(
        "--accumulate",
        type=int,
        default=1,
        metavar="K",
        help="micro-batches per optimizer step (gradient accumulation)",
    )
    p.add_argument("--clip-grad", type=float, default=5.0, help="gradient norm clipping (0: off)")
    p.add_argument(
        "--warmup-epochs",
        type=float,
        default=1.0,
        help="linear warmup before the cosine decay, in epochs",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="autocast: auto = bf16 on a CUDA device with it, else fp16 with a "
        "GradScaler; fp32 on CPU unless bf16 is asked",
    )
    p.add_argument("--dropout", type=float, default=0.1, help="dropout before the heads")
    p.add_argument(
        "--patience",
        type=int,
        default=0,
        help="early stopping: epochs without a better validation score (0: off)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT.resume.pt")
    p.add_argument(
        "--stop-after-epoch",
        type=int,
        metavar="N",
        help="stop after epoch N (a time-boxed run); --resume continues it",
    )
    p.add_argument(
        "--training-data",
        help="description stored in the checkpoint (default: the data folder and format)",
    )
    p.add_argument(
        "--intended-use", default="research", help="intended use stored in the checkpoint"
    )
    p.add_argument(
        "--synthetic-demo",
        action="store_true",
        help="mark the checkpoint as trained on synthetic data, not for clinical use",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of the training exams held out for validation (each "
        "epoch, the best checkpoint) and the operating point",
    )
    p.add_argument(
        "--specificity",
        type=float,
        default=0.9,
        help="specificity of the operating point on the held-out exams",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_clean_errors("train", cmd_train))

    p = sub.add_parser(
        "prepare",
        help="build the preprocessing cache of a data set",
        formatter_class=fmt,
        description="Decode, segment and resize every view of a data set into "
        "the cache training reads (float16 .npy keyed by file, "
        "size and preprocessing version), in parallel processes; "
        "resumable: views already cached are skipped.",
    )
    p.add_argument("--data", required=True, help="data folder or CSV")
    p.add_argument("--format", choices=FORMATS, default="vindr", help="data layout")
    p.add_argument(
        "--image-size",
        type=_size,
        default=(512, 256),
        metavar="HxW",
        help="model input size per view (train's --image-size)",
    )
    p.add_argument("--cache-dir", default=None, help="default: DATA/.mammo-cache")
    p.add_argument("--workers", type=int, default=-1, help="processes (-1: one per CPU core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_clean_errors("prepare", cmd_prepare))

    p = sub.add_parser(
        "evaluate",
        help="metrics of a checkpoint on a data folder",
        formatter_class=fmt,
        description="AUC, macro F1, accuracy and n per task, in the paper's "
        "table form (or JSON keyed by task name).",
    )
    p.add_argument(
        "--data",
        required=True,
        help="data folder (VinDr layout) or CSV file / folder with labels.csv",
    )
    p.add_argument("--format", choices=FORMATS, default="vindr", help="data layout")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the bundled demo)")
    p.add_argument("--split", default="test", help="split to evaluate: test, training, all")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--batch-size", type=int, default=4, help="exams per batch")
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="preprocessing cache, as train's (default: DATA/.mammo-cache)",
    )
    p.add_argument(
        "--operating-point",
        type=float,
        default=None,
        metavar="SCORE",
        help="exam score 0-100 to report the confusion matrix at (default: the checkpoint's)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples for the AUC's 95 %% confidence interval",
    )
    p.add_argument(
        "--plots", metavar="DIR", default=None, help="write roc.png and calibration.png into DIR"
    )
    p.add_argument("--json", action="store_true", help="print JSON keyed by task name")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_clean_errors("evaluate", cmd_evaluate))

    p = sub.add_parser(
        "calibrate",
        help="choose a checkpoint's operating point on data",
        formatter_class=fmt,
        description="The exam score threshold at a specificity, chosen on a "
        "data split the model was not trained on, written into a "
        "copy of the checkpoint (weights unchanged).",
    )
    p.add_argument("--data", required=True, help="data folder or CSV")
    p.add_argument("--format", choices=FORMATS, default="vindr", help="data layout")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the bundled demo)")
    p.add_argument("--split", default="training", help="split to choose it on")
    p.add_argument("--specificity", type=float, default=0.9, help="target specificity")
    p.add_argument("--out", required=True, help="checkpoint to write (may be the same file)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--batch-size", type=int, default=4, help="exams per batch")
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="preprocessing cache, as train's (default: DATA/.mammo-cache)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_clean_errors("calibrate", cmd_calibrate))

    p = sub.add_parser(
        "model-info", help="config, tasks, metadata and SHA-256 of the active checkpoint"
    )
    add_config(p)
    p.add_argument(
        "--checkpoint",
        default=None,
        help="default: [inference] checkpoint of the config, else the demo",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_clean_errors("model-info", lambda a: cmd_model_info(a, load_config)))
