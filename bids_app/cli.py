"""Command line of the BIDS App: ``run.py bids_dir output_dir {participant,group} [options]``.

Parsing validates what can be validated before any work (paths, labels, exit codes). This is the
only place that turns a ``CountersegError`` into a message and an exit code; a crash gets exit 1
and a crash log under ``<output_dir>/logs/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bids_app import __version__
from bids_app.errors import (
    CannotCreateError,
    CountersegError,
    ExitCode,
    RunInterrupted,
    UnknownLevelError,
    UsageError,
)
from bids_app.settings import ANALYSIS_LEVELS, PRESETS, RunSettings, build_settings, load_config_file
from bids_app.settings import merge_overrides, settings_to_dict
from bids_app.settings.fields import field_at, help_text, set_path
from bids_app.settings.legacy import migrate

log = logging.getLogger("bids_app.cli")


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on errors; BIDS Apps use 64 (usage error)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _flag(group: Any, *names: str, **kwargs: Any) -> None:
    """Add an option under both its ``-`` and ``_`` spellings (``--work-dir`` and ``--work_dir``).
    A list option given twice keeps both lists (``--participant-label 01 --participant-label 02``),
    never only the last."""
    if kwargs.get("nargs") in ("+", "*") and "action" not in kwargs:
        kwargs["action"] = "extend"
    strings: list[str] = []
    for name in names:
        strings.append(name)
        if name.startswith("--") and "-" in name[2:]:
            strings.append("--" + name[2:].replace("-", "_"))
    group.add_argument(*dict.fromkeys(strings), **kwargs)


#: Flags that set one declared setting: (flag, settings path, argparse options). Help, default and
#: choices come from the setting's declaration (``bids_app.settings``).
SETTING_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--strength", "segmentation.counterfactual.strengths", {"nargs": "+", "type": float, "metavar": "S"}),
    ("--n-samples", "segmentation.counterfactual.n_samples", {"type": int, "metavar": "K"}),
    ("--adapter-scale", "segmentation.counterfactual.adapter_scale", {"type": float, "metavar": "W"}),
    ("--polarity", "segmentation.residual.polarity", {}),
    ("--threshold", "segmentation.lesions.threshold", {"type": float, "metavar": "T"}),
    ("--grow-quantile", "segmentation.lesions.grow_quantile", {"type": float, "metavar": "Q"}),
    ("--inference-batch-size", "compute.inference_batch_size", {"type": int, "metavar": "N"}),
    ("--precision", "compute.precision", {}),
)


def _setting_flag(group: Any, flag: str, path: str, **extra: Any) -> None:
    """A flag for a declared setting: its help (with the default) and choices from the declaration."""
    declaration = field_at(RunSettings, path)
    choices = declaration.metadata.get("choices")
    _flag(group, flag, help=help_text(declaration), **({"choices": choices} if choices else {}), **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="counterseg",
        description=(
            "counterseg: spinal-cord lesion segmentation by counterfactual latent diffusion. "
            "The group level trains on the healthy participants of a BIDS dataset; the participant "
            "level writes a counterfactual, an anomaly map and a lesion mask per image."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("bids_dir", nargs="?", help="the root of the input BIDS dataset")
    parser.add_argument("output_dir", nargs="?", help="where the derivative dataset is written")
    parser.add_argument(
        "analysis_level", nargs="?", help=f"processing stage: one of {', '.join(ANALYSIS_LEVELS)}"
    )
    parser.add_argument("--version", action="version", version=f"counterseg {__version__}")

    sel = parser.add_argument_group("selecting the input")
    _flag(sel, "--participant-label", nargs="+", metavar="LABEL",
          help="participants to process (with or without 'sub-'); @FILE reads one label per line")
    _flag(sel, "--session-label", nargs="+", metavar="LABEL", help="sessions to process (with or without 'ses-')")
    _flag(sel, "--contrast", nargs="+", metavar="SUFFIX", help="image suffixes to process (default: T2w)")
    _flag(sel, "--bids-filter-file", metavar="FILE", type=Path,
          help='JSON filter {"image": {entity: value}}; null = entity absent, "*" = any value')
    _flag(sel, "--derivatives", nargs="+", metavar="PATH", type=Path,
          help="derivative datasets with cord/lesion masks and disc labels (default: every folder in bids_dir/derivatives)")
    _flag(sel, "--require-derivative", nargs="+", metavar="NAME",
          help="drop images lacking this derivative: 'cord', 'lesion', 'disc' or a name part such as label-SC_seg")
    _flag(sel, "--healthy-filter", metavar="COLUMN=VALUE",
          help="participants.tsv column and value marking healthy participants (default: pathology=HC)")
    _flag(sel, "--train-participants", nargs="+", metavar="LABEL",
          help="train on these participants instead of the healthy ones (group level)")
    _flag(sel, "--bids-database-dir", metavar="DIR", type=Path,
          help="pybids sqlite cache; reused when present")
    _flag(sel, "--reset-database", action="store_true", help="rebuild the pybids database")
    sel.add_argument("--skip-bids-validation", "--skip_bids_validation", "--skip_bids_validator",
                     dest="skip_bids_validation", action="store_true", help="do not run the BIDS validator")

    seg = parser.add_argument_group("segmentation (participant level; every setting: --config, see docs/usage.md)")
    for flag, path, extra in SETTING_FLAGS:
        _setting_flag(seg, flag, path, **extra)
    _flag(seg, "--no-grow", action="store_true", help="lesion masks are the voxels above the threshold only")
    _flag(seg, "--no-adapter", action="store_true", help="do not steer the denoising with the T2I-Adapter "
                                                          "(= --adapter-scale 0)")
    _flag(seg, "--strength-sweep", nargs="?", const="0.1:0.9:0.1", metavar="START:STOP:STEP",
          help="also write the counterfactual and residual at each strength of the sweep (default 0.1:0.9:0.1)")
    _flag(seg, "--overwrite", action="store_true", help="redo images whose outputs already exist")
    _flag(seg, "--allow-other-contrast", action="store_true",
          help="segment images of a contrast (suffix) the model was not trained on; its calibration does not hold")

    run = parser.add_argument_group("running")
    _flag(run, "-w", "--work-dir", metavar="DIR", type=Path, help="scratch space (default: OUTPUT_DIR/work)")
    _flag(run, "--model-dir", metavar="DIR", type=Path, help="trained models (default: OUTPUT_DIR/models)")
    _flag(run, "--config", metavar="FILE", type=Path, help="YAML or JSON file overriding any setting")
    _flag(run, "--preset", choices=PRESETS, help="model and data scale (tiny: CPU-sized, for tests and the demo)")
    _flag(run, "--device", metavar="{auto,cpu,cuda,cuda:N}", help="compute device (default: auto)")
    _flag(run, "--nprocs", "--n-cpus", type=int, metavar="N",
          help="CPUs this job may use in all (under torchrun: shared by the processes of a node)")
    _flag(run, "--omp-nthreads", type=int, metavar="N",
          help="threads per process (torch intra-op; default: --nprocs / processes per node)")
    _setting_flag(run, "--seed", "compute.seed", type=int, metavar="N")
    _flag(run, "--stages", nargs="+", metavar="STAGE",
          help="group level: stages to run: plan (data fingerprint, plan, split, cache; always runs), vqgan, diffusion, "
               "adapter, calibrate (default: all)")
    _flag(run, "--retrain", action="store_true", help="group level: retrain stages that already finished")
    _flag(run, "--stop-on-first-crash", action="store_true",
          help="participant level: stop at the first image that fails (default: segment every other image, write "
               "a crash report per failed image under OUTPUT_DIR/logs and exit with the failure's code at the end)")
    _flag(run, "--report-only", "--reports-only", action="store_true",
          help="participant level: rebuild the summary table and reports from existing outputs; no model needed")
    _flag(run, "--dry-run", action="store_true", help="print what would be processed and exit")
    _flag(run, "--demo", metavar="OUTDIR", type=Path,
          help="generate the synthetic dataset in OUTDIR/bids and run both levels (tiny preset) into OUTDIR/out")
    console = run.add_mutually_exclusive_group()
    console.add_argument("-v", "--verbose", dest="verbosity", action="count",
                         help="more log output (-v: debug)")
    console.add_argument("-q", "--quiet", action="store_true",
                         help="console: warnings and errors only, no progress bars (the log file in "
                              "OUTPUT_DIR/logs keeps everything)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """Resolve defaults < config file < command line into validated settings."""
    from bids_app.bids.layout import expand_labels, load_bids_filters

    for name in ("bids_dir", "output_dir", "analysis_level"):
        if getattr(args, name, None) is None:
            raise UsageError("the positional arguments bids_dir, output_dir and analysis_level are required")
    if args.analysis_level not in ANALYSIS_LEVELS:
        raise UnknownLevelError(
            f"unknown analysis level {args.analysis_level!r}: choose {' or '.join(ANALYSIS_LEVELS)}"
        )
    # Old keys are moved first, so that a flag overrides a setting given under its old name.
    config = migrate(load_config_file(args.config)) if "config" in args else _stored_training_settings(args)
    cli: dict[str, Any] = {
        "bids_dir": Path(args.bids_dir).absolute(),
        "output_dir": Path(args.output_dir).absolute(),
        "analysis_level": args.analysis_level,
    }
    for name in ("work_dir", "model_dir", "bids_database_dir"):
        if name in args:
            cli[name] = Path(getattr(args, name)).absolute()
    for name in ("reset_database", "skip_bids_validation", "preset", "dry_run", "report_only", "verbosity"):
        if name in args:
            cli[name] = getattr(args, name)
    selection: dict[str, Any] = {}
    if "participant_label" in args:
        selection["participant_labels"] = expand_labels(args.participant_label, "sub-")
    if "session_label" in args:
        selection["session_labels"] = expand_labels(args.session_label, "ses-")
    if "train_participants" in args:
        selection["train_participants"] = expand_labels(args.train_participants, "sub-")
    if "contrast" in args:
        selection["contrasts"] = tuple(args.contrast)
    if "bids_filter_file" in args:
        selection["bids_filters"] = load_bids_filters(args.bids_filter_file)
    if "derivatives" in args:
        selection["derivatives"] = tuple(Path(p).absolute() for p in args.derivatives)
    if "require_derivative" in args:
        selection["require_derivatives"] = tuple(args.require_derivative)
    if "healthy_filter" in args:
        column, sep, value = args.healthy_filter.partition("=")
        if not sep or not column or not value:
            raise UsageError(f"--healthy-filter {args.healthy_filter!r}: expected COLUMN=VALUE")
        selection["healthy_column"], selection["healthy_value"] = column, value
    if selection:
        cli["selection"] = selection
    training: dict[str, Any] = {}
    if "stages" in args:
        training["stages"] = tuple(args.stages)
    if "retrain" in args:
        training["retrain"] = args.retrain
    if training:
        cli["training"] = training
    for flag, path, _ in SETTING_FLAGS:
        name = flag[2:].replace("-", "_")
        if name in args:
            set_path(cli, path, getattr(args, name))
    if "grow_quantile" in args and "no_grow" in args:
        raise UsageError("--grow-quantile and --no-grow exclude each other")
    if "no_grow" in args:
        set_path(cli, "segmentation.lesions.grow_quantile", None)
    if "adapter_scale" in args and "no_adapter" in args:
        raise UsageError("--adapter-scale and --no-adapter exclude each other")
    if "no_adapter" in args:
        set_path(cli, "segmentation.counterfactual.adapter_scale", 0.0)
    if "strength_sweep" in args:
        set_path(cli, "segmentation.strength_sweep", parse_sweep(args.strength_sweep))
    if "overwrite" in args:
        cli["overwrite"] = args.overwrite
    if "allow_other_contrast" in args:
        cli["allow_other_contrast"] = args.allow_other_contrast
    if "stop_on_first_crash" in args:
        cli["stop_on_first_crash"] = args.stop_on_first_crash
    compute = {k: getattr(args, k) for k in ("device", "nprocs", "omp_nthreads", "seed") if k in args}
    if compute:
        cli["compute"] = {**cli.get("compute", {}), **compute}
    return build_settings(merge_overrides(config, cli))


def _stored_training_settings(args: argparse.Namespace) -> dict[str, Any]:
    """At the group level without ``--preset`` and ``--config``: the settings the model directory was
    trained with (so a rerun continues or checks that training, not the default preset's)."""
    if args.analysis_level != "group" or "preset" in args:
        return {}
    from bids_app.training.identity import stored_settings

    model_dir = Path(args.model_dir if "model_dir" in args else Path(args.output_dir) / "models").absolute()
    stored = stored_settings(model_dir)
    if stored is None:
        return {}
    log.info("using the settings the model in %s was trained with (preset %s); --preset or --config "
             "gives others", model_dir, stored.get("preset", "default"))
    return stored


def parse_sweep(text: str) -> tuple[float, ...]:
    """``START:STOP:STEP`` (inclusive of STOP) -> strengths."""
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise UsageError(f"--strength-sweep {text!r}: expected START:STOP:STEP, e.g. 0.1:0.9:0.1") from None
    if step <= 0 or stop < start:
        raise UsageError(f"--strength-sweep {text!r}: need STEP > 0 and STOP >= START")
    count = int(round((stop - start) / step)) + 1
    return tuple(round(start + i * step, 6) for i in range(count))


def check_paths(settings: RunSettings) -> None:
    """Refuse paths that would write into the input dataset, as fMRIPrep does at parse time."""
    bids_dir = settings.bids_dir.resolve()
    if not settings.bids_dir.exists():
        raise UsageError(f"bids_dir {settings.bids_dir} does not exist")
    if not bids_dir.is_dir():
        raise UsageError(f"bids_dir {settings.bids_dir} is not a directory")
    derivatives = bids_dir / "derivatives"
    named = {
        "output_dir": settings.output_dir,
        "--work-dir": settings.work_dir,
        "--model-dir": settings.model_dir,
        "--bids-database-dir": settings.bids_database_dir,
    }
    for flag, path in named.items():
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved == bids_dir:
            raise UsageError(f"{flag} {path} is the input dataset: choose another folder")
        inside = bids_dir in resolved.parents
        under_derivatives = derivatives in resolved.parents
        if inside and not under_derivatives:
            raise UsageError(
                f"{flag} {path} is inside the input dataset {bids_dir}: nothing may be written there "
                f"(a folder under {derivatives}/ is allowed)"
            )


#: What a run of counterseg creates in ``output_dir`` before its dataset description: a folder that
#: holds only these (a model copied in, an earlier run's scratch space) is still the app's own.
OWN_ENTRIES = frozenset({"logs", "models", "work"})


def check_output_dir(settings: RunSettings) -> None:
    """Refuse (exit 64), before anything is written, an ``output_dir`` that is not counterseg's to
    write: one holding a dataset that counterseg did not generate (the raw dataset, when ``bids_dir``
    and ``output_dir`` are swapped; another derivative such as the masks' dataset), any other folder
    that is not empty, and one that contains ``bids_dir``; a ``--model-dir`` or ``--work-dir`` that
    holds a BIDS dataset."""
    from bids_app.bids.layout import generated_by_counterseg

    for flag, folder in (("--model-dir", settings.model_dir), ("--work-dir", settings.work_dir)):
        if (Path(folder) / "dataset_description.json").exists():
            raise UsageError(f"{flag} {folder} holds a BIDS dataset: models and scratch files go to a folder of "
                             "their own; choose another")
    output_dir, bids_dir = settings.output_dir.resolve(), settings.bids_dir.resolve()
    if output_dir in bids_dir.parents:
        raise UsageError(f"output_dir {settings.output_dir} contains the input dataset {settings.bids_dir}: choose "
                         "an output folder outside it (bids_dir/derivatives/<name> is allowed)")
    if not output_dir.is_dir() or generated_by_counterseg(output_dir):
        return
    if (output_dir / "dataset_description.json").exists():
        swapped = " (are bids_dir and output_dir swapped?)" if _looks_raw(output_dir) else ""
        raise UsageError(f"output_dir {settings.output_dir} holds a dataset that counterseg did not generate"
                         f"{swapped}: counterseg writes only into a new or empty folder or its own earlier output; "
                         "choose another output_dir")
    foreign = sorted(p.name for p in output_dir.iterdir() if p.name not in OWN_ENTRIES)
    if foreign:
        raise UsageError(f"output_dir {settings.output_dir} is not empty ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}) and holds no counterseg output: counterseg writes "
                         "only into a new or empty folder or its own earlier output; choose another output_dir")


def _looks_raw(folder: Path) -> bool:
    try:
        description = json.loads((folder / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(description, dict) and description.get("DatasetType", "raw") == "raw"


def prepare_output(settings: RunSettings) -> Path:
    """Create ``output_dir/logs`` (exit 73 when that is impossible) and claim the folder with the
    derivative's ``dataset_description.json`` before anything else is written into it."""
    logs = settings.output_dir / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
        probe = logs / f".write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CannotCreateError(
            f"cannot create output in {settings.output_dir}: {exc.strerror or exc}"
        ) from exc
    finalise_output(settings)
    return logs


def finalise_output(settings: RunSettings) -> None:
    """dataset_description.json, README.md and .bidsignore, written in ``finally`` like fMRIPrep, idempotently."""
    from bids_app.bids.derivatives import detect_container, write_bidsignore, write_dataset_description, write_readme

    write_dataset_description(
        settings.output_dir, __version__, settings.bids_dir, container=detect_container()
    )
    write_readme(settings.output_dir)
    write_bidsignore(settings.output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    from bids_app import runlog

    runlog.setup_console_logging(0)
    try:
        return _main(argv)
    finally:
        runlog.close_logging()


def _main(argv: Sequence[str] | None) -> int:
    from bids_app import runlog

    try:
        args = parse_args(argv)
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    except CountersegError as exc:
        return _report(exc)
    runlog.setup_console_logging(getattr(args, "verbosity", 0), quiet=getattr(args, "quiet", False))
    try:
        if "demo" in args:
            return run_demo(args.demo, args)
        settings = settings_from_args(args)
        check_paths(settings)
        check_output_dir(settings)
        if settings.dry_run:
            from bids_app.levels import dry_run_listing

            print(dry_run_listing(settings))
            return ExitCode.OK
        from bids_app import distributed  # torch is imported only once a level runs

        context = distributed.from_environment()
        if context.enabled and settings.analysis_level != "group":
            raise UsageError("torchrun is for the group level: run the participant level as one process per "
                             "participant (e.g. a job array, scripts/slurm/participant_array.sbatch)")
        if not context.is_main:
            runlog.setup_console_logging(getattr(args, "verbosity", 0), context.rank, getattr(args, "quiet", False))
        logs = prepare_output(settings) if context.is_main else settings.output_dir / "logs"
    except CountersegError as exc:
        return _report(exc)
    except Exception as exc:  # noqa: BLE001 - nothing is written yet, so no crash log
        log.error("counterseg failed unexpectedly before starting: %s: %s", type(exc).__name__, exc)
        return ExitCode.UNEXPECTED
    return _run_level(settings, logs, context)


def _run_level(settings: RunSettings, logs: Path, context: Any = None) -> int:
    """Run the level with SIGTERM/SIGINT handled (see :mod:`bids_app.interruption`)."""
    from bids_app import interruption

    with interruption.handle_signals():
        return _run_level_logged(settings, logs, context)


def _run_level_logged(settings: RunSettings, logs: Path, context: Any = None) -> int:
    """Run the level; under torchrun only rank 0 writes logs, the run record and the dataset files
    (another rank writes a crash log only when it crashes)."""
    from bids_app import levels, runlog
    from bids_app.compute import configure_threads, resolve_device
    from bids_app import distributed

    context = context or distributed.SINGLE
    name = runlog.run_id(settings.analysis_level) + ("" if context.is_main else f"_rank{context.rank}")
    file_handler = runlog.add_file_logging(logs, name) if context.is_main else None
    started = time.time()
    record: dict[str, Any] = {"version": __version__, "settings": settings_to_dict(settings)}
    code: int = ExitCode.OK
    try:
        if file_handler is not None:
            log.info("counterseg %s, %s level; log: %s", __version__, settings.analysis_level, file_handler.baseFilename)
        device = distributed.distributed_device(context, resolve_device(settings.compute.device))
        context = distributed.start(context, device)
        threads = configure_threads(settings.compute.omp_nthreads, settings.compute.nprocs, context.local_world_size)
        log.info("device: %s, threads: %d, seed: %d", device, threads, settings.compute.seed)
        if settings.analysis_level == "group":
            record.update(levels.run_group(settings, device, context))
        else:
            record.update(levels.run_participant(settings, device))
        log.info("%s level finished in %.1f s", settings.analysis_level, time.time() - started)
    except (CountersegError, RunInterrupted) as exc:
        code = _report(exc)
        record.update(getattr(exc, "run_record", None) or {})  # what a run that failed some images did
        record["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - the one place a crash becomes exit 1
        crash = runlog.write_crash_log(logs, name, exc)
        log.error("counterseg crashed: %s: %s. Crash log: %s", type(exc).__name__, exc, crash)
        code = ExitCode.UNEXPECTED
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        record.update(exit_code=int(code), seconds=round(time.time() - started, 3))
        try:
            if context.is_main:
                finalise_output(settings)
                runlog.write_run_record(logs, name, record)
        except CountersegError as exc:
            code = code or _report(exc)
        if file_handler is not None:
            runlog.remove_handler(file_handler)
        distributed.stop(context)
    return int(code)


def run_demo(outdir: Path, args: argparse.Namespace) -> int:
    """``--demo OUTDIR``: synthetic dataset, then both levels (see :mod:`bids_app.demo`)."""
    from bids_app import demo

    return demo.run_demo(outdir, args, _main)


def _report(exc: CountersegError | RunInterrupted) -> int:
    """One line (plus details for multi-line messages) on stderr, and the error's exit code."""
    lines = str(exc).splitlines() or [type(exc).__name__]
    logging.getLogger("bids_app").error("%s (exit %d)", lines[0], int(exc.exit_code))
    for line in lines[1:]:
        logging.getLogger("bids_app").error("  %s", line)
    return int(exc.exit_code)


if __name__ == "__main__":
    sys.exit(main())
