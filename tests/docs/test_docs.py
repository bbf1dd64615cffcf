"""Docs that cannot drift: the policy reference, the README's policy and commands, and the quality gates."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.cli import build_parser
from checkpoint_hooks.policy import reference_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_policy_reference_matches_the_model():
    assert read("docs", "policy.md") == reference_markdown(), (
        "docs/policy.md is out of date: run `checkpoint-hooks policy reference > docs/policy.md`"
    )


def test_reference_names_every_field():
    page = read("docs", "policy.md")
    for name in CheckpointPolicy.model_fields:
        assert f"| `{name}` |" in page


def test_readme_opens_with_the_two_commands():
    lines = [line for line in read("README.md").splitlines() if line.strip()]
    assert lines[1] == "```"
    assert lines[2].startswith("make demo") and lines[3].startswith("make test")


def test_readme_policy_is_a_valid_policy_with_every_field():
    readme = read("README.md")
    block = re.search(r"## The policy.*?```yaml\n(.*?)```", readme, re.S).group(1)
    policy = CheckpointPolicy.from_yaml_text(block, source="README.md")
    assert policy.monitor == "val_loss" and policy.snapshots.every_n_epochs == 10
    named = set(re.findall(r"^(\w+):", block, re.M))
    assert named == set(CheckpointPolicy.model_fields), set(CheckpointPolicy.model_fields) ^ named


def test_readme_lists_every_cli_command():
    readme = read("README.md")
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in commands:
        assert f"checkpoint-hooks {name}" in readme, name


def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_mypy_is_clean_and_strict_on_the_core():
    proc = subprocess.run([sys.executable, "-m", "mypy", "checkpoint_hooks"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "strict = True" in read("setup.cfg")
