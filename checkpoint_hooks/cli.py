"""`checkpoint-hooks`: look at, verify, repair and prune checkpoint directories. Imports no training framework.

Exit codes: 0 success; 1 a check failed (a file does not verify, no best checkpoint,
no values to plot); 2 bad input (arguments, policy file, an image path that cannot be
written); 3 the directory cannot be used (corrupt or missing manifest, locked by a
running job, not a directory, not a checkpoint directory, unreadable or unwritable).

A checkpoint directory may be written by someone else: every name, path, metric and
tag read from it is passed through `printable` before it reaches the terminal, and
no fault ends in a traceback (one `error:` line instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import unicodedata
from collections.abc import Sequence
from typing import Any

from checkpoint_hooks.core import retention
from checkpoint_hooks.core.directory import CheckpointDirectory, Problem
from checkpoint_hooks.core.errors import CheckpointError, ManifestError
from checkpoint_hooks.core.lock import DirectoryLock
from checkpoint_hooks.core.manifest import MANIFEST_NAME, Manifest
from checkpoint_hooks.core.paths import printable
from checkpoint_hooks.core.records import Record
from checkpoint_hooks.core.store import STAGING_PREFIX
from checkpoint_hooks.policy import CheckpointPolicy, PolicyError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DIRECTORY = 0, 1, 2, 3
EXIT_INTERRUPTED = 130
DIR_HELP = "checkpoint directory: local path or fsspec URL"


def _open(dirpath: str) -> CheckpointDirectory:
    try:
        return CheckpointDirectory(dirpath)
    except NotADirectoryError as exc:
        raise CheckpointError(exc.strerror) from None
    except (ValueError, ImportError) as exc:  # fsspec: an unknown protocol, or its package is not installed
        raise CheckpointError(f"cannot open {dirpath!r}: {exc}; check the URL's protocol") from None


def _manifest(directory: CheckpointDirectory) -> Manifest:
    manifest = directory.read_manifest()
    if manifest is None:
        raise ManifestError(
            f"{directory.index.join(MANIFEST_NAME)!r} not found: not a checkpoint directory, or its index was lost "
            "(`checkpoint-hooks verify --repair DIR` rebuilds it)"
        )
    return manifest


def _current_run(manifest: Manifest) -> list[Record]:
    """The records of the run that saved last."""
    if not manifest.records:
        return []
    newest = max(manifest.records, key=lambda r: r.seq)
    return manifest.run_records(newest.run)


def _policy_of(manifest: Manifest) -> CheckpointPolicy:
    try:
        return CheckpointPolicy.model_validate(manifest.policy) if manifest.policy else CheckpointPolicy()
    except Exception:
        return CheckpointPolicy()


def _best(manifest: Manifest) -> Record | None:
    policy = _policy_of(manifest)
    members = retention.top_k_members(_current_run(manifest))
    if not members:
        return None
    if policy.monitor is None:
        return max(members, key=lambda r: r.seq)
    mode = policy.resolved_mode
    return min(members, key=lambda r: (retention.rank_value(r.score(policy.monitor), mode), r.seq))


def _row(directory: CheckpointDirectory, record: Record) -> dict[str, Any]:
    data = record.to_json()
    data["path"] = record.primary_path
    data["url"] = directory.store.join(record.primary_path)
    return data


def cmd_ls(args: argparse.Namespace) -> int:
    directory = _open(args.dir)
    manifest = _manifest(directory)
    records = sorted(manifest.records, key=lambda r: r.seq)
    if args.json:
        print(json.dumps([_row(directory, r) for r in records], indent=1))
        return EXIT_OK
    policy = _policy_of(manifest)
    monitor = policy.monitor
    verified = {r.name: not directory.verify_record(r) for r in records} if args.verify else {}
    header = ["epoch", "step", printable(monitor or "metric"), "tags", "size", "age", "verified", "path"]
    rows = []
    now = time.time()
    for r in records:
        value = r.score(monitor)
        rows.append([
            str(r.epoch),
            str(r.step),
            "-" if value is None else f"{value:.4f}",
            printable(",".join(sorted(r.tags))) or "-",
            _size(r.bytes),
            _age(now - r.created),
            ("yes" if verified[r.name] else "NO") if args.verify else "-",
            printable(r.primary_path),
        ])
    _print_table(header, rows, title=f"{printable(directory.url)}  ({len(records)} checkpoint(s))")
    return EXIT_OK


def cmd_best(args: argparse.Namespace) -> int:
    directory = _open(args.dir)
    best = _best(_manifest(directory))
    if best is None:
        print(f"no best checkpoint in {printable(directory.url)}", file=sys.stderr)
        return EXIT_FAILED
    print(printable(directory.store.join(best.primary_path)))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    directory = _open(args.dir)
    if args.repair:
        return _repair(directory, force=args.force)
    records, problems = _check_committed(directory, _manifest(directory))
    _print_problems(directory, problems)
    files = sum(len(r.files) for r in records)
    if problems:
        print(f"{len(problems)} of {files} file(s) do not verify in {printable(directory.url)}", file=sys.stderr)
        return EXIT_FAILED
    print(f"ok: {files} file(s) of {len(records)} checkpoint(s) verify in {printable(directory.url)}")
    return EXIT_OK


def _check_committed(directory: CheckpointDirectory, manifest: Manifest) -> tuple[list[Record], list[Problem]]:
    """The checkpoints still committed once every file was checked, and their problems.

    A running job prunes as it trains: a checkpoint listed when the manifest was read
    may be deleted before its files are opened. The manifest is read again when a
    check fails, and a checkpoint it no longer lists was pruned, not damaged.
    """
    problems = [p for r in manifest.records for p in directory.verify_record(r)]
    current = directory.read_manifest() if problems else None
    if current is None:
        return manifest.records, problems
    return [r for r in manifest.records if r.name in current], [p for p in problems if p.record in current]


def _print_problems(directory: CheckpointDirectory, problems: list[Problem]) -> None:
    for problem in problems:
        print(f"BAD {printable(directory.store.join(problem.path))}: {printable(problem.reason)}")


def _is_checkpoint_directory(directory: CheckpointDirectory) -> bool:
    """Whether the directory has an index or checkpoint sidecars: something repair can work from."""
    # sidecars lie at the top of their directory: one in a subfolder belongs to another directory
    top = [p for p in directory.sidecars() if "/" not in p]
    return directory.index.exists(MANIFEST_NAME) or bool(top)


def _repair(directory: CheckpointDirectory, force: bool = False) -> int:
    if not force and not _is_checkpoint_directory(directory):
        raise CheckpointError(
            f"{directory.url!r} is not a checkpoint directory (no {MANIFEST_NAME} and no *.meta.json sidecars); "
            "nothing was written. Check the path, or pass --force to write an empty index there"
        )
    try:
        manifest = directory.read_manifest()
    except ManifestError:
        manifest = None
        raw = directory.index.read_bytes(MANIFEST_NAME) or b""
        kept = f"{MANIFEST_NAME}.corrupt-{int(time.time())}"
        _write(directory, kept, lambda: directory.index.write_bytes(kept, raw))
        print(f"the corrupt manifest was kept as {printable(directory.index.join(kept))}")
    if manifest is not None:
        _, problems = _check_committed(directory, manifest)
        if not problems:
            print(f"ok: the manifest of {printable(directory.url)} is readable and every file verifies; nothing to repair")
            return EXIT_OK
        _print_problems(directory, problems)
        print("the manifest is readable; resume skips checkpoints that do not verify", file=sys.stderr)
        return EXIT_FAILED
    rebuilt, skipped = directory.rebuild()
    for line in skipped:
        print(f"skipped {printable(line)}")
    if not rebuilt.records and not force and not directory.index.exists(MANIFEST_NAME):
        raise CheckpointError(
            f"no checkpoint in {directory.url!r} could be rebuilt ({len(skipped)} sidecar(s) skipped); nothing "
            "was written. Check the path, or pass --force to write an empty index there"
        )
    _write(directory, MANIFEST_NAME, lambda: directory.commit(rebuilt))
    print(f"rebuilt {printable(directory.index.join(MANIFEST_NAME))} with {len(rebuilt.records)} checkpoint(s)")
    return EXIT_OK


def _write(directory: CheckpointDirectory, relpath: str, write: Any) -> None:
    """Run `write`, naming the file that could not be written (`relpath`, not a temporary file) when it fails."""
    try:
        write()
    except OSError as exc:
        failed = exc.filename2 or exc.filename
        if failed is None or os.path.basename(str(failed)).startswith(STAGING_PREFIX):
            failed = directory.index.join(relpath)
        raise CheckpointError(
            f"cannot write {str(failed)!r}: {exc.strerror or exc}; "
            "check that the directory exists and that this user can write to it, then repeat"
        ) from None


def cmd_prune(args: argparse.Namespace) -> int:
    policy = CheckpointPolicy.from_yaml(args.policy)
    directory = _open(args.dir)
    _manifest(directory)  # refuse before locking: taking the lock would create a missing directory
    lock = DirectoryLock(directory.store)
    if not args.dry_run:
        lock.acquire()
    try:
        manifest = _manifest(directory)  # again, under the lock: a running job may have committed since
        keep: dict[str, frozenset[str]] = {}
        for run in {r.run for r in manifest.records}:
            keep.update(retention.replay(policy, manifest.run_records(run)))
        drop = [r for r in manifest.records if r.name not in keep]
        verb = "would delete" if args.dry_run else "deleted"
        if not args.dry_run and drop:
            manifest.records = [r.with_tags(keep[r.name]) for r in manifest.records if r.name in keep]
            directory.commit(manifest)
            for record in drop:
                directory.remove_record_files(record)
        for record in drop:
            print(f"{verb} {printable(directory.store.join(record.primary_path))} (epoch {record.epoch})")
        print(f"{verb} {len(drop)} of {len(drop) + len(keep)} checkpoint(s)")
    finally:
        lock.release()
    return EXIT_OK


def cmd_policy_check(args: argparse.Namespace) -> int:
    policy = CheckpointPolicy.from_yaml(args.file)
    print(f"ok: {args.file} is a valid policy (monitor={policy.monitor!r}, mode={policy.resolved_mode}, top_k={policy.top_k})")
    return EXIT_OK


def cmd_policy_schema(args: argparse.Namespace) -> int:
    print(json.dumps(CheckpointPolicy.model_json_schema(), indent=2))
    return EXIT_OK


def cmd_policy_reference(args: argparse.Namespace) -> int:
    from checkpoint_hooks.policy import reference_markdown

    print(reference_markdown(), end="")
    return EXIT_OK


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _print_table(header: list[str], rows: list[list[str]], title: str = "") -> None:
    """A table of printable cells: rich on a terminal (its width, long cells folded), plain text otherwise.

    Piped output keeps every cell whole, so scripts and `grep` see complete paths.
    """
    if not _stdout_is_terminal():
        _print_plain_table(header, rows, title)
        return
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        _print_plain_table(header, rows, title)
        return
    # Text cells: brackets in a file name are not rich markup, and nothing is cut.
    table = Table(box=box.SIMPLE_HEAD, title=Text(title) if title else None, title_justify="left")
    for name in header:
        table.add_column(Text(name), overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    Console(markup=False, emoji=False, highlight=False).print(table)


def _stdout_is_terminal() -> bool:
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


def _print_plain_table(header: list[str], rows: list[list[str]], title: str) -> None:
    widths = [max(_display_width(cell) for cell in column) for column in zip(header, *rows)]
    if title:
        print(title)
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell + " " * (w - _display_width(cell)) for cell, w in zip(row, widths)).rstrip())


def _display_width(text: str) -> int:
    """Columns `text` takes on a terminal: wide (CJK) characters take two, combining marks none."""
    return sum(
        0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
        for char in text
    )


def cmd_plot(args: argparse.Namespace) -> int:
    from checkpoint_hooks.plot import check_output, metric_names, plot, series

    check_output(args.output)
    directory = _open(args.dir)
    manifest = _manifest(directory)
    current = _current_run(manifest)
    if not current:
        print(f"no checkpoints in {printable(directory.url)}", file=sys.stderr)
        return EXIT_FAILED
    monitor = args.metric or _policy_of(manifest).monitor
    if monitor is None:
        print("the policy has no monitor; name the metric to draw with --metric", file=sys.stderr)
        return EXIT_USAGE
    run = current[-1].run
    if not series(manifest, run, monitor)[0]:
        others = ", ".join(printable(name) for name in metric_names(manifest, run)) or "none"
        print(
            f"no values of '{printable(monitor)}' in the newest run of {printable(directory.url)}; nothing was "
            f"written. Metrics with values: {others}; choose one with --metric",
            file=sys.stderr,
        )
        return EXIT_FAILED
    extra = [m for m in (args.metrics or "").split(",") if m]
    plot(manifest, run, monitor, args.output, extra, title=directory.url)
    print(f"wrote {printable(args.output)}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="checkpoint-hooks",
        description="Look at, verify and prune checkpoint directories written by checkpoint_hooks.",
        epilog="Exit codes: 0 ok, 1 a check failed, 2 bad input, 3 the directory cannot be used.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("ls", help="list committed checkpoints")
    ls.add_argument("dir", help=DIR_HELP)
    ls.add_argument("--json", action="store_true", help="print the manifest records as JSON")
    ls.add_argument("--verify", action="store_true", help="verify each checkpoint's checksums too")
    ls.set_defaults(func=cmd_ls)

    best = sub.add_parser("best", help="print the path of the best checkpoint")
    best.add_argument("dir", help=DIR_HELP)
    best.set_defaults(func=cmd_best)

    verify = sub.add_parser("verify", help="check every committed file against its size and checksum")
    verify.add_argument("dir", help=DIR_HELP)
    verify.add_argument("--repair", action="store_true", help="rebuild a missing or corrupt manifest from the checkpoint files")
    verify.add_argument(
        "--force",
        action="store_true",
        help="with --repair: write an index even where there is no manifest.json and no *.meta.json sidecar "
        "(by default repair refuses a folder that is not a checkpoint directory)",
    )
    verify.set_defaults(func=cmd_verify)

    prune = sub.add_parser("prune", help="apply a (new) retention policy to a directory")
    prune.add_argument("dir", help=DIR_HELP)
    prune.add_argument("--policy", required=True, help="policy YAML file")
    prune.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    prune.set_defaults(func=cmd_prune)

    plot = sub.add_parser("plot", help="draw the monitored metric per epoch with kept checkpoints marked")
    plot.add_argument("dir", help=DIR_HELP)
    plot.add_argument("-o", "--output", default="metrics.png", help="image file (png, svg, pdf)")
    plot.add_argument("--metric", default=None, help="metric to draw (default: the policy's monitor)")
    plot.add_argument("--metrics", default=None, help="other logged metrics to draw too, comma-separated")
    plot.set_defaults(func=cmd_plot)

    policy = sub.add_parser("policy", help="validate a policy file or print the policy's JSON Schema")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate a policy YAML file")
    check.add_argument("file")
    check.set_defaults(func=cmd_policy_check)
    schema = policy_sub.add_parser("schema", help="print the JSON Schema of a policy (for editors)")
    schema.set_defaults(func=cmd_policy_schema)
    reference = policy_sub.add_parser("reference", help="print the policy reference (Markdown) from the field descriptions")
    reference.set_defaults(func=cmd_policy_reference)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from checkpoint_hooks.plot import OutputError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (PolicyError, OutputError) as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    except CheckpointError as exc:
        _print_error(str(exc))
        return EXIT_DIRECTORY
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:  # the store failed on a file of the directory (permissions, a folder in its place)
        where = exc.filename if exc.filename is not None else getattr(args, "dir", "")
        _print_error(f"cannot use {str(where)!r}: {exc.strerror or exc}; check the path and its permissions")
        return EXIT_DIRECTORY
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # no traceback for a user: one line that says what broke
        _print_error(f"unexpected {type(exc).__name__}: {exc} (while running `{args.command}`; please report it)")
        return EXIT_DIRECTORY


def _print_error(message: str) -> None:
    """One `error:` line per line of `message` (a policy error lists each field), each made printable."""
    print("\n".join(printable(line) for line in f"error: {message}".split("\n")), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
