"""The README as a newcomer runs it: its commands exist with the arguments it names,
its Python example does not date intents into the past, and `make run`'s hint sends
to a user the demo created (issue 14, item 6)."""

from __future__ import annotations

import re

import click

from pipeline.ops.cli import cli
from pipeline.settings import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def command_rows() -> list[str]:
    section = README.split("## The `herald` command", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `herald ([^`]+)`", section, flags=re.MULTILINE)


def resolve(words: list[str]) -> tuple[click.Command, list[str]]:
    """The deepest command ``words`` name, and the words left after it."""
    command: click.Command = cli
    while words and isinstance(command, click.Group) and words[0] in command.commands:
        command = command.commands[words.pop(0)]
    return command, words


def test_every_command_the_readme_names_exists_with_its_arguments() -> None:
    rows = command_rows()
    assert len(rows) > 15
    for row in rows:
        for usage in row.split("`, `"):
            words = usage.split()
            at = next((i for i, w in enumerate(words) if "\\|" in w), None)
            alternatives = (
                [[*words[:at], alt, *words[at + 1 :]] for alt in words[at].split("\\|")]
                if at is not None
                else [words]
            )
            for alternative in alternatives:
                shown = " ".join(alternative)
                command, left = resolve(list(alternative))
                assert command is not cli, f"`herald {shown}`: no such command"
                assert not isinstance(command, click.Group), f"`herald {shown}`: a group"
                named = [
                    w
                    for i, w in enumerate(left)
                    if re.fullmatch(r"[A-Z][A-Z_]*", w) and not (i and left[i - 1].startswith("-"))
                ]
                arguments = [p for p in command.params if isinstance(p, click.Argument)]
                if named or not left:
                    assert len(named) == len(arguments), (
                        f"`herald {shown}`: the README names {named}, "
                        f"the command takes {[a.name for a in arguments]}"
                    )


def test_the_python_example_does_not_date_intents_into_the_past() -> None:
    """A literal occurred_at_ms (the README had 2023's) makes every push expire."""
    examples = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    assert examples
    for example in examples:
        assert not re.search(r"occurred_at_ms\s*=\s*[\d_]+", example), example


def test_make_run_hints_at_a_user_the_demo_created() -> None:
    hint = (REPO_ROOT / "scripts" / "run-local").read_text()
    (user,) = re.findall(r"--to (\S+)", hint)
    demo = (REPO_ROOT / "pipeline" / "ops" / "demo.py").read_text()
    assert f'user_id="{user}"' in demo, user
