"""The ``medseg`` command: each subcommand parses its arguments and calls one API function."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

from medseg.cli_parser import build_parser
from medseg.errors import ConfigError, find_medseg_error

__all__ = ["main", "CRASHED"]

CRASHED = 3  # exit code of an unexpected error, apart from 1 (some cases failed) and 2 (bad input)


def _fmt(value: float) -> str:
    return "  n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _print_scores(result: dict) -> None:
    """The per-class means of an evaluation, and what was missing or could not be scored."""
    summary = result["summary"]
    metrics = (("Dice", "dice", 3), ("IoU", "iou", 3), ("HD95 mm", "hd95", 2), ("ASSD mm", "assd", 2))
    metrics += (("surface Dice", "nsd", 3),)
    width = max([len("class"), *(len(n) for n in summary["classes"])])
    print("  ".join([f"{'class':<{width}}", *(f"{title:>15}" for title, _, _ in metrics)]))
    for name, stats in summary["classes"].items():
        cells = [_mean_std(stats[key], digits) for _, key, digits in metrics]
        print("  ".join([f"{name:<{width}}", *(f"{c:>15}" for c in cells)]))
    failures = {
        name: stats["worst_case"] for name, stats in summary["classes"].items() if stats["worst_case"]
    }
    print(f"mean foreground Dice: {_fmt(result['mean_foreground'])} over {summary['cases_scored']} cases")
    if failures:
        counts = ", ".join(f"{name} {n}" for name, n in failures.items())
        print(f"scored as failures (Dice 0, worst-case distance): {counts}")
    print(f"policy: {summary['empty_mask_policy']}")
    if result["missing_predictions"]:
        print(f"no prediction (scored 0): {', '.join(result['missing_predictions'])}")
    not_scored = set(summary["cases_not_scored"])
    for case, reason in result["errors"].items():
        what = "not scored" if case in not_scored else "scored 0"
        print(f"{what}: {case}: {reason}", file=sys.stderr)
    if result.get("no_reference"):
        print(f"no reference (not scored): {', '.join(result['no_reference'])}")


def _mean_std(stats: dict, digits: int) -> str:
    if stats["mean"] is None or math.isnan(stats["mean"]):
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def cmd_demo(args) -> int:
    from medseg.demo import run_demo

    start = time.monotonic()
    epochs = {"epochs": args.epochs} if args.epochs else {}
    result = run_demo(args.output, overrides=args.set, **epochs)
    _print_scores(result)
    print(f"demo finished in {time.monotonic() - start:.0f} s; results in {args.output}")
    print(f"QC report: {result['report']}")
    return 0


def cmd_train(args) -> int:
    from medseg.training.trainer import Trainer

    trainer = _trainer(Trainer, args)
    summary = trainer.fit()
    if not trainer.dist.is_main:
        return 0  # under torchrun, rank 0 speaks for all
    print(
        f"trained {summary['epochs']} epochs ({summary['steps']} steps) in {summary['seconds']:.0f} s; "
        f"best validation Dice {_fmt(summary['best_dice'])}; checkpoint {summary['best']}"
    )
    return 0


def cmd_pretrain(args) -> int:
    from medseg.training.pretrain import Pretrainer

    trainer = _trainer(Pretrainer, args)
    summary = trainer.fit()
    if trainer.dist.is_main:
        run = Path(summary["last"]).parent
        print(
            f"pretrained {summary['epochs']} epochs ({summary['steps']} steps) "
            f"in {summary['seconds']:.0f} s; checkpoint {summary['last']}, pictures in "
            f"{run / 'denoising.png'}; fine-tune with: medseg train --init {summary['last']} ..."
        )
    return 0


def _flag_settings(args) -> list[str]:
    """The config settings that a run's flags stand for (``--max-time 60`` is
    ``--set train.max_time=60``), after the ``--set`` ones so that the flags win."""
    flags = {
        "device": "train.device",
        "max_time": "train.max_time",
        "epochs": "train.epochs",
        "seed": "train.seed",
    }
    chosen = [
        f"{key}={getattr(args, name)}" for name, key in flags.items() if getattr(args, name, None) is not None
    ]
    return [*args.set, *chosen]


_threads_before: list[int] = []  # torch's thread count before --threads, restored when main() ends


def _set_threads(threads: int | None) -> None:
    """``--threads``: the CPU threads torch computes with (default: torch's, one per core)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError("--threads", f"must be 1 or more, not {threads}")
        import torch

        _threads_before.append(torch.get_num_threads())
        torch.set_num_threads(threads)


def _let_openmp_threads_sleep() -> None:
    """Before running an exported network: let torch's OpenMP threads sleep while they wait.

    Its network runs in OpenVINO's own threads, between torch's small operations (cutting
    windows, blending them, resampling). libgomp's threads spin after each of those, by default,
    and take the cores from OpenVINO: on 32 left-atrium volumes the whole process took 0.88x the
    time with them asleep (docs/performance.md); torch's own network went slower (so not for
    checkpoints). libgomp reads this once, when torch loads it: call before importing torch. A
    value the user set is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _trainer(kind, args):
    """A Trainer (or Pretrainer) from the command line: a new run, or ``--resume``."""
    from medseg.config import load_config

    _set_threads(args.threads)
    args.set = _flag_settings(args)
    if args.resume:
        if (
            args.data
            or args.output
            or args.config
            or args.modality
            or getattr(args, "fold", None) is not None
            or any(getattr(args, name, None) for name in ("init", "unlabeled", "pseudo_labels_from"))
        ):
            raise ConfigError("--resume", "continues a run with its own data and config; give only --set")
        return kind.resume(args.resume, args.set)
    if not (args.data and args.output):
        raise ConfigError(args.command, "needs --data and --output (or --resume RUN_DIR)")
    config = load_config(args.config, args.set)
    config.data.root, config.train.output_dir = str(args.data), str(args.output)
    config.data.modality = args.modality or config.data.modality
    if getattr(args, "init", None):
        config.train.init, config.train.init_parts = str(args.init), args.init_parts
    if getattr(args, "unlabeled", None):
        config.train.unlabeled = str(args.unlabeled)
    if getattr(args, "pseudo_labels_from", None):
        config.train.pseudo_labels = str(args.pseudo_labels_from)
    if getattr(args, "fold", None) is not None:
        config.data.fold, config.data.folds = args.fold, args.folds
        config.train.output_dir = str(Path(args.output) / f"fold_{args.fold}")
        # every fold takes its folds from one file, so adding a case moves no other between folds
        config.data.splits = config.data.splits or str(Path(args.output) / "splits.json")
    return kind(config, overwrite=args.overwrite)


def cmd_plan(args) -> int:
    from medseg.atomic import refuse_existing
    from medseg.config import load_config
    from medseg.data.datasets import find_cases
    from medseg.data.plan import plan_for_config
    from medseg.device import autocast_dtype, precision_name, resolve_device

    config = load_config(args.config, _flag_settings(args))
    config.data.modality = args.modality or config.data.modality
    plan = plan_for_config(config, find_cases(args.data))
    device = resolve_device(config.train.device)
    precision = precision_name(autocast_dtype(device, config.train.precision))
    print(f"planned for training on {device.type} in {precision} (--device chooses)")
    print(plan.describe())
    if args.out:
        refuse_existing(args.out, overwrite=args.overwrite)
        plan.save(args.out)
        print(f"wrote {args.out}; train with it: --set data.plan={args.out}")
    return 0


def cmd_predict(args) -> int:
    from medseg.files import is_exported

    if any(is_exported(m) for m in args.model):
        _let_openmp_threads_sleep()
    from medseg.inference.cases import parse_shard
    from medseg.inference.dicomweb import is_dicomweb, predict_dicomweb
    from medseg.inference.predictor import Predictor

    if is_dicomweb(args.input):
        _refuse_for_dicomweb(args)
    else:
        network_only = {"--study": args.study, "--series": args.series, "--query": args.query}
        given = [option for option, value in {**network_only, "--store-to": args.store_to}.items() if value]
        if given:
            raise ConfigError(given[0], "goes with -i dicomweb://HOST:PORT/PATH")
    shard = parse_shard(args.shard) if args.shard else None
    _set_threads(args.threads)
    predictor = Predictor(
        args.model,
        device=_device_for_this_process(args.device),
        tta=args.tta,
        tta_mirrors=args.tta_mirrors,
        keep_largest=_keep_largest(args.keep_largest),
        which=args.checkpoint,
        folds=args.fold,
        overlap=args.overlap,
        precision=args.precision,
        runtime=args.runtime,
    )
    if not args.quiet and (predictor.passes > 1):
        print(
            f"{len(predictor.members)} model(s) x {predictor.passes // len(predictor.members)} mirror(s): "
            f"{predictor.passes} passes per case",
            file=sys.stderr,
        )
    progress = _CaseProgress(quiet=args.quiet)
    try:
        if is_dicomweb(args.input):
            result = predict_dicomweb(
                predictor,
                args.input,
                args.output,
                study=args.study,
                series=args.series,
                query=args.query,
                store_to=args.store_to,
                overwrite=args.overwrite,
                statistics=args.statistics,
                preview=args.preview,
                on_case=progress,
            )
        else:
            result = _predict_files(predictor, args, shard, progress)
    finally:
        progress.close()
    report = f", report in {result.report}" if result.report else ""  # none: nothing was new
    print(
        f"{len(result.written)} written, {len(result.skipped)} skipped, {len(result.failed)} failed; "
        f"masks in {args.output}{report}"
    )
    if result.failed:
        if len(result.records) > 1:  # the errors scrolled by among the other cases: list them again
            print(f"{len(result.failed)} case(s) failed:", file=sys.stderr)
            for source, reason in result.failed.items():
                print(f"  {source}: {reason}", file=sys.stderr)
        return 1
    return 0


def _refuse_for_dicomweb(args) -> None:
    """The options a DICOMweb source cannot honour, refused rather than ignored."""
    if args.format not in ("same", "dicom-seg"):
        raise ConfigError("--format", "a DICOMweb source gets DICOM-SEGs, stored back; leave --format out")
    for given, option in (
        (args.shard, "--shard"),
        (args.save_probabilities, "--save-probabilities"),
        (args.uncertainty, "--uncertainty"),
    ):
        if given:
            raise ConfigError(option, "is for files and folders; a DICOMweb source does not take it")


def _predict_files(predictor, args, shard, progress):
    from medseg.inference.batch import predict_many

    return predict_many(
        predictor,
        args.input,
        args.output,
        overwrite=args.overwrite,
        fmt=args.format,
        shard=shard,
        statistics=args.statistics,
        preview=args.preview,
        probabilities=args.save_probabilities,
        uncertainty=args.uncertainty,
        on_case=progress,
    )


def _keep_largest(text: str | None):
    """``--keep-largest``: ``all``, ``none``, ``auto`` or label indices like ``1,3`` (None: the model's)."""
    if text is None or text in ("all", "none", "auto"):
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            "--keep-largest", f"{text!r} is not all, none, auto or label numbers like 1,3"
        ) from None


def _device_for_this_process(device: str) -> str:
    """Under torchrun on GPUs, ``auto`` means this process's own GPU (``LOCAL_RANK``)."""
    import os

    if device == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device


class _CaseProgress:
    """A progress bar on a terminal; plain lines otherwise (cron logs); nothing but errors and
    warnings with ``quiet``."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.bar = quiet, None
        self.interactive = sys.stderr.isatty() and not quiet

    def __call__(self, record: dict, number: int, total: int) -> None:
        from tqdm.auto import tqdm

        if self.interactive and self.bar is None:
            self.bar = tqdm(total=total, desc="predict", unit="case")
        say = self.bar.write if self.bar else print
        if record["status"] == "failed":
            say(f"error: {record['input']}: {record['reason']}", file=sys.stderr)
        elif record["status"] == "written" and record.get("reason"):
            say(f"warning: {record['input']}: {record['reason']}", file=sys.stderr)
        if self.bar:
            self.bar.update()
        elif not self.quiet:
            seconds = f" in {record['seconds']:.1f} s" if record.get("seconds") is not None else ""
            print(
                f"[{number}/{total}] {record['status']}: {record['output'] or record['input']}{seconds}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def cmd_export(args) -> int:
    if args.int8:  # its Dice guard predicts with two exported networks, both in OpenVINO
        _let_openmp_threads_sleep()
    from medseg.inference.export import export_model

    _set_threads(args.threads)
    written = export_model(
        args.model,
        args.output,
        which=args.checkpoint,
        overwrite=args.overwrite,
        int8=args.int8,
        calibrate=args.calibrate,
        validate=args.validate,
        max_dice_drop=args.max_dice_drop,
    )
    guard = json.loads(written.read_text(encoding="utf-8")).get("int8")
    if guard:
        print(
            f"int8: mean Dice {guard['dice_int8']:.4f} against fp32's {guard['dice_fp32']:.4f} "
            f"on {guard['validation']['cases']} validation case(s)"
        )
    print(f"wrote {written.parent}: predict with medseg predict -m {written.parent} (runs on the CPU)")
    return 0


def cmd_listen(args) -> int:
    import signal

    from medseg.files import is_exported

    if is_exported(args.model):
        _let_openmp_threads_sleep()

    from medseg.inference.listener import Listener, Tls, parse_destination
    from medseg.inference.predictor import Predictor

    destination = parse_destination(args.send_to)  # a bad address is refused before the model loads
    tls = Tls(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca, send=args.send_tls)
    _set_threads(args.threads)
    predictor = Predictor(
        args.model,
        device=args.device,
        tta=args.tta,
        tta_mirrors=args.tta_mirrors,
        keep_largest=_keep_largest(args.keep_largest),
        runtime=args.runtime,
    )
    listener = Listener(
        predictor,
        args.output,
        destination,
        ae_title=args.ae_title,
        host=args.host,
        port=args.port,
        allowed=args.allow_ae,
        quiet_period=args.quiet_period,
        tls=tls,
    )

    def stop(signum, frame):  # a service manager's stop: leave as cleanly as Ctrl-C does
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    listener.serve_forever()
    return 0


def cmd_evaluate(args) -> int:
    from medseg.evaluation.folders import evaluate

    out = Path(args.out) if args.out else Path(args.pred)
    with _Counter("evaluate", args.quiet) as counter:
        result = evaluate(
            args.pred,
            args.ref,
            out=out,
            labels=_label_map(args.labels),
            tolerance=_tolerance(args.tolerance),
            overwrite=args.overwrite,
            on_case=counter,
        )
    _print_scores(result)
    print(f"wrote {out / 'metrics.csv'} and {out / 'summary.json'}")
    return 1 if result["errors"] or result["missing_predictions"] else 0


def cmd_report(args) -> int:
    from medseg.evaluation.report import qc_report

    with _Counter("report", args.quiet) as counter:
        result = qc_report(
            args.pred,
            args.out,
            images=args.images,
            ref_dir=args.ref,
            labels=_label_map(args.labels),
            tolerance=_tolerance(args.tolerance),
            overwrite=args.overwrite,
            on_case=counter,
        )
    evaluation = result.get("evaluation")
    if evaluation:
        _print_scores(evaluation)
    print(f"QC report: {result['index']}")
    problems = evaluation and (evaluation["errors"] or evaluation["missing_predictions"])
    return 1 if problems or result["problems"] else 0


def _label_map(path: str | None) -> dict[int, str] | None:
    from medseg.data.datasets import read_label_map

    return read_label_map(path) if path else None


def _tolerance(values: list[str]) -> float | dict:
    """``--tolerance 2`` (every class), ``--tolerance RV=3`` (one class), or both."""
    from medseg.evaluation.metrics import DEFAULT_TOLERANCE_MM

    found: dict[str, float] = {}
    for text in values or []:
        name, _, number = text.rpartition("=")
        try:
            found[name or "*"] = float(number)
        except ValueError:
            raise ConfigError("--tolerance", f"{text!r} is not MM or CLASS=MM") from None
        if found[name or "*"] < 0:
            raise ConfigError("--tolerance", f"{text!r}: a tolerance is a distance, 0 or more")
    if set(found) <= {"*"}:
        return found.get("*", DEFAULT_TOLERANCE_MM)
    return found


class _Counter:
    """Cases done, on a terminal; nothing otherwise (the summary follows)."""

    def __init__(self, what: str, quiet: bool):
        self.what, self.bar = what, None
        self.interactive = sys.stderr.isatty() and not quiet

    def __enter__(self):
        return self

    def __call__(self, case: str, status: str) -> None:
        from tqdm.auto import tqdm

        if self.interactive and self.bar is None:
            self.bar = tqdm(desc=self.what, unit="case")
        if self.bar:
            self.bar.update()

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.close()


COMMANDS = {
    "demo": cmd_demo,
    "train": cmd_train,
    "pretrain": cmd_pretrain,
    "plan": cmd_plan,
    "predict": cmd_predict,
    "export": cmd_export,
    "listen": cmd_listen,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
}


class _LogLines(logging.Handler):
    """The library's log as lines around the progress bars: information (epoch lines) on
    stdout, ``warning: ...`` and ``error: ...`` on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        if record.levelno >= logging.WARNING:
            tqdm.write(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)
        else:
            tqdm.write(record.getMessage(), file=sys.stdout)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The library's log is shown while the command runs, and only then: a program that calls
    # main() keeps its own logging as it was.
    logger, lines = logging.getLogger("medseg"), _LogLines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(lines)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        known = find_medseg_error(exc)
        if known is None:  # a bug, not bad input: the traceback is for its report
            traceback.print_exc()
            print(f"medseg crashed: {type(exc).__name__}: {exc} (a bug; please report it)", file=sys.stderr)
            return CRASHED
        print(f"error: {known}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
        logger.removeHandler(lines)
        logger.setLevel(level)
        if _threads_before:  # a program that calls main() keeps its own thread count too
            import torch

            torch.set_num_threads(_threads_before[0])
            _threads_before.clear()


def _leave_process_group() -> None:
    """Under torchrun, leave the process group before the interpreter exits: left to exit,
    gloo's threads were once torn down running, and a rank died of SIGABRT ("terminate called
    without an active exception") after its run had finished."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
