"""`checkpoint-hooks`: look at, verify, repair and prune checkpoint directories. Imports no training framework.

Exit codes: 0 success; 1 a check failed (a file does not verify, no best checkpoint);
2 bad input (arguments, policy file); 3 the directory cannot be used (corrupt or
missing manifest, locked by a running job, not a directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from checkpoint_hooks.core import retention
from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.errors import CheckpointError, ManifestError
from checkpoint_hooks.core.lock import DirectoryLock
from checkpoint_hooks.core.manifest import MANIFEST_NAME, Manifest
from checkpoint_hooks.core.records import Record
from checkpoint_hooks.policy import CheckpointPolicy, PolicyError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DIRECTORY = 0, 1, 2, 3


def _open(dirpath: str) -> CheckpointDirectory:
    try:
        return CheckpointDirectory(dirpath)
    except NotADirectoryError as exc:
        raise CheckpointError(exc.strerror) from None


def _manifest(directory: CheckpointDirectory) -> Manifest:
    manifest = directory.read_manifest()
    if manifest is None:
        raise ManifestError(
            f"{directory.store.join(MANIFEST_NAME)!r} not found: not a checkpoint directory, or its index was lost "
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
    header = ["epoch", "step", monitor or "metric", "tags", "size", "age", "verified", "path"]
    rows = []
    now = time.time()
    for r in records:
        value = r.score(monitor)
        rows.append([
            str(r.epoch),
            str(r.step),
            "-" if value is None else f"{value:.4f}",
            ",".join(sorted(r.tags)) or "-",
            _size(r.bytes),
            _age(now - r.created),
            ("yes" if verified[r.name] else "NO") if args.verify else "-",
            r.primary_path,
        ])
    _print_table(header, rows, title=f"{directory.url}  ({len(records)} checkpoint(s))")
    return EXIT_OK


def cmd_best(args: argparse.Namespace) -> int:
    directory = _open(args.dir)
    best = _best(_manifest(directory))
    if best is None:
        print(f"no best checkpoint in {directory.url}", file=sys.stderr)
        return EXIT_FAILED
    print(directory.store.join(best.primary_path))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    directory = _open(args.dir)
    if args.repair:
        return _repair(directory)
    manifest = _manifest(directory)
    problems = [p for r in manifest.records for p in directory.verify_record(r)]
    for problem in problems:
        print(f"BAD {directory.store.join(problem.path)}: {problem.reason}")
    files = sum(len(r.files) for r in manifest.records)
    if problems:
        print(f"{len(problems)} of {files} file(s) do not verify in {directory.url}", file=sys.stderr)
        return EXIT_FAILED
    print(f"ok: {files} file(s) of {len(manifest.records)} checkpoint(s) verify in {directory.url}")
    return EXIT_OK


def _repair(directory: CheckpointDirectory) -> int:
    try:
        manifest = directory.read_manifest()
    except ManifestError:
        manifest = None
        raw = directory.store.read_bytes(MANIFEST_NAME) or b""
        kept = f"{MANIFEST_NAME}.corrupt-{int(time.time())}"
        directory.store.write_bytes(kept, raw)
        print(f"the corrupt manifest was kept as {directory.store.join(kept)}")
    if manifest is not None:
        problems = [p for r in manifest.records for p in directory.verify_record(r)]
        if not problems:
            print(f"ok: the manifest of {directory.url} is readable and every file verifies; nothing to repair")
            return EXIT_OK
        for problem in problems:
            print(f"BAD {directory.store.join(problem.path)}: {problem.reason}")
        print("the manifest is readable; resume skips checkpoints that do not verify", file=sys.stderr)
        return EXIT_FAILED
    rebuilt, skipped = directory.rebuild()
    for line in skipped:
        print(f"skipped {line}")
    directory.commit(rebuilt)
    print(f"rebuilt {directory.store.join(MANIFEST_NAME)} with {len(rebuilt.records)} checkpoint(s)")
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    policy = CheckpointPolicy.from_yaml(args.policy)
    directory = _open(args.dir)
    lock = DirectoryLock(directory.store)
    if not args.dry_run:
        lock.acquire()
    try:
        manifest = _manifest(directory)
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
            print(f"{verb} {directory.store.join(record.primary_path)} (epoch {record.epoch})")
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
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        return
    table = Table(*header, box=box.SIMPLE_HEAD, title=title or None, title_justify="left")
    for row in rows:
        table.add_row(*row)
    Console(width=max(100, sum(len(h) for h in header) + 40), soft_wrap=True).print(table)


def cmd_plot(args: argparse.Namespace) -> int:
    from checkpoint_hooks.plot import plot

    directory = _open(args.dir)
    manifest = _manifest(directory)
    current = _current_run(manifest)
    if not current:
        print(f"no checkpoints in {directory.url}", file=sys.stderr)
        return EXIT_FAILED
    monitor = args.metric or _policy_of(manifest).monitor
    if monitor is None:
        print("the policy has no monitor; name the metric to draw with --metric", file=sys.stderr)
        return EXIT_USAGE
    extra = [m for m in (args.metrics or "").split(",") if m]
    plot(manifest, current[-1].run, monitor, args.output, extra, title=directory.url)
    print(f"wrote {args.output}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="checkpoint-hooks",
        description="Look at, verify and prune checkpoint directories written by checkpoint_hooks.",
        epilog="Exit codes: 0 ok, 1 a check failed, 2 bad input, 3 the directory cannot be used.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("ls", help="list committed checkpoints")
    ls.add_argument("dir", help="checkpoint directory (local path or fsspec URL)")
    ls.add_argument("--json", action="store_true", help="print the manifest records as JSON")
    ls.add_argument("--verify", action="store_true", help="verify each checkpoint's checksums too")
    ls.set_defaults(func=cmd_ls)

    best = sub.add_parser("best", help="print the path of the best checkpoint")
    best.add_argument("dir")
    best.set_defaults(func=cmd_best)

    verify = sub.add_parser("verify", help="check every committed file against its size and checksum")
    verify.add_argument("dir")
    verify.add_argument("--repair", action="store_true", help="rebuild a missing or corrupt manifest from the checkpoint files")
    verify.set_defaults(func=cmd_verify)

    prune = sub.add_parser("prune", help="apply a (new) retention policy to a directory")
    prune.add_argument("dir")
    prune.add_argument("--policy", required=True, help="policy YAML file")
    prune.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    prune.set_defaults(func=cmd_prune)

    plot = sub.add_parser("plot", help="draw the monitored metric per epoch with kept checkpoints marked")
    plot.add_argument("dir")
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
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIRECTORY
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
