"""The `montessori` command: a thin layer over the library API.

Exit codes: 0 done, 2 bad input or config (one line), 1 failure at run time (one line; the disk,
permissions and other OS errors name the path and the reason), 130 interrupted. --debug shows tracebacks.
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import logging
import platform
import sys
from pathlib import Path

from montessori import __version__
from montessori.errors import InputError, MontessoriError, environment_error
from montessori.logs import setup_logging

log = logging.getLogger("montessori")

EXIT_OK, EXIT_FAILURE, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _check_init_folder(folder: Path, args) -> None:
    """Refuse a folder that holds anything but config.yaml (refused on its own, naming it) and the task
    file: its config would make it a run directory, written into beside what is there."""
    if args.force or not folder.exists():
        return
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory (init writes DIR/config.yaml)")
    keep = {"config.yaml"} | ({Path(args.tasks).resolve()} if args.tasks else set())
    others = sorted(p.name for p in folder.iterdir() if p.name not in keep and p.resolve() not in keep)
    if others:
        raise InputError(f"{folder}: not empty ({len(others)} entries, e.g. '{others[0]}'); init writes a new run "
                         f"directory: give a new or empty folder, or use --force to write config.yaml there")


def cmd_init(args) -> int:
    from montessori.config import load_preset, preset_text
    _check_init_folder(Path(args.dir), args)
    if args.tasks is not None:  # seeds, reference and evaluation split from the user's own tasks
        from montessori.tasks import cmd_init_tasks
        return cmd_init_tasks(args)
    if args.teacher_url or args.teacher_model:
        raise InputError("--teacher-url and --teacher-model choose the teacher of a run made from your tasks: "
                         "use them with --tasks FILE (or set generation.base_url and models.teacher)")
    args.preset = args.preset or "smollm2-demo"
    text = preset_text(args.preset)
    load_preset(args.preset)  # a preset that does not validate is a bug: fail before writing
    target = Path(args.dir) / "config.yaml"
    if target.exists() and not args.force:
        raise InputError(f"{target}: already exists (use --force to overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"wrote {target} (preset {args.preset}); run it with: montessori run {target}")
    return EXIT_OK


def cmd_run(args) -> int:
    from montessori.config import load_config
    from montessori.pipeline import run_pipeline
    config = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path(args.config).resolve().parent
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--run-dir {run_dir}: not a directory (the run directory must be a folder)")
    # The console only: run_pipeline adds RUN/montessori.log once everything is checked and the run holds
    # the directory, so a refused run writes nothing (no folder, no line in another run's log).
    setup_logging(None, args.verbose)
    run_pipeline(config, run_dir, only=args.only, until=args.until, force=args.force, log_file=True)
    _print_status(run_dir)
    from montessori.report import write_report
    print(f"report: {write_report(run_dir)}")
    return EXIT_OK


def _print_status(run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table
    from montessori.pipeline import stage_status
    from montessori.store import RunStore
    table = Table(title=f"montessori status: {run_dir}")
    for col in ("round", "stage", "state", "records", "time"):
        table.add_column(col)
    colors = {"done": "green", "partial": "yellow", "pending": "dim", "damaged": "red"}
    for row in stage_status(RunStore(run_dir)):
        counts = ", ".join(f"{k} {_fmt(v)}" for k, v in row["counts"].items() if not isinstance(v, (dict, list)))
        seconds = f"{row['seconds']:.1f}s" if row["seconds"] is not None else ""
        table.add_row(str(row["round"]), row["stage"], f"[{colors[row['state']]}]{row['state']}[/]", counts, seconds)
    Console().print(table)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def cmd_status(args) -> int:
    from montessori.store import RunStore
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir() or not RunStore(run_dir).is_run():
        raise InputError(f"{run_dir}: not a run directory (no config.resolved.yaml, no round-N folder)")
    _print_status(run_dir)
    return EXIT_OK


def cmd_doctor(args) -> int:
    import torch
    from montessori.models.load import NAMED_MODELS, cache_dir, named_gguf_path
    ok = True
    print(f"montessori {__version__}, Python {platform.python_version()} on {platform.platform()}")
    for pkg, extra in (("torch", None), ("transformers", None), ("trl", None), ("peft", None),
                       ("accelerate", None), ("datasets", None), ("gguf", None), ("vllm", "vllm"),
                       ("ray", "ray"), ("lm_eval", "eval")):
        try:
            version = importlib.metadata.version(pkg.replace("_", "-"))
            print(f"  {pkg:<13} {version}")
        except importlib.metadata.PackageNotFoundError:
            if extra:
                print(f"  {pkg:<13} not installed (optional: pip install 'montessori[{extra}]')")
            else:
                ok = False
                print(f"  {pkg:<13} MISSING: pip install -e . (or pip install {pkg})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  device cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB")
    else:
        print(f"  device cpu ({torch.get_num_threads()} threads); no CUDA device")
    for named in NAMED_MODELS.values():  # the embedded default is required, the others optional
        label = f"{'embedded model' if named.name == 'smollm2' else 'model'} {named.name}"
        gguf = named_gguf_path(named)
        if gguf is None and named.chunks() is None:
            ok = ok and named.name != "smollm2"
            print(f"  {label}: NOT installed ({named.note}). Fix: {named.install}")
            continue
        cached = list((cache_dir() / "models").glob(f"{Path(named.gguf).stem}-*/config.json"))
        state = f"converted, cached in {cached[0].parent}" if cached else "not converted yet (first load: minutes)"
        where = f"{gguf}, {gguf.stat().st_size / 2**20:.0f} MB" if gguf else "packages installed, not assembled yet"
        print(f"  {label}: installed ({where}; {named.note}), {state}")
    print("ok" if ok else "problems found: see the fixes above")
    return EXIT_OK if ok else EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    from montessori.config import PRESETS
    parser = argparse.ArgumentParser(prog="montessori", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"montessori {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write DIR/config.yaml from a preset (or from your own tasks: --tasks)")
    p.add_argument("dir")
    p.add_argument("--preset", choices=PRESETS, help="default smollm2-demo; with --tasks: chosen from the machine")
    p.add_argument("--force", action="store_true")
    from montessori.tasks import add_arguments
    add_arguments(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("run", help="run the method (resumes; skips stages that are up to date)")
    p.add_argument("config")
    p.add_argument("--run-dir", help="run directory (default: the config file's folder)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE",
                       help="run only this stage (as `montessori status` names them), in every round, or ROUND:STAGE")
    group.add_argument("--until", metavar="STAGE",
                       help="stop after this stage of round 1, or after ROUND:STAGE (e.g. 2:influence)")
    p.add_argument("--force", action="store_true", help="re-run the selected stages even if up to date")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="print the stages of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("doctor", help="check the installation and say how to fix it")
    p.set_defaults(func=cmd_doctor)
    register_extra_commands(sub)
    return parser


# Modules that contribute sub-commands through a `register(subparsers)` function.
EXTRA_COMMANDS = ("montessori.generation.serve", "montessori.report", "montessori.evaluation.cli",
                  "montessori.analysis", "montessori.export")


def register_extra_commands(sub) -> None:
    import importlib
    import importlib.util
    for name in EXTRA_COMMANDS:
        try:
            present = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            present = False
        if present:
            importlib.import_module(name).register(sub)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # `run CONFIG --until x key=value` as well as `run CONFIG key=value --until x`.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) != "run" or not all("=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except InputError as err:
        return _fail(args, err, str(err), EXIT_INPUT)
    except KeyboardInterrupt:
        _end_progress_bars()
        print("interrupted: finished records are kept; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MontessoriError as err:
        return _fail(args, err, str(err), EXIT_FAILURE)
    except OSError as err:
        # A wrong path the user gave is theirs to fix (2); a full, read-only or forbidden disk is the
        # environment's (1). Either way: one line with the path and the OS's reason.
        located = environment_error(err) or err
        where = " -> ".join(str(f) for f in (located.filename, err.filename2) if f is not None)
        reason = located.strerror or str(err)
        code = EXIT_INPUT if err.errno in USER_ERRNOS else EXIT_FAILURE
        return _fail(args, err, f"{where}: {reason}" if where else reason, code)
    except UnicodeDecodeError as err:  # a file read as text somewhere below: bad bytes are the user's input
        return _fail(args, err, f"not UTF-8 text ({err.reason} at byte {err.start})", EXIT_INPUT)
    except Exception as err:
        # OS errors under other names: safetensors' SafetensorError ("No space left on device (os error
        # 28)") and torch.save's RuntimeError while writing a model. Anything else is a bug: traceback.
        env = environment_error(err)
        if env is None:
            raise
        return _fail(args, err, f"{env.filename}: {env.strerror}" if env.filename else env.strerror, EXIT_FAILURE)


# A path that names nothing, or a file where a folder is expected (and the reverse).
USER_ERRNOS = (errno.ENOENT, errno.EISDIR, errno.ENOTDIR)


def _fail(args, err: BaseException, message: str, code: int) -> int:
    _end_progress_bars()
    if args.debug:
        raise err
    print(f"error: {message}", file=sys.stderr)
    return code


def _end_progress_bars() -> None:
    """Close open progress bars so the error starts its own line (a bar leaves its line unfinished)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # a bar that cannot redraw must not hide the error
            pass


if __name__ == "__main__":
    sys.exit(main())
